"""Cost of a step with an embedding's sparse gradient, per method, against plain ``fit``.

The model is a bag-of-tokens classifier on a 100,000 × 64 ``Embedding`` table
(25.6 MB in float32): tokens → Embedding → mean over the sequence → Dense(10).
Its gradient for the table is a ``tf.IndexedSlices`` of the batch's rows. Plain
``keras.Model`` and the ERM-like steps keep it sparse; SAM's perturbation is
sparse too but ``w + e`` is a new dense table (the second pass needs the whole
weight), and LookSAM's ``d`` is dense (its ``g_v`` is). This script measures what
that costs.

One process builds every configuration (plain ``fit``, plain ``fit`` with SGD
momentum 0.9, and each method of ``keras_aesam.METHODS``; ``msam`` with that
momentum, which it perturbs along, the others with plain SGD) from the same
initial weights, then runs them in turn
(A, B, C, …) for ``--repeats`` rounds of ``--steps`` steps each, all on the same
batches: interleaved, so that other load on the machine hits every
configuration alike. A step is one ``train_on_batch``, timed with
``time.perf_counter`` (wall) and ``time.process_time`` (the process's CPU time,
which other processes on a shared machine disturb less); the first round is a
warm-up (tracing) and is dropped. Ratios to plain ``fit`` are taken per round
and their median reported, with their range.

Peak memory of a step: TensorFlow's CPU allocator is made a BFC allocator
(``TF_CPU_ALLOCATOR_USE_BFC=true``; the script re-executes itself with it when it
is not set), whose statistics ``tf.config.experimental.get_memory_info`` reads.
Before each configuration's steps the peak is reset; the peak during the steps
minus the bytes in use just before them is what a step adds on top of the
weights and state every model holds.

    python benchmarks/sparse_gradients.py [--steps 10] [--repeats 15] [--batch 64]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

if os.environ.get("TF_CPU_ALLOCATOR_USE_BFC") != "true":  # before TensorFlow starts
    os.environ["TF_CPU_ALLOCATOR_USE_BFC"] = "true"
    os.execv(sys.executable, [sys.executable, *sys.argv])

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_aesam  # noqa: E402

VOCAB, DIM, LENGTH, CLASSES = 100_000, 64, 32, 10
#: Configurations trained with SGD momentum 0.9 (a dense velocity for the table).
MOMENTUM_CONFIGS = ("plain_momentum", "msam")


def log(message):
    print(message, file=sys.stderr, flush=True)


def net():
    tokens = keras.Input((LENGTH,), dtype="int32")
    h = keras.layers.Embedding(VOCAB, DIM)(tokens)
    h = keras.layers.GlobalAveragePooling1D()(h)
    return keras.Model(tokens, keras.layers.Dense(CLASSES)(h))


def batches(batch, count, seed=0):
    """Zipf-distributed tokens (as in text): frequent tokens repeat in a batch."""
    rng = np.random.default_rng(seed)
    x = np.minimum(rng.zipf(1.3, size=(count, batch, LENGTH)) - 1, VOCAB - 1).astype("int32")
    y = rng.integers(0, CLASSES, size=(count, batch)).astype("int32")
    return list(zip(x, y))


def build(configs, total_steps):
    keras.utils.set_random_seed(0)
    initial = net().get_weights()
    models = {}
    for name in configs:
        inner = net()
        inner.set_weights(initial)
        model = inner if name.startswith("plain") else keras_aesam.wrap(
            inner, method=name, total_steps=total_steps
        )
        momentum = 0.9 if name in MOMENTUM_CONFIGS else 0.0
        model.compile(
            optimizer=keras.optimizers.SGD(0.01, momentum=momentum),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        models[name] = model
    return models


def run(model, data):
    """Wall and CPU seconds per step, and the peak memory (MB) the steps added."""
    tf.config.experimental.reset_memory_stats("CPU:0")
    before = tf.config.experimental.get_memory_info("CPU:0")["current"]
    start, start_cpu = time.perf_counter(), time.process_time()
    for x, y in data:
        model.train_on_batch(x, y)
    wall = (time.perf_counter() - start) / len(data)
    cpu = (time.process_time() - start_cpu) / len(data)
    peak = tf.config.experimental.get_memory_info("CPU:0")["peak"]
    return wall, cpu, (peak - before) / 1e6


def ratio_summary(values, plain):
    """Median of the per-round ratios to plain, and their range."""
    ratios = [v / p for v, p in zip(values, plain)]
    return f"{statistics.median(ratios):.2f} ({min(ratios):.2f}–{max(ratios):.2f})"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="steps per configuration per round")
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds (after one warm-up)")
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args(argv)

    configs = ["plain", "plain_momentum", *sorted(keras_aesam.METHODS)]
    data = batches(args.batch, args.steps)
    rows = sum(len(np.unique(x)) for x, _ in data) / len(data)
    models = build(configs, total_steps=args.steps * (args.repeats + 1))
    results = {c: [] for c in configs}  # (wall, cpu, peak MB) per round
    for round_ in range(args.repeats + 1):
        for name in configs:
            measured = run(models[name], data)
            if round_ > 0:  # round 0 traces and warms up
                results[name].append(measured)
        log(f"round {round_}/{args.repeats} done")

    column = lambda name, i: [r[i] for r in results[name]]  # noqa: E731
    plain_mb = statistics.median(column("plain", 2))
    print(f"Embedding {VOCAB:,} x {DIM} (float32, {VOCAB * DIM * 4 / 1e6:.1f} MB), "
          f"batch {args.batch} x {LENGTH} tokens ({rows:.0f} distinct rows per batch on "
          f"average), SGD; {args.repeats} rounds x {args.steps} steps, interleaved.\n")
    print("| configuration | wall ms / step | wall × plain | CPU ms / step | CPU × plain "
          "| peak MB added by a step | × plain |")
    print("|---|---|---|---|---|---|---|")
    for name in configs:
        wall, cpu, mb = (column(name, i) for i in range(3))
        print(f"| {name} | {statistics.median(wall) * 1e3:.1f} "
              f"| {ratio_summary(wall, column('plain', 0))} "
              f"| {statistics.median(cpu) * 1e3:.1f} | {ratio_summary(cpu, column('plain', 1))} "
              f"| {statistics.median(mb):.1f} | {statistics.median(mb) / plain_mb:.2f} |")


if __name__ == "__main__":
    main()
