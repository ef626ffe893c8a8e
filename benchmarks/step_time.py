"""Per-step training time of keras_aesam's models against plain ``keras.Model.fit``.

One process trains one network (``--network``: the 784-512-512-10 MLP or the
small CNN of ``keras_aesam.networks``) on Fashion-MNIST-shaped batches for
every configuration below. The configurations are fitted in interleaved
rounds (each round fits every configuration once, in alternating order:
forwards in even rounds, backwards in odd ones), each fit from the same
initial state:

====================  ==========================================================
plain                 the network compiled and fitted directly
ERM                   ``method="erm"`` (no policy in the graph)
never-SAM             ``ae_sam`` with ``lambda1 = lambda2 = +1e9`` (never fires)
always-SAM            ``ae_sam`` with ``lambda1 = lambda2 = -1e9`` (always fires)
MSAM                  ``method="msam"`` (one pass, at ``w + e`` from the momentum)
guard, read, wait     diagnostics: plain ``fit`` + ERM's finiteness guard alone
                      (read and wait, its two parts, with ``--guard-parts``)
SAM, AE-SAM, …        more methods with ``--all`` (one ``Config`` entry each)
… + XLA               the same with ``jit_compile=True`` (with ``--xla``)
====================  ==========================================================

A figure is the median over rounds of the per-round ratio to plain ``fit``
(the mean step of the configuration over the mean step of plain ``fit`` in the
same round), so slow drift of a shared machine cancels; the min–max over
rounds shows the spread. Both the wall time (``time.perf_counter``) and the
process CPU time (``time.process_time``, all threads) of every step are
taken, between ``on_train_batch_begin`` and ``on_train_batch_end``; the first
``--warmup`` steps of every fit (tracing, compilation) are dropped.

The two-pass limit: a SAM step needs a second forward-backward pass but no
second optimizer update, so if a pass costs ``P`` and the update ``A`` an
always-SAM step costs at least ``(2P + A) / (P + A)`` plain steps. ``P`` and
``A`` are measured in every round as separate ``tf.function`` calls (a
gradient pass; ``optimizer.apply``), less the cost of calling an empty
``tf.function``; the report also gives ``1 + P / plain step``, the cost of a
step that adds exactly one pass to plain ``fit`` (its fixed costs included).

Which steps were SAM steps is read from the per-batch ``sam_fraction`` log, the
running mean over the epoch. The data come from a cached, prefetched
``tf.data`` pipeline; a data-only loop over it is timed in every round.

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
from keras_aesam import networks, recipe  # noqa: E402
from keras_aesam.bench.step_timing import TimedFits  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _step_graph  # noqa: E402

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

#: Targets (ratios to plain ``fit``, batch 128, the MLP): the step's fixed cost.
ERM_TARGET = 1.01
NEVER_SAM_TARGET = 1.03
#: Momentum-SAM's one pass: at most this times the ERM method's step.
MSAM_ERM_TARGET = 1.03


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
# Networks and configurations
# ----------------------------------------------------------------------------
#: ``--network`` choices: the builder and how the report names the network.
NETWORKS = {
    "mlp": (networks.mlp, "784-512-512-10 ReLU MLP (no BatchNorm, no Dropout)"),
    "small_cnn": (networks.small_cnn, "small CNN (2 × conv-BN-ReLU-pool, Dropout, dense 64)"),
}


@dataclasses.dataclass(frozen=True)
class Config:
    """One benchmarked configuration: one row of the report.

    ``make(inner, total_steps)`` returns the model to compile and fit (``inner``
    itself for plain ``fit``); ``base`` is the configuration its ratios are
    taken to; ``mixed`` marks policies that mix ERM and SAM steps;
    a row with a ``group`` runs only with its flag: ``--all`` (``"all"``) or
    ``--guard-parts`` (``"guard_parts"``).
    """

    key: str
    label: str
    make: Callable[[keras.Model, int], keras.Model]
    base: str = "plain"
    mixed: bool = False
    group: Optional[str] = None
    jit_compile: bool = False


def _wrap(method, **hyperparameters):
    return lambda m, t: keras_aesam.wrap(m, method, **hyperparameters)


def _ae_sam(lambdas=None):
    extra = {} if lambdas is None else {"lambda1": lambdas, "lambda2": lambdas}
    return lambda m, t: keras_aesam.wrap(m, "ae_sam", total_steps=t, **extra)


class PartsFit(keras.Model):
    """Plain ``fit`` plus one part of ERM's finiteness guard, nothing else changed:
    diagnostic rows, what each part costs by itself next to ``method="erm"``.

    ``guard``: ``optimizer.apply`` inside a ``tf.cond`` on the finiteness of
    ``Σ g`` (``ops.global_sum``, ERM's check), the whole guard (the update
    waits for the whole gradient and its sum);
    ``read``: ``Σ g`` computed (kept in a variable), the update unconditional;
    ``wait``: a ``tf.cond`` whose predicate waits for every gradient tensor but
    reads none (the loss's finiteness, under a control dependency on ``g``).
    """

    def __init__(self, inner, part):
        super().__init__(inner.inputs, inner.outputs, name=f"{part}_{inner.name}")
        self.part = part
        self.total = keras.Variable(0.0, trainable=False, name="total")

    def train_step(self, data):
        from keras_aesam import _keras_compat as compat, distribution, ops as sam_ops

        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight)
        grads = tape.gradient(loss, self.trainable_variables)
        variables = self.trainable_variables
        if self.part == "guard":
            finite = tf.math.is_finite(sam_ops.global_sum(grads))
            distribution.apply_if(finite, self.optimizer, grads, variables)
        elif self.part == "read":
            self.total.assign(sam_ops.global_sum(grads))
            self.optimizer.apply(grads, variables)
        else:
            with tf.control_dependencies(grads):
                finite = tf.math.is_finite(tf.identity(loss))
            distribution.apply_if(finite, self.optimizer, grads, variables)
        compat.loss_tracker(self).update_state(
            compat.unscale_loss_for_distribution(loss), sample_weight=tf.shape(tf.nest.flatten(x)[0])[0])
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)


def configurations(xla: bool = False, extended: bool = False, guard_parts: bool = False) -> list:
    """The configurations, in the order of an even round (odd rounds reverse it)."""
    rows = [
        Config("plain", "plain `keras.Model.fit`", lambda m, t: m),
        Config("guard", "plain `fit` + the finiteness guard alone (diagnostic)", lambda m, t: PartsFit(m, "guard")),
        Config("read", "plain `fit` + the guard's read of g alone, no cond (diagnostic)",
               lambda m, t: PartsFit(m, "read"), group="guard_parts"),
        Config("wait", "plain `fit` + a cond waiting for all of g, no read (diagnostic)",
               lambda m, t: PartsFit(m, "wait"), group="guard_parts"),
        Config("erm", "ERM (`method=\"erm\"`)", _wrap("erm")),
        Config("never", "never-SAM (`ae_sam`, λ1=λ2=+1e9)", _ae_sam(1e9)),
        Config("always", "always-SAM (`ae_sam`, λ1=λ2=−1e9)", _ae_sam(-1e9)),
        Config("msam", "MSAM (`method=\"msam\"`)", _wrap("msam")),
        Config("sam", "SAM (`method=\"sam\"`)", _wrap("sam"), group="all"),
        Config("ae_sam", "AE-SAM (defaults)", _ae_sam(), mixed=True, group="all"),
        Config("looksam", "LookSAM (k=5)", _wrap("looksam", k=5), mixed=True, group="all"),
        Config("ae_looksam", "AE-LookSAM (defaults)",
               lambda m, t: keras_aesam.wrap(m, "ae_looksam", total_steps=t),
               mixed=True, group="all"),
    ]
    wanted = {None, *(["all"] if extended else []), *(["guard_parts"] if guard_parts else [])}
    rows = [c for c in rows if c.group in wanted]
    if xla:
        rows += [
            dataclasses.replace(
                c, key=f"{c.key}_xla", label=f"{c.label} + XLA", jit_compile=True,
                base="plain_xla",
            )
            for c in rows if c.key in ("plain", "erm", "never", "always", "msam")
        ]
    return rows


# ----------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------
@dataclasses.dataclass
class Run:
    """The timed steps of one fit (warm-up dropped), in milliseconds."""

    ms: np.ndarray
    cpu_ms: np.ndarray  # process CPU time of the same steps
    sam: Optional[np.ndarray]  # bool per timed step, None without sam_fraction


class Contender:
    """One configuration's compiled model, built and compiled once (its
    ``train_function`` traced once per process) and put back to its initial
    state before each fit (:class:`keras_aesam.bench.step_timing.TimedFits`).
    """

    def __init__(self, config: Config, build, initial_weights, total_steps: int, seed: int):
        self.config = config
        keras.utils.set_random_seed(seed)
        inner = build()
        inner.set_weights(initial_weights)
        model = config.make(inner, total_steps)
        recipe.compile_model(model, RECIPE, total_steps, jit_compile=config.jit_compile)
        self.timed = TimedFits(model)
        self.model = model

    def fit(self, dataset, warmup: int, steps: int) -> Run:
        """Reset, then fit ``warmup + steps`` steps and time them."""
        timer = self.timed.fit(dataset, warmup + steps)
        flags = timer.sam[warmup:]
        return Run(
            ms=np.asarray(timer.seconds[warmup:]) * 1000.0,
            cpu_ms=np.asarray(timer.cpu_seconds[warmup:]) * 1000.0,
            sam=None if any(f is None for f in flags) else np.asarray(flags, dtype=bool),
        )


def block_interleaved(contenders, dataset, blocks: int, block_steps: int) -> dict:
    """``{key: (wall ratios, CPU ratios)}`` to plain, one per block round: the
    compiled step alone, called in blocks of ``block_steps`` straight from an
    iterator (no ``fit`` loop, no callbacks), the configurations' blocks
    interleaved in alternating order. A block lasts tens of milliseconds, so
    the machine's drift between the blocks of one round is small; the median
    over many rounds resolves ratios that whole fits, seconds apart, cannot."""
    iterator = iter(dataset)
    functions = {}
    for contender in contenders:
        model = contender.model
        model.make_train_function()  # Keras returns it only once it exists
        functions[contender.config.key] = model.train_function
        for _ in range(3):
            out = functions[contender.config.key](iterator)  # trace and warm up
        tf.nest.map_structure(lambda t: t.numpy(), out)
    seconds = {key: [] for key in functions}
    keys = list(functions)
    for block in range(blocks):
        for key in (keys if block % 2 == 0 else keys[::-1]):
            fn = functions[key]
            cpu, wall = time.process_time(), time.perf_counter()
            for _ in range(block_steps):
                out = fn(iterator)
            tf.nest.map_structure(lambda t: t.numpy(), out)
            seconds[key].append((time.perf_counter() - wall, time.process_time() - cpu))
    seconds = {key: np.array(v) for key, v in seconds.items()}
    bases = {c.config.key: seconds[c.config.base] for c in contenders}  # plain, or plain + XLA
    return {key: (v[:, 0] / bases[key][:, 0], v[:, 1] / bases[key][:, 1], v[:, 0] / block_steps)
            for key, v in seconds.items()}


def block_table(blocked, contenders, blocks: int, block_steps: int) -> list:
    lines = ["", f"The compiled step alone ({blocks} rounds of interleaved blocks of {block_steps} steps, called from "
             "an iterator without `fit`'s loop; median ratio to plain (plain + XLA for the XLA rows) over rounds, "
             "with the 25–75 % range):", "",
             "| configuration | median step, ms | ratio, process CPU time | ratio, wall time |", "|---|---:|---:|---:|"]
    for contender in contenders:
        key = contender.config.key
        if key not in blocked:
            continue
        wall, cpu, step = blocked[key]
        q = lambda v: f"{np.median(v):.3f} ({np.percentile(v, 25):.3f}–{np.percentile(v, 75):.3f})"  # noqa: E731
        lines.append(f"| {contender.config.label} | {1000 * np.median(step):.2f} | {q(cpu)} | {q(wall)} |")
    return lines


class PassCost:
    """The parts of a step, each its own ``tf.function``: a forward-backward
    pass ``P`` (loss and gradient at the current weights, training mode) and
    the optimizer's update ``A``, both less the cost of calling an empty
    ``tf.function``, which a step pays once however much it does."""

    def __init__(self, build, initial_weights, batch, jit_compile: bool):
        model = build()
        model.set_weights(initial_weights)
        recipe.compile_model(model, RECIPE, 1)
        optimizer = model.optimizer
        variables = model.trainable_variables
        optimizer.build(variables)
        x, y = batch
        loss_fn = model.loss

        def grad_pass():
            with tf.GradientTape() as tape:
                loss = loss_fn(y, model(x, training=True))
            return tape.gradient(loss, variables)

        grads = [tf.constant(g) for g in tf.function(grad_pass)()]

        def apply():
            optimizer.apply(grads, variables)
            return tf.constant(0)

        self.functions = {
            "empty": tf.function(lambda: tf.constant(0)),
            "pass": tf.function(grad_pass, jit_compile=jit_compile),
            "apply": tf.function(apply, jit_compile=jit_compile),
        }
        for fn in self.functions.values():
            _ = [fn() for _ in range(3)]  # trace, compile, warm up

    def measure(self, calls: int) -> dict:
        """``{"pass": (wall ms, CPU ms), "apply": …}`` per call, dispatch subtracted."""
        per_call = {}
        for name, fn in self.functions.items():
            cpu, wall = time.process_time(), time.perf_counter()
            for _ in range(calls):
                out = fn()
            tf.nest.map_structure(lambda t: t.numpy(), out)  # the last call has finished
            per_call[name] = np.array(
                [time.perf_counter() - wall, time.process_time() - cpu]
            ) * 1000.0 / calls
        return {k: per_call[k] - per_call["empty"] for k in ("pass", "apply")}


# ----------------------------------------------------------------------------
# Statistics and report
# ----------------------------------------------------------------------------
WALL, CPU = 0, 1


def _step_means(runs, field):
    """The mean step (ms) of each round's fit."""
    return np.array([(r.ms if field == WALL else r.cpu_ms).mean() for r in runs])


