"""A LookSAM subclass under MirroredStrategy: its g_v is made when fit() builds
it, inside the strategy's scope, and it trains like one device.

The two-replica run needs logical devices set before TensorFlow starts, so
this file also runs as the subprocess (``python THIS_FILE``), which prints one
JSON line.
"""

import json
import subprocess
import sys

import numpy as np


def test_looksam_subclass_state_is_mirrored_and_trains_like_one_device():
    """The model is made in the scope and fit() runs inside or outside it (both
    usual); SYNCED_RTOL is test_distribute's bound for the same 12 steps, net
    shape, data and optimizer in float64 (only the order of additions differs)."""
    from test_distribute import SYNCED_RTOL, TIMEOUT, finish_workers, max_rel_diff, worker_env

    proc = subprocess.Popen(
        [sys.executable, __file__], env=worker_env(), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    (result,) = finish_workers([proc], timeout=TIMEOUT)
    for where in ("fit_outside_scope", "fit_inside_scope"):
        run = result[where]
        assert run["g_v_types"] == ["MirroredVariable"] * 4, where
        assert run["g_v_nonzero"], where
        assert run["fractions"] == run["one_device_fractions"] == [0.5] * 3, where
        assert max_rel_diff(run["weights"], run["one_device_weights"]) < SYNCED_RTOL, where


def _worker():
    import distributed_worker as dw

    dw.two_logical_cpus()
    import keras
    import tensorflow as tf

    import keras_aesam

    keras.config.set_floatx("float64")

    class Net(keras_aesam.LookSAMModel):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.hidden = keras.layers.Dense(8, activation="relu")
            self.out = keras.layers.Dense(3)

        def call(self, x, training=False):
            return self.out(self.hidden(x))

    def run(strategy, fit_inside_scope):
        keras.utils.set_random_seed(0)
        with strategy.scope():
            model = Net(k=2)  # unbuilt: fit() builds it
            model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            assert model._direction_state is None
        fit = lambda: model.fit(dw.data(), epochs=dw.EPOCHS, verbose=0, shuffle=False)
        if fit_inside_scope:
            with strategy.scope():
                history = fit().history
        else:
            history = fit().history
        return model, history["sam_fraction"]

    out = {}
    for inside in (False, True):
        model, fractions = run(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]), inside)
        one, one_fractions = run(tf.distribute.OneDeviceStrategy("/cpu:0"), inside)
        out["fit_inside_scope" if inside else "fit_outside_scope"] = {
            "g_v_types": [type(v._value).__name__ for v in model._direction_state],
            "g_v_nonzero": bool(any(np.any(v.numpy()) for v in model._direction_state)),
            "fractions": fractions,
            "one_device_fractions": one_fractions,
            "weights": [v.numpy().tolist() for v in model.weights],
            "one_device_weights": [v.numpy().tolist() for v in one.weights],
        }
    print(json.dumps(out))


if __name__ == "__main__":
    _worker()
