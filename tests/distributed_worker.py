"""Runs one distributed training job and prints its result as JSON (used by
tests/test_distribute.py in a subprocess, because logical devices and
TF_CONFIG must be set before TensorFlow starts).

    python tests/distributed_worker.py mirrored METHOD SYNC    # 2 logical CPUs vs one device
    python tests/distributed_worker.py worker METHOD OUT.json  # one multi-worker process
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

MODE = sys.argv[1]
if MODE in ("mirrored", "outside_scope"):
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
    )

import keras  # noqa: E402
keras.config.disable_traceback_filtering()

import keras_aesam  # noqa: E402
from keras_aesam import policies  # noqa: E402

EPOCHS = 3
# BatchNorm statistics are per replica under MirroredStrategy (as in any
# data-parallel training), so the comparison with one device runs without it.
USE_BN = os.environ.get("KERAS_AESAM_TEST_BN") == "1"


class RecordingPolicy:
    """Wraps a policy and records, per replica, every decision it returns."""

    log = []

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def decide(self, state, stat, step, total_steps):
        use, new_state, logs = self.inner.decide(state, stat, step, total_steps)
        ctx = tf.distribute.get_replica_context()
        replica = ctx.replica_id_in_sync_group if ctx is not None else 0

        def record(r, t, u):
            RecordingPolicy.log.append((int(r), int(t), bool(u)))
            return np.int32(0)

        tick = tf.py_function(record, [replica, step, use], tf.int32)
        with tf.control_dependencies([tick]):
            use = tf.identity(use)
        return use, new_state, logs


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, 6)).astype("float32")
    y = np.abs(x[:, :3]).argmax(1).astype("int32")
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(32)


def net():
    keras.utils.set_random_seed(0)
    layers = [keras.Input((6,)), keras.layers.Dense(8, activation="relu")]
    if USE_BN:
        layers.append(keras.layers.BatchNormalization())
    return keras.Sequential(layers + [keras.layers.Dense(3)])


def train(strategy, method, sync, record=False):
    with strategy.scope():
        inner = net()
        model = keras_aesam.wrap(inner, method=method, sync_perturbation=sync)
        if record:
            model.policy = RecordingPolicy(model.policy)
        model.compile(
            optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    history = model.fit(data(), epochs=EPOCHS, verbose=0).history
    return history["sam_fraction"], [w.tolist() for w in inner.get_weights()], model


def mirrored(method, sync):
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    fractions, weights, model = train(strategy, method, sync, record=True)
    one_fractions, one_weights, _ = train(tf.distribute.OneDeviceStrategy("/cpu:0"), method, sync)
    by_step = {}
    for replica, step, use in RecordingPolicy.log:
        by_step.setdefault(step, {})[replica] = use
    return {
        "replicas": strategy.num_replicas_in_sync,
        "fractions": fractions,
        "one_device_fractions": one_fractions,
        "weights": weights,
        "one_device_weights": one_weights,
        "decisions": {str(k): v for k, v in sorted(by_step.items())},
    }


def outside_scope():
    """Build outside the strategy, compile and fit inside: Keras's error, ours alike."""
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    x, y = next(iter(data().unbatch().batch(128)))
    errors = {}
    for kind in ("keras", "keras_aesam"):
        inner = net()
        model = inner if kind == "keras" else keras_aesam.wrap(inner, method="ae_sam")
        try:
            with strategy.scope():
                model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
                model.fit(x, y, epochs=1, verbose=0)
            errors[kind] = None
        except Exception as error:  # noqa: BLE001 - the type is the result
            errors[kind] = type(error).__name__
    return errors


def worker(method, out_path):
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    fractions, weights, model = train(strategy, method, True)
    with open(out_path, "w") as f:
        json.dump({"fractions": fractions, "weights": weights, "state": model.policy_state}, f)


if __name__ == "__main__":
    if MODE == "mirrored":
        print(json.dumps(mirrored(sys.argv[2], sys.argv[3] == "1")))
    elif MODE == "outside_scope":
        print(json.dumps(outside_scope()))
    else:
        worker(sys.argv[2], sys.argv[3])