def _ratios(results, key, base, field):
    """Per-round ratios of the mean steps of ``key`` and ``base``."""
    return _step_means(results[key], field) / _step_means(results[base], field)


def _fmt(values):
    values = np.asarray(values)
    return f"{np.median(values):.3f} ({values.min():.3f}–{values.max():.3f})"


def _verdict(value, bound) -> str:
    return f"≤ {bound:.2f}: **{'PASS' if value <= bound else 'FAIL'}**"


def _limits(parts, results, base, field):
    """Per-round ``(2P+A)/(P+A)`` and ``1 + P / base step``."""
    p = np.array([round_parts["pass"][field] for round_parts in parts])
    a = np.array([round_parts["apply"][field] for round_parts in parts])
    return (2 * p + a) / (p + a), 1.0 + p / _step_means(results[base], field)


def main_table(results, configs):
    """Markdown rows: each configuration's step and its ratios to its base."""
    lines = [
        "| configuration | median step, ms | ratio, process CPU time | ratio, wall time "
        "| SAM fraction ζ |",
        "|---|---:|---:|---:|---:|",
    ]
    for config in configs:
        runs = results[config.key]
        zeta = "–" if runs[0].sam is None else f"{np.concatenate([r.sam for r in runs]).mean():.3f}"
        median = np.median(np.concatenate([r.ms for r in runs]))
        lines.append(
            f"| {config.label} | {median:.2f} | {_fmt(_ratios(results, config.key, config.base, CPU))} "
            f"| {_fmt(_ratios(results, config.key, config.base, WALL))} | {zeta} |"
        )
    return lines


