"""Per-step training time of keras_aesam's models against plain ``keras.Model.fit``.

One process trains a small CNN (two conv layers with BatchNorm and Dropout, about
0.2 M parameters) on Fashion-MNIST-shaped batches of 128 for every configuration
below, interleaved (A, B, C, …, A, B, C, …) and repeated, each fit starting
from the same initial weights:

====================  ==========================================================
plain                 the inner model compiled and fitted directly
never-SAM             ``ae_sam`` with ``lambda1 = lambda2 = +1e9`` (never fires)
always-SAM            ``ae_sam`` with ``lambda1 = lambda2 = -1e9`` (always fires)
AE-SAM                ``ae_sam`` with its defaults, ``total_steps`` = steps run
ERM / SAM             ``method="erm"`` / ``method="sam"``
MSAM                  ``method="msam"`` (one pass, at ``w + e`` from the momentum)
LookSAM               ``method="looksam", k=5``
AE-LookSAM            ``method="ae_looksam"`` with its defaults
plain / AE-SAM + XLA  the same with ``jit_compile=True`` (only with ``--xla``)
====================  ==========================================================

Each step is timed with ``time.perf_counter`` between ``on_train_batch_begin``
and ``on_train_batch_end``; the first ``--warmup`` steps of every fit (tracing,
compilation) are dropped. Which steps were SAM steps is read from the per-batch
``sam_fraction`` log, the running mean over the epoch: after step ``k``
(0-based) ``round(sam_fraction * (k + 1))`` SAM steps have run.

The data come from ``tf.data`` with ``cache()`` (filled before any timing) and
``prefetch``, and a data-only loop over the same pipeline is timed alongside,
so that the input pipeline can be seen not to be the bottleneck.

Run ``python benchmarks/step_time.py --help`` for the options. The report is
Markdown on stdout (progress goes to stderr) and, with ``--output``, in a file.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import time
from typing import Callable, Optional

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_aesam  # noqa: E402
from keras_aesam import recipe  # noqa: E402

#: Every configuration trains with the same recipe: SGD(0.05, momentum 0.9), constant rate.
RECIPE = recipe.Recipe(lr=0.05, momentum=0.9, schedule="constant")

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
NUM_CLASSES = 10

#: Targets (ratios to plain ``fit``).
NEVER_SAM_TARGET = 1.02
ALWAYS_SAM_TARGET = 2.02
AE_SAM_SLACK = 1.03  # AE-SAM mean <= (1 + zeta) * AE_SAM_SLACK * plain mean
LOOKSAM_ERM_TARGET = 1.05  # "a non-SAM LookSAM step costs about one ERM step"
MSAM_ERM_TARGET = 1.03  # Momentum-SAM: one pass, ERM's cost


def log(message: str) -> None:
    """Progress on stderr, so that stdout holds only the Markdown report."""
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------
# Machine and data
# ----------------------------------------------------------------------------
def cpu_model() -> str:
    """The ``Model name`` line of ``lscpu`` (with the core count)."""
    name = "unknown CPU"
    try:
        out = subprocess.run(
            ["lscpu"], capture_output=True, text=True, check=True
        ).stdout
        for line in out.splitlines():
            if line.strip().startswith("Model name:"):
                name = line.split(":", 1)[1].strip()
                break
    except (OSError, subprocess.CalledProcessError):
        pass
    return f"{name}, {os.cpu_count()} logical CPUs"


def library_revision() -> str:
    """The git commit of the ``keras_aesam`` being measured, flagged if its sources differ."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(keras_aesam.__file__)))
    try:
        commit = subprocess.run(
            ["git", "-C", root, "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--", "keras_aesam"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown revision"
    return f"commit {commit}" + (" with uncommitted changes in keras_aesam/" if dirty else "")


def _link_debian_fashion_mnist() -> None:
    """Make Debian's Fashion-MNIST files visible in Keras's dataset cache.

    ``keras.datasets.fashion_mnist.load_data()`` looks in
    ``$KERAS_HOME/datasets/fashion-mnist`` (default ``~/.keras``) before
    downloading; missing files are symlinked (copied if that fails) from the
    ``dataset-fashion-mnist`` package. Existing files are left alone.
    """
    if not os.path.isdir(DEBIAN_FASHION_MNIST):
        return
    home = os.environ.get("KERAS_HOME", os.path.join(os.path.expanduser("~"), ".keras"))
    target = os.path.join(home, "datasets", "fashion-mnist")
    os.makedirs(target, exist_ok=True)
    for name in FASHION_MNIST_FILES:
        src = os.path.join(DEBIAN_FASHION_MNIST, name)
        dst = os.path.join(target, name)
        if os.path.exists(dst) or not os.path.exists(src):
            continue
        try:
            os.symlink(src, dst)
        except OSError:
            shutil.copyfile(src, dst)


def load_training_arrays(seed: int):
    """``(x, y, source)``: Fashion-MNIST's training set, or random data of its shape.

    ``x`` is uint8 of shape (N, 28, 28), ``y`` uint8 labels; ``source`` says
    which was used (and why random data, if so).
    """
    try:
        _link_debian_fashion_mnist()
        (x, y), _ = keras.datasets.fashion_mnist.load_data()
        return x, y, "Fashion-MNIST (keras.datasets.fashion_mnist, 60,000 training images)"
    except Exception as err:  # offline, missing files, corrupt archive …
        rng = np.random.default_rng(seed)
        x = rng.integers(0, 256, size=(60000, 28, 28), dtype=np.uint8)
        y = rng.integers(0, NUM_CLASSES, size=(60000,), dtype=np.uint8)
        reason = f"{type(err).__name__}: {err}".splitlines()[0][:160]
        return x, y, f"RANDOM data of Fashion-MNIST's shape (Fashion-MNIST failed to load: {reason})"


def _to_float(images, labels):
    images = tf.cast(images, tf.float32)[..., tf.newaxis] / 255.0
    return images, tf.cast(labels, tf.int32)


def make_pipeline(x, y, batch_size: int, seed: int):
    """An endless ``tf.data`` pipeline of batches: cache → shuffle → repeat → prefetch.

    The cache holds float32 batches and is filled here, by one full pass, so
    that no timed step pays for decoding or caching.
    """
    cached = (
        tf.data.Dataset.from_tensor_slices((x, y))
        .batch(batch_size, drop_remainder=True)
        .map(_to_float, num_parallel_calls=tf.data.AUTOTUNE)
        .cache()
    )
    num_batches = 0
    for _ in cached:  # fill the in-memory cache (shared by derived datasets)
        num_batches += 1
    pipeline = (
        cached.shuffle(num_batches, seed=seed, reshuffle_each_iteration=True)
        .repeat()
        .prefetch(tf.data.AUTOTUNE)
    )
    return pipeline, num_batches


def data_only_ms(dataset, num_batches: int) -> float:
    """Mean milliseconds per batch of a loop that only pulls batches from ``dataset``.

    Each batch is touched (a tiny reduction) so that it is really produced.
    """
    iterator = iter(dataset)
    next(iterator)
    start = time.perf_counter()
    for _ in range(num_batches):
        images, _ = next(iterator)
        images[0, 0, 0, 0].numpy()
    return (time.perf_counter() - start) * 1000.0 / num_batches


# ----------------------------------------------------------------------------
# Network and configurations
# ----------------------------------------------------------------------------
def build_cnn() -> keras.Model:
    """Small Fashion-MNIST CNN: 2 × (conv-BN-ReLU-pool-dropout), dense 64, dense 10."""
    inputs = keras.Input((28, 28, 1))
    h = inputs
    for filters in (32, 64):
        h = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(h)
        h = keras.layers.BatchNormalization()(h)
        h = keras.layers.ReLU()(h)
        h = keras.layers.MaxPooling2D()(h)
        h = keras.layers.Dropout(0.25)(h)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(64, activation="relu")(h)
    h = keras.layers.Dropout(0.25)(h)
    outputs = keras.layers.Dense(NUM_CLASSES)(h)
    return keras.Model(inputs, outputs, name="small_cnn")


@dataclasses.dataclass(frozen=True)
class Config:
    """One benchmarked configuration.

    ``make(inner, total_steps)`` returns the model to compile and fit (``inner``
    itself for plain ``fit``); ``mixed`` marks policies that mix ERM and SAM
    steps, whose medians say nothing about their cost.
    """

    key: str
    label: str
    make: Callable[[keras.Model, int], keras.Model]
    mixed: bool = False
    jit_compile: bool = False


def configurations(xla: bool) -> list:
    """The configurations in the order they are interleaved."""
    wrap = keras_aesam.wrap
    configs = [
        Config("plain", "plain `keras.Model.fit`", lambda m, t: m),
        Config(
            "never",
            "never-SAM (`ae_sam`, λ1=λ2=+1e9)",
            lambda m, t: wrap(m, "ae_sam", lambda1=1e9, lambda2=1e9, total_steps=t),
        ),
        Config(
            "always",
            "always-SAM (`ae_sam`, λ1=λ2=−1e9)",
            lambda m, t: wrap(m, "ae_sam", lambda1=-1e9, lambda2=-1e9, total_steps=t),
        ),
        Config(
            "ae_sam",
            "AE-SAM (defaults)",
            lambda m, t: wrap(m, "ae_sam", total_steps=t),
            mixed=True,
        ),
        Config("erm", "ERM (`method=\"erm\"`)", lambda m, t: wrap(m, "erm")),
        Config("sam", "SAM (`method=\"sam\"`)", lambda m, t: wrap(m, "sam")),
        Config("msam", "MSAM (`method=\"msam\"`)", lambda m, t: wrap(m, "msam")),
        Config(
            "looksam",
            "LookSAM (k=5)",
            lambda m, t: wrap(m, "looksam", k=5),
            mixed=True,
        ),
        Config(
            "ae_looksam",
            "AE-LookSAM (defaults)",
            lambda m, t: wrap(m, "ae_looksam", total_steps=t),
            mixed=True,
        ),
    ]
    if xla:
        configs += [
            Config("plain_xla", "plain `fit` + XLA", lambda m, t: m, jit_compile=True),
            Config(
                "ae_sam_xla",
                "AE-SAM (defaults) + XLA",
                lambda m, t: wrap(m, "ae_sam", total_steps=t),
                mixed=True,
                jit_compile=True,
            ),
        ]
    return configs


# ----------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------
class StepTimer(keras.callbacks.Callback):
    """Wall and process CPU time of every training step, and whether it was a SAM step.

    The process CPU time (all threads of this process) counts the work a step
    does whatever else runs on the machine, so it is far less noisy than the
    wall time on a shared machine; it is reported next to it as a cross-check.

    The SAM flag of step ``k`` is the increase of ``round(sam_fraction·(k+1))``,
    the epoch's SAM-step count; it is ``None`` for models without the log.
    """

    def __init__(self):
        super().__init__()
        self.seconds = []
        self.cpu_seconds = []
        self.sam = []
        self._start = 0.0
        self._cpu_start = 0.0
        self._sam_count = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._sam_count = 0

    def on_train_batch_begin(self, batch, logs=None):
        self._cpu_start = time.process_time()
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)
        self.cpu_seconds.append(time.process_time() - self._cpu_start)
        fraction = (logs or {}).get("sam_fraction")
        if fraction is None:
            self.sam.append(None)
            return
        count = int(round(float(fraction) * (batch + 1)))
        step_was_sam = count - self._sam_count
        if step_was_sam not in (0, 1):
            raise RuntimeError(
                f"sam_fraction {fraction} at batch {batch} does not match a running "
                "mean of SAM flags (is the log not reset each epoch?)"
            )
        self._sam_count = count
        self.sam.append(bool(step_was_sam))


@dataclasses.dataclass
class Run:
    """The timed steps of one fit (warm-up dropped), in milliseconds."""

    ms: np.ndarray
    cpu_ms: np.ndarray  # process CPU time of the same steps
    sam: Optional[np.ndarray]  # bool per timed step, None without sam_fraction
    fit_seconds: float


class Contender:
    """One configuration's compiled model, put back to its initial state before each fit.

    The model is built and compiled once, so that its ``train_function`` is
    traced once per process; before every fit all of its variables (weights,
    BatchNorm statistics, Dropout seeds, the policy's state) and all of its
    optimizer's (step count, momenta, learning rate) get their initial values
    back, so every fit starts from the same point.
    """

    def __init__(self, config: Config, initial_weights, total_steps: int, seed: int):
        self.config = config
        keras.utils.set_random_seed(seed)
        inner = build_cnn()
        inner.set_weights(initial_weights)
        self.model = config.make(inner, total_steps)
        recipe.compile_model(self.model, RECIPE, total_steps, jit_compile=config.jit_compile)
        optimizer = self.model.optimizer
        optimizer.build(self.model.trainable_variables)
        variables = list(self.model.variables) + list(optimizer.variables)
        self._initial = [(v, v.numpy()) for v in variables]

    def fit(self, dataset, warmup: int, steps: int) -> Run:
        """Reset, then fit ``warmup + steps`` steps and time them."""
        for variable, value in self._initial:
            variable.assign(value)
        timer = StepTimer()
        start = time.perf_counter()
        self.model.fit(
            dataset,
            epochs=1,
            steps_per_epoch=warmup + steps,
            shuffle=False,  # tf.data shuffles
            callbacks=[timer],
            verbose=0,
        )
        fit_seconds = time.perf_counter() - start
        ms = np.asarray(timer.seconds[warmup:]) * 1000.0
        cpu_ms = np.asarray(timer.cpu_seconds[warmup:]) * 1000.0
        flags = timer.sam[warmup:]
        sam = None if any(f is None for f in flags) else np.asarray(flags, dtype=bool)
        return Run(ms=ms, cpu_ms=cpu_ms, sam=sam, fit_seconds=fit_seconds)


# ----------------------------------------------------------------------------
# Statistics and report
# ----------------------------------------------------------------------------
WALL, CPU = "ms", "cpu_ms"  # the two step times a Run holds


def _pooled(runs, field=WALL):
    """All timed steps of ``runs`` (one per repeat), in ms."""
    return np.concatenate([getattr(r, field) for r in runs])


def _zeta(runs):
    """The measured SAM fraction of the timed steps."""
    return float(np.concatenate([r.sam for r in runs]).mean())


def _ratio(runs, base_runs, stat=np.mean, field=WALL):
    """``(pooled, min, max)``: ``stat`` of ``runs`` over ``stat`` of ``base_runs``,
    pooled over repeats, and the extremes of the per-repeat ratios."""
    pooled = stat(_pooled(runs, field)) / stat(_pooled(base_runs, field))
    per_repeat = [
        stat(getattr(r, field)) / stat(getattr(b, field)) for r, b in zip(runs, base_runs)
    ]
    return pooled, min(per_repeat), max(per_repeat)


def _kind_ratio(runs, want_sam, base_runs, field=WALL):
    """Like ``_ratio`` of means, for only the SAM (or only the non-SAM) steps of ``runs``."""
    chosen = [getattr(r, field)[r.sam == want_sam] for r in runs]
    pooled = np.concatenate(chosen)
    if not pooled.size:
        return float("nan"), float("nan"), float("nan")
    per_repeat = [
        c.mean() / getattr(b, field).mean() for c, b in zip(chosen, base_runs) if c.size
    ]
    return pooled.mean() / _pooled(base_runs, field).mean(), min(per_repeat), max(per_repeat)


def _ae_ratio(runs, base_runs, field=WALL):
    """``mean / ((1+ζ)·base mean)``, pooled and per-repeat (each with its own ζ)."""
    pooled = _pooled(runs, field).mean() / ((1.0 + _zeta(runs)) * _pooled(base_runs, field).mean())
    per_repeat = [
        getattr(r, field).mean() / ((1.0 + r.sam.mean()) * getattr(b, field).mean())
        for r, b in zip(runs, base_runs)
    ]
    return pooled, min(per_repeat), max(per_repeat)


def _fmt(ratio):
    value, low, high = ratio
    return f"{value:.3f} ({low:.3f}–{high:.3f})"


def _verdict(value, bound) -> str:
    return "**PASS**" if value <= bound else "**FAIL**"


def main_table(results, configs):
    """Markdown rows: every configuration's step times and ratios to plain ``fit``."""
    plain = results["plain"]
    lines = [
        "| configuration | n timed steps | median ms | mean ms | ratio to plain (mean) "
        "| ratio to plain (median) | CPU ms (mean) | CPU ratio (mean) | SAM fraction ζ |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for config in configs:
        runs = results[config.key]
        ms, cpu = _pooled(runs), _pooled(runs, CPU)
        zeta = "–" if runs[0].sam is None else f"{_zeta(runs):.3f}"
        median = "–" if config.mixed else _fmt(_ratio(runs, plain, np.median))
        lines.append(
            f"| {config.label} | {ms.size} | {np.median(ms):.1f} | {ms.mean():.1f} "
            f"| {_fmt(_ratio(runs, plain))} | {median} | {cpu.mean():.1f} "
            f"| {_fmt(_ratio(runs, plain, field=CPU))} | {zeta} |"
        )
    return lines


def kind_table(results, configs):
    """Markdown rows: SAM and non-SAM steps of the mixed policies, against the ERM method."""
    erm, plain = results["erm"], results["plain"]
    lines = [
        "| configuration | n SAM | SAM step ms | SAM / ERM | n non-SAM | non-SAM step ms "
        "| non-SAM / ERM | non-SAM / plain | non-SAM / ERM (CPU) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for config in configs:
        if not config.mixed:
            continue
        runs = results[config.key]
        base = erm if not config.jit_compile else results["plain_xla"]
        base_name = "ERM" if not config.jit_compile else "plain XLA"
        sam = np.concatenate([r.ms[r.sam] for r in runs])
        non = np.concatenate([r.ms[~r.sam] for r in runs])
        sam_ms = f"{sam.mean():.1f}" if sam.size else "–"
        non_ms = f"{non.mean():.1f}" if non.size else "–"
        label = config.label if base is erm else f"{config.label} (vs {base_name})"
        lines.append(
            f"| {label} | {sam.size} | {sam_ms} | {_fmt(_kind_ratio(runs, True, base))} "
            f"| {non.size} | {non_ms} | {_fmt(_kind_ratio(runs, False, base))} "
            f"| {_fmt(_kind_ratio(runs, False, results['plain_xla'] if config.jit_compile else plain))} "
            f"| {_fmt(_kind_ratio(runs, False, base, CPU))} |"
        )
    return lines


def target_table(results):
    """Markdown rows: each target, measured on wall time (the verdict) and on CPU time."""
    plain = results["plain"]
    lines = [
        "| target | wall time: pooled (per-repeat min–max) | verdict "
        "| CPU time: pooled (min–max) | verdict |",
        "|---|---|---|---|---|",
    ]
    for key, bound, name in (
        ("never", NEVER_SAM_TARGET, "never-SAM"),
        ("always", ALWAYS_SAM_TARGET, "always-SAM"),
    ):
        mean, median = _ratio(results[key], plain), _ratio(results[key], plain, np.median)
        cpu = _ratio(results[key], plain, field=CPU)
        lines.append(
            f"| {name} ≤ {bound:.2f}× plain | mean {_fmt(mean)}; median {_fmt(median)} "
            f"| {_verdict(mean[0], bound)} (mean), {_verdict(median[0], bound)} (median) "
            f"| mean {_fmt(cpu)} | {_verdict(cpu[0], bound)} |"
        )
    ae_rows = [("ae_sam", "plain", "AE-SAM")]
    if "ae_sam_xla" in results:
        ae_rows.append(("ae_sam_xla", "plain_xla", "AE-SAM + XLA"))
    for key, base, name in ae_rows:
        zeta = _zeta(results[key])
        wall = _ae_ratio(results[key], results[base])
        cpu = _ae_ratio(results[key], results[base], CPU)
        lines.append(
            f"| {name} mean ≤ (1+ζ)·{AE_SAM_SLACK:.2f}× {base} mean "
            f"(ζ = {zeta:.3f}: ≤ {(1 + zeta) * AE_SAM_SLACK:.3f}×) "
            f"| mean/((1+ζ)·{base}) {_fmt(wall)}; ratio {_fmt(_ratio(results[key], results[base]))} "
            f"| {_verdict(wall[0], AE_SAM_SLACK)} | {_fmt(cpu)} | {_verdict(cpu[0], AE_SAM_SLACK)} |"
        )
    wall = _kind_ratio(results["looksam"], False, results["erm"])
    cpu = _kind_ratio(results["looksam"], False, results["erm"], CPU)
    lines.append(
        f"| LookSAM non-SAM step ≈ ERM step (≤ {LOOKSAM_ERM_TARGET:.2f}× the ERM "
        f"method's mean) | {_fmt(wall)} | {_verdict(wall[0], LOOKSAM_ERM_TARGET)} "
        f"| {_fmt(cpu)} | {_verdict(cpu[0], LOOKSAM_ERM_TARGET)} |"
    )
    wall = _ratio(results["msam"], results["erm"])
    cpu = _ratio(results["msam"], results["erm"], field=CPU)
    lines.append(
        f"| MSAM step ≤ {MSAM_ERM_TARGET:.2f}× the ERM method's mean | {_fmt(wall)} "
        f"| {_verdict(wall[0], MSAM_ERM_TARGET)} | {_fmt(cpu)} | {_verdict(cpu[0], MSAM_ERM_TARGET)} |"
    )
    return lines


def report(results, configs, meta) -> str:
    """The Markdown report: setup, the main table, the step-kind breakdown, the targets."""
    lines = ["# keras_aesam step time", ""]
    lines += [f"- {name}: {value}" for name, value in meta]
    lines += [
        "",
        "Step times are wall times (`time.perf_counter`) between `on_train_batch_begin` "
        "and `on_train_batch_end`; CPU times are this process's CPU time over the same "
        "steps (all threads; less sensitive to other load on the machine). Ratios are "
        "to plain `fit`, pooled over the repeats, with the min–max of the per-repeat "
        "ratios in parentheses. Medians only for configurations whose every step does "
        "the same work; the targets' verdicts use the wall-time means.",
        "",
    ]
    lines += main_table(results, configs)
    lines += ["", "SAM and non-SAM steps of the mixed policies (ratios of means):", ""]
    lines += kind_table(results, configs)
    lines += ["", "Targets:", ""]
    lines += target_table(results)
    lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke check: 2 rounds of 20 steps (< 4 minutes)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per fit (default 30, 20 with --quick)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed first steps of every fit (default 3)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="interleaved rounds over all configurations, >= 2 "
                             "(default 8, 2 with --quick)")
    parser.add_argument("--xla", action="store_true",
                        help="also run plain and AE-SAM with jit_compile=True (slow: "
                             "on CPU an XLA step of this CNN takes seconds)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", help="also write the Markdown report here")
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = 20 if args.quick else 30
    if args.warmup is None:
        args.warmup = 3
    if args.repeats is None:
        args.repeats = 2 if args.quick else 8
    if args.repeats < 2:
        parser.error("--repeats must be at least 2 (a ratio needs its spread)")
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    x, y, source = load_training_arrays(args.seed)
    log(f"data: {source}")
    dataset, num_batches = make_pipeline(x, y, args.batch_size, args.seed)

    keras.utils.set_random_seed(args.seed)
    initial = build_cnn()
    initial_weights = initial.get_weights()
    params = initial.count_params()

    configs = configurations(args.xla)
    log("building and compiling the models …")
    contenders = [
        Contender(c, initial_weights, args.warmup + args.steps, args.seed) for c in configs
    ]
    results = {c.key: [] for c in configs}
    data_ms = []
    for repeat in range(args.repeats):
        tag = f"[repeat {repeat + 1}/{args.repeats}]"
        data_ms.append(data_only_ms(dataset, args.steps))
        log(f"{tag} data-only loop: {data_ms[-1]:.2f} ms/batch")
        for contender in contenders:
            run = contender.fit(dataset, args.warmup, args.steps)
            results[contender.config.key].append(run)
            extra = f", ζ={run.sam.mean():.2f}" if run.sam is not None else ""
            log(
                f"{tag} {contender.config.key}: mean {run.ms.mean():.1f} ms, "
                f"median {np.median(run.ms):.1f} ms{extra} (fit {run.fit_seconds:.1f} s)"
            )

    plain_mean = float(_pooled(results["plain"]).mean())
    meta = [
        ("machine", cpu_model()),
        ("software", f"Python {sys.version.split()[0]}, TensorFlow {tf.__version__}, "
                     f"Keras {keras.__version__}, keras_aesam {keras_aesam.__version__} "
                     f"({library_revision()})"),
        ("network", f"small CNN (2 × conv-BN-ReLU-pool-dropout, dense 64), "
                    f"{params:,} parameters, SGD(0.05, momentum 0.9)"),
        ("data", f"{source}; tf.data cache → shuffle → repeat → prefetch, "
                 f"{num_batches} batches per epoch"),
        ("batch size", str(args.batch_size)),
        ("XLA", "off, plus the `+ XLA` rows with jit_compile=True" if args.xla
         else "off (jit_compile=False)"),
        ("steps", f"{args.warmup} warm-up + {args.steps} timed steps per fit, "
                  f"{args.repeats} interleaved repeats, same initial weights"),
        ("machine load", f"1-minute load average {load_before:.1f} at the start, "
                         f"{os.getloadavg()[0]:.1f} at the end (above {os.cpu_count()}, "
                         "other processes were competing for the CPUs)"),
        ("data-only loop", f"{np.mean(data_ms):.2f} ms per batch "
                           f"({np.mean(data_ms) / plain_mean:.1%} of a plain step)"),
    ]
    text = report(results, configs, meta)
    text += f"\nTotal benchmark time: {time.perf_counter() - started:.0f} s.\n"
    print(text)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
