"""keras-aesam: sharpness-aware training for Keras 3 that uses SAM only where it pays.

The paper's seven methods (ERM, SAM, ESAM, SS-SAM, LookSAM, AE-SAM, AE-LookSAM),
budgeted rivals and Momentum-SAM as drop-in ``keras.Model`` subclasses: a *policy* decides when a step is a SAM
step, a *direction* rule forms the update, and ``SharpnessAwareModel`` runs both
inside ``train_step``.
"""

import sys as _sys

from keras_aesam import _startup

if _sys.argv and _startup.is_console_script(_sys.argv[0]):  # the keras-aesam command: no TF start-up noise
    _startup.quiet_tensorflow_import()

from keras_aesam import directions, ops, policies
from keras_aesam.methods import METHODS, build_method, method_parameters
from keras_aesam.model import (
    AELookSAMModel,
    AESAMModel,
    ERMModel,
    ESAMModel,
    LateSAMModel,
    LookSAMModel,
    MSAMModel,
    QuantileSAMModel,
    RSTModel,
    SAMModel,
    SharpnessAwareModel,
    SSSAMModel,
    wrap,
)
from keras_aesam.sharpness import measure_sharpness

__version__ = "0.1.0"

__all__ = [
    "AELookSAMModel",
    "AESAMModel",
    "ERMModel",
    "ESAMModel",
    "LateSAMModel",
    "LookSAMModel",
    "METHODS",
    "MSAMModel",
    "QuantileSAMModel",
    "RSTModel",
    "SAMModel",
    "SSSAMModel",
    "SharpnessAwareModel",
    "build_method",
    "directions",
    "measure_sharpness",
    "method_parameters",
    "ops",
    "policies",
    "wrap",
]