def limit_rows(parts, results, base, label):
    """Markdown rows: the measured parts of a step and the two-pass limits."""
    lines = []
    for name in ("pass", "apply"):
        cpu = np.array([p[name][CPU] for p in parts])
        wall = np.array([p[name][WALL] for p in parts])
        lines.append(
            f"| {label}: one {'forward-backward pass P' if name == 'pass' else 'optimizer update A'}"
            f" (ms) | {np.median(wall):.2f} | CPU {np.median(cpu):.2f} ms | wall {np.median(wall):.2f} ms | |"
        )
    cpu_limit, cpu_fit = _limits(parts, results, base, CPU)
    wall_limit, wall_fit = _limits(parts, results, base, WALL)
    lines.append(f"| {label}: two-pass limit (2P+A)/(P+A) | | {_fmt(cpu_limit)} | {_fmt(wall_limit)} | |")
    lines.append(f"| {label}: plain step + one pass, 1 + P/plain | | {_fmt(cpu_fit)} | {_fmt(wall_fit)} | |")
    return lines


def kind_table(results, configs):
    """Markdown rows: SAM and non-SAM steps of the mixed policies, to the ERM method."""
    lines = [
        "| configuration | n SAM | SAM step / ERM step | n non-SAM | non-SAM step / ERM step |",
        "|---|---:|---:|---:|---:|",
    ]
    erm = _step_means(results["erm"], WALL)
    for config in configs:
        if not config.mixed:
            continue
        cells = []
        for want in (True, False):
            chosen = [r.ms[r.sam == want] for r in results[config.key]]
            ratios = [c.mean() / e for c, e in zip(chosen, erm) if c.size]
            n = sum(c.size for c in chosen)
            cells += [str(n), _fmt(ratios) if ratios else "–"]
        lines.append(f"| {config.label} | " + " | ".join(cells) + " |")
    return lines


