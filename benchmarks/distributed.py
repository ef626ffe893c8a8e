"""Cost of ``sync_perturbation=True`` vs ``False`` on 2 logical CPU devices.

Informational: on one physical CPU the two "devices" share the same cores, so
the all-reduce is cheap and the numbers say little about GPUs; what they do
show is the relative cost of the extra gradient all-reduce per step, measured
side by side, interleaved, in one process.

    python benchmarks/distributed.py [--steps 60] [--repeats 2] [--method ae_sam]
"""

import argparse
import os
import platform
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    _cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
)

import keras  # noqa: E402

import keras_aesam  # noqa: E402
from keras_aesam import recipe  # noqa: E402


class StepTimer(keras.callbacks.Callback):
    def __init__(self, skip):
        super().__init__()
        self.skip, self.times, self._start = skip, [], None

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        if batch >= self.skip:
            self.times.append(time.perf_counter() - self._start)


def cnn():
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((28, 28, 1)),
        keras.layers.Conv2D(32, 3, activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(64, 3, activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dense(10),
    ])


def run(strategy, method, sync, dataset, steps, skip):
    with strategy.scope():
        model = keras_aesam.wrap(cnn(), method=method, sync_perturbation=sync,
                                 **({"total_steps": steps} if method.startswith("ae") else {}))
        recipe.compile_model(model, recipe.Recipe(lr=0.05, schedule="constant"), steps)
    timer = StepTimer(skip)
    history = model.fit(dataset, epochs=1, steps_per_epoch=steps, verbose=0, callbacks=[timer])
    return statistics.fmean(timer.times), history.history["sam_fraction"][0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--method", default="sam")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch_size * 8, 28, 28, 1)).astype("float32")
    y = rng.integers(0, 10, size=len(x)).astype("int32")
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(args.batch_size).cache().repeat().prefetch(2)
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    one = tf.distribute.OneDeviceStrategy("/cpu:0")
    configs = [
        ("one device", one, True),
        ("2 replicas, sync_perturbation=True", mirrored, True),
        ("2 replicas, sync_perturbation=False", mirrored, False),
    ]
    results = {name: [] for name, _, _ in configs}
    fractions = {}
    for _ in range(args.repeats):
        for name, strategy, sync in configs:
            mean, frac = run(strategy, args.method, sync, dataset, args.steps, skip=5)
            results[name].append(mean)
            fractions[name] = frac
    base = results["one device"]
    print(f"# sync_perturbation cost, method={args.method}, batch {args.batch_size} (global), "
          f"{args.steps - 5} timed steps x {args.repeats} repeats, random data")
    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, 2 logical devices on one CPU\n")
    print("| configuration | mean step ms | ratio to one device (min–max over repeats) | SAM fraction |")
    print("|---|---|---|---|")
    for name, _, _ in configs:
        ratios = [t / b for t, b in zip(results[name], base)]
        print(f"| {name} | {1000 * statistics.fmean(results[name]):.1f} | "
              f"{statistics.fmean(ratios):.2f} ({min(ratios):.2f}–{max(ratios):.2f}) | {fractions[name]:.2f} |")


if __name__ == "__main__":
    main()
