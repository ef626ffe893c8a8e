"""Moved to :mod:`keras_aesam.bench.noisy_labels`; ``python -m keras_aesam.evidence`` still runs the profile."""

import sys

from keras_aesam.bench.noisy_labels import *  # noqa: F401,F403
from keras_aesam.bench.noisy_labels import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m keras_aesam.evidence"))