def graph_table(contenders, batch):
    """Markdown rows: what one step executes, counted in its traced graph."""
    lines = [
        "| configuration | step | ops | passes over the gradient for norms and finiteness "
        "| cond predicates (host synchronisations on a GPU) |",
        "|---|---|---:|---:|---:|",
    ]
    graphs = {c.config.key: _step_graph.step_graph(c.model, batch) for c in contenders if not c.config.jit_compile}
    # plain fit's own sums (the loss's, the metrics') are no pass over the gradient
    plain_summed = _step_graph.count_step(graphs["plain"], False).summed_elements
    for contender in contenders:
        config = contender.config
        if config.jit_compile:
            continue
        model = contender.model
        graph = graphs[config.key]
        params = getattr(model, "inner", None) or model
        kinds = {"plain": [False], "guard": [False], "read": [False], "wait": [False], "erm": [False],
                 "never": [False], "always": [True], "msam": [False]}.get(
            config.key, [False, True]
        )
        for sam_step in kinds:
            count = _step_graph.count_step(graph, sam_step)
            kind = "SAM step" if sam_step else ("step" if len(kinds) == 1 else "ERM step")
            reads = (count.squared_elements + count.summed_elements - plain_summed) / params.count_params()
            lines.append(f"| {config.label} | {kind} | {count.ops} | {reads:.2f} | {count.predicates} |")
    return lines


