"""Trains with gradient accumulation on 2 logical CPUs and on one device and
prints both results as JSON (used by tests/test_features.py in a subprocess:
logical devices must be set before TensorFlow starts).

    python tests/features_worker.py METHOD PERTURB_FILTER   # '' for no filter
    python tests/features_worker.py loss_scaling             # the refusal with mixed_float16
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
)

import keras  # noqa: E402

import keras_aesam  # noqa: E402

EPOCHS = 3
ACCUMULATION = 2


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, 6)).astype("float32")
    y = np.abs(x[:, :3]).argmax(1).astype("int32")
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(32)


def train(strategy, method, perturb_filter):
    with strategy.scope():
        keras.utils.set_random_seed(0)
        inner = keras.Sequential([
            keras.Input((6,)),
            keras.layers.Dense(8, activation="relu", name="hidden"),
            keras.layers.Dense(3, name="head"),
        ])
        model = keras_aesam.wrap(inner, method=method, perturb_filter=perturb_filter or None)
        model.compile(
            optimizer=keras.optimizers.SGD(
                0.1, momentum=0.9, gradient_accumulation_steps=ACCUMULATION
            ),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    history = model.fit(data(), epochs=EPOCHS, verbose=0).history
    return {
        "fractions": history["sam_fraction"],
        "sharpness": history["sharpness"],
        "weights": [w.tolist() for w in inner.get_weights()],
        "iterations": int(model.optimizer.iterations.numpy()),
    }


def loss_scaling_error():
    """The error for accumulation + mixed_float16 on 2 replicas, or None."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        train(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]), "sam", "")
    except ValueError as error:
        return str(error)
    return None


if __name__ == "__main__":
    if sys.argv[1] == "loss_scaling":
        print(json.dumps({"error": loss_scaling_error()}))
        sys.exit(0)
    method, perturb_filter = sys.argv[1], sys.argv[2]
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    result = train(mirrored, method, perturb_filter)
    one = train(tf.distribute.OneDeviceStrategy("/cpu:0"), method, perturb_filter)
    result.update({f"one_device_{k}": v for k, v in one.items()})
    result["replicas"] = mirrored.num_replicas_in_sync
    print(json.dumps(result))