def target_lines(results, blocked=None):
    """The fixed-cost targets, on the CPU-time and the wall-time medians: of the
    compiled step alone when it was measured (it resolves a few percent), else
    of whole fits."""
    def ratio(key, base, field):
        if not blocked:
            return np.median(_ratios(results, key, base, field))
        # blocked[key] = (wall, CPU, step) ratios to plain per round: WALL and CPU index them
        return np.median(blocked[key][field] / (1.0 if base == "plain" else blocked[base][field]))

    source = "the compiled step alone" if blocked else "whole fits"
    lines = [f"(medians of {source})", ""]
    rows = [("erm", "plain", ERM_TARGET), ("never", "plain", NEVER_SAM_TARGET)]
    if "msam" in results:
        rows.append(("msam", "erm", MSAM_ERM_TARGET))
    for key, base, bound in rows:
        cpu, wall = ratio(key, base, CPU), ratio(key, base, WALL)
        name = key if base == "plain" else f"{key} / {base}"
        lines.append(f"- {name}: CPU time {cpu:.3f} {_verdict(cpu, bound)}; "
                     f"wall time {wall:.3f} {_verdict(wall, bound)}")
    return lines


def report(results, configs, parts, meta, graph_lines=(), targets=True, blocked=None) -> str:
    """The Markdown report: setup, the table, the mixed policies' step kinds, the targets."""
    lines = ["# keras_aesam step time", ""]
    lines += [f"- {name}: {value}" for name, value in meta]
    lines += [
        "",
        "Ratios are to plain `fit` (to plain `fit` + XLA for the XLA rows): the median "
        "over rounds of the per-round ratio of mean steps, with the min–max over rounds.",
        "",
    ]
    lines += main_table(results, configs)
    for base, label in (("plain", "no XLA"), ("plain_xla", "XLA")):
        if base in results:
            lines += limit_rows(parts[base], results, base, label)
    if any(c.mixed for c in configs):
        lines += ["", "SAM and non-SAM steps of the mixed policies (wall time):", ""]
        lines += kind_table(results, configs)
    if graph_lines:
        lines += ["", "What one step executes, counted in the traced `train_step` "
                  "(`benchmarks/_step_graph.py`; ops that do work):", ""]
        lines += list(graph_lines)
    if targets:
        lines += ["", "Targets at batch 128 on the MLP (ratios to plain `fit`):", ""]
        lines += target_lines(results, blocked)
    lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--network", choices=sorted(NETWORKS), default="mlp")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--quick", action="store_true",
                        help="smoke check: 2 rounds of 10 timed steps")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per fit (default 80 for the MLP, 30 for the CNN)")
    parser.add_argument("--warmup", type=int, default=5,
                        help="untimed first steps of every fit (default 5)")
    parser.add_argument("--repeats", "--rounds", dest="rounds", type=int, default=None,
                        help="interleaved rounds over all configurations, >= 2 (default 7)")
    parser.add_argument("--all", action="store_true",
                        help="also SAM, AE-SAM, LookSAM and AE-LookSAM with their defaults")
    parser.add_argument("--guard-parts", action="store_true",
                        help="also the finiteness guard's parts alone: its read of g, and a cond waiting for all of g")
    parser.add_argument("--xla", action="store_true",
                        help="also plain, ERM, never- and always-SAM and MSAM with jit_compile=True")
    parser.add_argument("--blocks", type=int, default=None,
                        help="rounds of the compiled-step-alone measurement (default 60; 0: skip)")
    parser.add_argument("--block-steps", type=int, default=20, help="steps per block (default 20)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", help="also write the Markdown report here")
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = 10 if args.quick else (80 if args.network == "mlp" else 30)
    if args.rounds is None:
        args.rounds = 2 if args.quick else 7
    if args.blocks is None:
        args.blocks = 2 if args.quick else 60
    if args.rounds < 2:
        parser.error("--repeats must be at least 2 (a ratio needs its spread)")
    if args.blocks < 0 or args.block_steps < 1:
        parser.error("--blocks must be >= 0 and --block-steps >= 1")
    if args.steps < 1 or args.warmup < 1 or args.batch_size < 1:
        parser.error("--steps, --warmup and --batch-size must be positive")
    if args.output:
        try:  # its folder now, not after minutes of timing
            os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        except OSError as error:
            parser.error(f"--output {args.output}: cannot create its folder ({error.strerror})")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    loads = [os.getloadavg()]
    x, y, source = load_training_arrays(args.seed)
    log(f"data: {source}")
    dataset, num_batches = make_pipeline(x, y, args.batch_size, args.seed)
    batch = next(iter(dataset))

    build, description = NETWORKS[args.network]
    keras.utils.set_random_seed(args.seed)
    initial = build()
    initial_weights = initial.get_weights()
    params = initial.count_params()

    configs = configurations(args.xla, args.all, args.guard_parts)
    log("building and compiling the models …")
    total_steps = args.warmup + args.steps
    contenders = [Contender(c, build, initial_weights, total_steps, args.seed) for c in configs]
    bases = sorted({c.base for c in configs})
    costs = {b: PassCost(build, initial_weights, batch, jit_compile=b.endswith("_xla")) for b in bases}
    results = {c.key: [] for c in configs}
    parts = {b: [] for b in bases}
    data_ms = []
    for round_index in range(args.rounds):
        tag = f"[round {round_index + 1}/{args.rounds}]"
        data_ms.append(data_only_ms(dataset, args.steps))
        order = contenders if round_index % 2 == 0 else contenders[::-1]
        for contender in order:
            run = contender.fit(dataset, args.warmup, args.steps)
            results[contender.config.key].append(run)
            extra = f", ζ={run.sam.mean():.2f}" if run.sam is not None else ""
            log(f"{tag} {contender.config.key}: mean {run.ms.mean():.2f} ms, "
                f"CPU {run.cpu_ms.mean():.2f} ms{extra}")
        for base, cost in costs.items():
            parts[base].append(cost.measure(args.steps))
            log(f"{tag} {base} parts: pass {parts[base][-1]['pass'][WALL]:.2f} ms, "
                f"apply {parts[base][-1]['apply'][WALL]:.2f} ms")
        loads.append(os.getloadavg())

    plain_mean = float(np.mean(_step_means(results["plain"], WALL)))
    one_minute = [load[0] for load in loads]
    meta = [
        ("command", "python benchmarks/step_time.py " + " ".join(sys.argv[1:] if argv is None else argv)),
        ("machine", cpu_model()),
        ("software", f"Python {sys.version.split()[0]}, TensorFlow {tf.__version__}, "
                     f"Keras {keras.__version__}, keras_aesam {keras_aesam.__version__} "
                     f"({library_revision()})"),
        ("network", f"{description}, {params:,} parameters, SGD(0.05, momentum 0.9)"),
        ("data", f"{source}; tf.data cache → shuffle → repeat → prefetch, "
                 f"{num_batches} batches per epoch"),
        ("batch size", str(args.batch_size)),
        ("steps", f"{args.warmup} warm-up + {args.steps} timed steps per fit, "
                  f"{args.rounds} interleaved rounds in alternating order, same initial state"),
        ("machine load", f"1-minute load average {one_minute[0]:.2f} at the start, "
                         f"{min(one_minute):.2f}–{max(one_minute):.2f} over the rounds, "
                         f"{one_minute[-1]:.2f} at the end; {os.cpu_count()} logical CPUs"),
        ("data-only loop", f"{np.mean(data_ms):.2f} ms per batch "
                           f"({np.mean(data_ms) / plain_mean:.1%} of a plain step)"),
    ]
    blocked = block_interleaved(contenders, dataset, args.blocks, args.block_steps) if args.blocks else {}
    targets = args.network == "mlp" and args.batch_size == 128
    text = report(results, configs, parts, meta, graph_table(contenders, batch), targets, blocked)
    if blocked:
        text += "\n".join(block_table(blocked, contenders, args.blocks, args.block_steps)) + "\n"
    text += f"\nTotal benchmark time: {time.perf_counter() - started:.0f} s.\n"
    print(text)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
