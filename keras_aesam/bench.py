"""``keras-aesam bench``: the paper's comparison, side by side, with its report.

Runs a list of methods on identical data, network, initial weights and seeds,
one after another in one process family, and writes into an output directory::

    OUT/bench.json           the plan: command, configuration, runs, machine, versions
    OUT/runs/<run id>.json   one file per finished run, written as soon as it finishes
    OUT/results.csv          every run, one row each
    OUT/report.md            the tables, paired t-tests, peer row, claims check
    OUT/accuracy_vs_sam.png  test accuracy against %SAM, per method (error bars: std over seeds)
    OUT/time_per_epoch.png   seconds per epoch and the step-time ratio to ERM against (1 + ζ)
    OUT/init/                the initial weights of every seed (shared by all methods)
    OUT/logs/                the worker processes' output
    OUT/framework_probe.md   with ``--framework-probe``: Keras 3 vs tf_keras step cost

How it runs. For every setting (label-noise rate) and seed, all methods run one after
another in a fresh worker process (``--isolation group``; ``run`` gives every run its
own process, ``none`` runs in this process). The network is built once per seed and
its weights saved; every method of that seed loads them. The data pipeline is rebuilt
for each run with the same seed, so every method sees the same batches in the same
order. The peer row (Keras 2's ``tf_keras.models.experimental.SharpnessAwareMinimization``)
runs in its own process on the same ``tf.data`` pipeline (from
:mod:`keras_aesam.data`), the same architecture rebuilt in ``tf_keras`` with the same
initial weights (checked by comparing the logits of a probe batch), the same optimizer
and schedule.

The training set is fed as ``train.repeat()`` with ``steps_per_epoch`` (the same
batches, epoch by epoch): Keras 3 otherwise creates a new ``tf.data`` iterator every
epoch, which on the loaded reference machine now and then stalled 1-5 s before an
epoch's first step and would have landed in the epoch times.

Timing follows the project's benchmarking notes (docs/benchmarking.md): every step
is timed between ``on_train_batch_begin`` and ``on_train_batch_end``, in wall time
(``time.perf_counter``) and in CPU time of the process (``time.process_time``, all
threads; other jobs on a shared machine disturb it far less than wall time); the
first epoch (tracing, cache filling) is reported separately and left out of the
per-epoch and per-step means; ratios to ERM are taken within one (setting, seed)
group, whose runs ran back to back, and their spread over seeds is reported.

Resume. A finished run's result is on disk before the next run starts; running the
same command again (or with ``--resume``) skips every finished run, and ``--fresh``
starts over. An interrupted bench writes a partial report of what finished.

Weight decay (one choice for every method and the peer): decoupled, Keras's
``SGD(weight_decay=1e-3)`` (``w -= lr·1e-3·w`` each step). At momentum 0.9 this
shrinks the weights by about the same amount per step as the paper's PyTorch
``SGD(weight_decay=1e-4)`` (coupled: ``lr·1e-4/(1-0.9)``), and, like the PyTorch
SAM code the paper builds on, it stays out of ``g``, ``‖g‖²`` and the perturbation.
``--weight-decay-mode l2`` uses an L2 kernel regularizer of ``weight_decay/2``
instead (inside ``g``; see "Weight decay" in docs/design.md).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import hashlib
import importlib.util
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
from keras_aesam.validation import canonical_name as _canonical

__all__ = [
    "ALL_METHODS",
    "PROFILES",
    "BadInput",
    "aggregate",
    "build_parser",
    "check_budget",
    "estimate_seconds",
    "main",
    "paired_difference",
    "paired_tests",
    "resolve",
    "run_bench",
    "time_ratios",
    "write_report",
]

#: The seven methods, in the paper's order of presentation.
ALL_METHODS = ("erm", "sam", "esam", "ss_sam", "looksam", "ae_sam", "ae_looksam")
PEER_METHOD = "peer_tf_keras_sam"
#: A diagnostic variant of the peer: its first pass in training mode as well.
PEER_TRAIN_MODE = "peer_tf_keras_sam_train_mode"
PEER_METHODS = (PEER_METHOD, PEER_TRAIN_MODE)
PEER_REQUIREMENT = "tf-keras==2.21.0"

#: Settings shared by every profile (the paper's §4.1 optimizer, scaled to a 2-core CPU).
COMMON = {
    "dataset": "fashion_mnist",
    "network": "resnet8",
    "batch_size": 128,
    "lr": 0.1,
    "momentum": 0.9,
    "weight_decay": 1e-3,
    "weight_decay_mode": "decoupled",
    "schedule": "cosine",
    "rho": 0.05,
    "validation_fraction": 0.1,
    "test_batches": None,
}

#: Profiles: what runs by default, and the time it must fit in (minutes) on the
#: reference machine (2 shared cores; see ``REFERENCE_STEP_SECONDS``).
PROFILES = {
    "quick": {
        "methods": ("erm", "sam", "ss_sam", "ae_sam"),
        "seeds": 2,
        "epochs": 2,
        "train_size": 1024,
        "noise": (0.0,),
        "budget_minutes": 10.0,
    },
    "standard": {
        "methods": ALL_METHODS,
        "seeds": 3,
        "epochs": 4,
        "train_size": 3072,
        "noise": (0.0, 0.4, 0.8),
        "budget_minutes": 90.0,
    },
}

#: The paper's §4.3 settings for label noise (applied when the noise rate is > 0,
#: unless the flag is given explicitly).
NOISY_HYPERPARAMETERS = {
    "looksam": {"k": 2},
    "ae_sam": {"lambda1": -1.0, "lambda2": 1.0},
    "ae_looksam": {"lambda1": -1.0, "lambda2": 1.0},
}

#: (name, flag, type) of the method hyperparameters the bench passes through.
HYPERPARAMETER_FLAGS = (
    ("rho", "--rho", float),
    ("lambda1", "--lambda1", float),
    ("lambda2", "--lambda2", float),
    ("delta", "--delta", float),
    ("p", "--p", float),
    ("k", "--k", int),
    ("alpha", "--alpha", float),
    ("beta", "--beta", float),
    ("gamma", "--gamma", float),
)

#: Seconds per training step (ERM, batch 128) measured on the reference machine, an
#: Intel Xeon @ 2.50GHz VM with 2 cores shared with other jobs (load average 4-6):
#: the budget check's cost model. Other networks get a conservative guess.
REFERENCE_STEP_SECONDS = {
    "resnet8": 0.30,
    "resnet14": 0.47,
    "resnet20": 0.84,
    "small_cnn": 0.13,
    "resnet32": 1.4,
}
UNKNOWN_NETWORK_STEP_SECONDS = 2.0
#: Per run: data pipeline, network build, tracing of both branches.
RUN_OVERHEAD_SECONDS = 20.0
#: Per worker process: importing TensorFlow and Keras.
PROCESS_OVERHEAD_SECONDS = 15.0
#: A forward pass costs about a third of a forward-backward pass (the cost model
#: behind ESAM's extra forward pass and the evaluation time).
FORWARD_COST = 1.0 / 3.0


class BadInput(Exception):
    """A user error found before anything runs: reported like argparse errors."""


# ------------------------------------------------------------------ networks


def _resnet_cifar(K, blocks, *, num_classes=10, input_shape=(28, 28, 1), kernel_regularizer=None,
                  widths=(16, 32, 64), name="resnet", bn_options=None):
    """A CIFAR-style ResNet (He et al., 2016) from the layers of ``K`` (``keras`` or ``tf_keras``).

    3x3 stem, three stages of ``blocks`` post-activation BasicBlocks (16/32/64
    channels, stride 2 between stages), 1x1 projection shortcuts where the shape
    changes (plain layers, so the same graph can be rebuilt in ``tf_keras``),
    BatchNorm with PyTorch's defaults (momentum 0.1, eps 1e-5, as in
    :mod:`keras_aesam.networks`), global average pooling and a dense layer
    giving logits. Depth ``6·blocks + 2``.
    """
    layers = K.layers
    reg = kernel_regularizer

    def conv(filters, size, stride, layer_name):
        return layers.Conv2D(filters, size, strides=stride, padding="same", use_bias=False,
                             kernel_initializer="he_normal", kernel_regularizer=reg() if reg else None,
                             name=layer_name)

    def bn(layer_name):
        return layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=layer_name, **(bn_options or {}))

    inputs = K.Input(shape=tuple(input_shape), name="images")
    x = conv(widths[0], 3, 1, "stem_conv")(inputs)
    x = layers.ReLU(name="stem_relu")(bn("stem_bn")(x))
    for stage, filters in enumerate(widths):
        for block in range(blocks):
            stride = 2 if (block == 0 and stage > 0) else 1
            prefix = f"stage{stage + 1}_block{block + 1}"
            shortcut = x
            if stride != 1 or x.shape[-1] != filters:
                shortcut = bn(f"{prefix}_proj_bn")(conv(filters, 1, stride, f"{prefix}_proj")(x))
            y = conv(filters, 3, stride, f"{prefix}_conv1")(x)
            y = layers.ReLU(name=f"{prefix}_relu1")(bn(f"{prefix}_bn1")(y))
            y = bn(f"{prefix}_bn2")(conv(filters, 3, 1, f"{prefix}_conv2")(y))
            x = layers.ReLU(name=f"{prefix}_out")(layers.Add(name=f"{prefix}_add")([y, shortcut]))
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = layers.Dense(num_classes, kernel_regularizer=reg() if reg else None, name="logits")(x)
    return K.Model(inputs, outputs, name=name)


#: Networks defined here, buildable in Keras 3 and in tf_keras (so the peer can run them).
BENCH_NETWORKS = {
    "resnet8": lambda K, **kw: _resnet_cifar(K, 1, name="resnet8", **kw),
    "resnet14": lambda K, **kw: _resnet_cifar(K, 2, name="resnet14", **kw),
    "resnet20": lambda K, **kw: _resnet_cifar(K, 3, name="resnet20", **kw),
}




def _network_names():
    from keras_aesam.networks import NETWORKS

    return sorted(set(BENCH_NETWORKS) | set(NETWORKS))


def build_network(K, name, *, num_classes, input_shape, weight_decay=0.0, weight_decay_mode="decoupled",
                  **options):
    """The network ``name`` in framework ``K``; an L2 regularizer of ``weight_decay/2`` in ``l2`` mode."""
    reg = None
    if weight_decay > 0 and weight_decay_mode == "l2":
        reg = lambda: K.regularizers.L2(weight_decay / 2.0)  # noqa: E731
    if name in BENCH_NETWORKS:
        return BENCH_NETWORKS[name](K, num_classes=num_classes, input_shape=input_shape, kernel_regularizer=reg,
                                    **options)
    import keras

    if K is not keras:
        raise ValueError(f"network {name!r} has no tf_keras twin; the peer row needs one of {sorted(BENCH_NETWORKS)}")
    from keras_aesam.networks import get_network

    return get_network(name, num_classes=num_classes, input_shape=input_shape,
                       kernel_regularizer=reg() if reg else None)


# --------------------------------------------------------------------- parser

_EPILOG = """\
profiles (flags override them; --budget-minutes 0 turns the time check off):
  quick     erm, sam, ss_sam, ae_sam; 2 seeds; 1024 training examples; 2 epochs; clean
            labels; the peer row when tf_keras is installed. Under 10 minutes.
  standard  all seven methods; 3 seeds; 3072 training examples; 4 epochs; clean labels and
            40 %% / 80 %% label noise (there LookSAM k=2, AE-SAM and AE-LookSAM
            lambda1=-1, lambda2=1, as the paper's section 4.3); the peer row on clean
            labels. Under 90 minutes.
Both: Fashion-MNIST, a CIFAR-style ResNet-8 (78 k parameters), batch 128, SGD momentum
0.9, lr 0.1 with a cosine schedule to 0, rho 0.05, decoupled weight decay 1e-3 (about
PyTorch's coupled 1e-4 at momentum 0.9; outside g, the same for every method).

examples:
  keras-aesam bench                                   # quick, into bench_results/quick
  keras-aesam bench --profile standard --output docs/results/fashion_mnist_standard
  keras-aesam bench --profile standard --seeds 5 --epochs 10 --budget-minutes 0
  keras-aesam bench --methods erm,sam,ae_sam --noise 0,0.4 --seeds 3 --output runs/bench
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keras-aesam bench",
        description="Run methods side by side (same data, network, initial weights and seeds) and "
        "write a Markdown report, a CSV of every run and plots.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = parser.add_argument_group("what runs")
    g.add_argument("--profile", choices=sorted(PROFILES) + [NOISY_LABELS_PROFILE], default="quick",
                   help="default %(default)s; noisy-labels is the evidence profile, with flags of its own "
                        "(keras-aesam bench --profile noisy-labels --help)")
    g.add_argument("--methods", default=None,
                   help=f"comma-separated, or 'all' ({', '.join(ALL_METHODS)}); default: the profile's")
    g.add_argument("--seeds", type=int, default=None, help="number of seeds (default: the profile's)")
    g.add_argument("--first-seed", type=int, default=0, help="seeds are first-seed, first-seed+1, … (default 0)")
    g.add_argument("--noise", default=None,
                   help="comma-separated label-noise rates in [0, 1), e.g. 0,0.4,0.8 (default: the profile's)")
    g.add_argument("--epochs", type=int, default=None, help="default: the profile's")
    g.add_argument("--train-size", default=None,
                   help="training examples kept after the validation split, or 'all' (default: the profile's)")
    g.add_argument("--dataset", default=None, help=f"default {COMMON['dataset']}")
    g.add_argument("--network", default=None,
                   help=f"default {COMMON['network']}; resnet8/14/20 are defined here (and in tf_keras "
                   "for the peer row), the others come from keras_aesam.networks")
    g.add_argument("--test-batches", type=int, default=None,
                   help="evaluate on the first N test batches only (default: the whole test set)")
    o = parser.add_argument_group("optimizer (the same for every method)")
    o.add_argument("--batch-size", type=int, default=None, help=f"default {COMMON['batch_size']}")
    o.add_argument("--lr", type=float, default=None, help=f"initial learning rate (default {COMMON['lr']})")
    o.add_argument("--momentum", type=float, default=None, help=f"default {COMMON['momentum']}")
    o.add_argument("--weight-decay", type=float, default=None, help=f"default {COMMON['weight_decay']}")
    o.add_argument("--weight-decay-mode", choices=("decoupled", "l2"), default=None,
                   help=f"default {COMMON['weight_decay_mode']} (see the module docstring)")
    h = parser.add_argument_group("method hyperparameters (to every method that takes them; paper defaults)")
    for name, flag, kind in HYPERPARAMETER_FLAGS:
        h.add_argument(flag, dest=name, type=kind, default=None)
    r = parser.add_argument_group("running")
    r.add_argument("--output", "-o", default=None, help="output directory (default bench_results/<profile>)")
    mode = r.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="skip finished runs (the default when the output directory has results)")
    mode.add_argument("--fresh", action="store_true", help="delete the previous results in --output first")
    r.add_argument("--peer", action=argparse.BooleanOptionalAction, default=None,
                   help=f"the Keras 2 SAM peer row (default: on when tf_keras is installed: pip install "
                   f"'{PEER_REQUIREMENT}')")
    r.add_argument("--peer-diagnostic", action="store_true",
                   help="also run the peer with training=True on its first pass (which of its differences "
                   "moves the accuracy)")
    r.add_argument("--isolation", choices=("group", "run", "none"), default="group",
                   help="a worker process per (setting, seed) group (default), per run, or none")
    r.add_argument("--budget-minutes", type=float, default=None,
                   help="refuse plans estimated to take longer (default: the profile's; 0 = no check)")
    r.add_argument("--dry-run", action="store_true", help="print the plan and its time estimate, run nothing")
    r.add_argument("--report-only", action="store_true", help="rewrite the report from the results in --output")
    r.add_argument("--framework-probe", action="store_true",
                   help="time one network in Keras 3 and tf_keras, with and without SAM, interleaved in one "
                   "process (why the peer's step costs what it does); writes OUT/framework_probe.md")
    r.add_argument("--probe-repeats", type=int, default=5, help="rounds of the framework probe (default 5)")
    r.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser


# ------------------------------------------------------------------ resolving


def _parse_methods(text, default):
    from keras_aesam import METHODS

    if text is None:
        return list(default)
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if not parts:
        raise BadInput(f"--methods is empty; give one or more of {', '.join(METHODS)} (or 'all')")
    if len(parts) == 1 and parts[0].lower() == "all":
        return list(ALL_METHODS)
    chosen, unknown = [], []
    for part in parts:
        match = [m for m in METHODS if _canonical(m) == _canonical(part)]
        if not match:
            unknown.append(part)
        elif match[0] not in chosen:
            chosen.append(match[0])
    if unknown:
        raise BadInput(f"unknown method(s) {', '.join(repr(u) for u in unknown)}; valid methods: "
                       f"{', '.join(METHODS)}")
    return chosen


def _parse_noise(text, default):
    if text is None:
        return list(default)
    values = []
    for part in str(text).split(","):
        if not part.strip():
            continue
        try:
            value = float(part)
        except ValueError:
            raise BadInput(f"--noise must be comma-separated numbers in [0, 1), got {text!r}")
        if not 0.0 <= value < 1.0:
            raise BadInput(f"--noise rates must be in [0, 1), got {value:g}")
        if value not in values:
            values.append(value)
    if not values:
        raise BadInput("--noise is empty; give at least one rate, e.g. 0 or 0,0.4,0.8")
    return values


def setting_label(noise) -> str:
    """``clean`` for no label noise, ``noise40`` for 40 %."""
    return "clean" if noise == 0 else f"noise{100 * noise:g}".replace(".", "p")


def _spec_hash(spec) -> str:
    payload = {k: v for k, v in spec.items() if k not in ("run_id", "index")}
    return hashlib.sha1(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _peer_available():
    return importlib.util.find_spec("tf_keras") is not None


def resolve(args) -> dict:
    """Checks every argument and returns the plan (no TensorFlow work, no files written)."""
    from keras_aesam import build_method, method_parameters
    from keras_aesam.data import DATASETS

    profile = PROFILES[args.profile]
    methods = _parse_methods(args.methods, profile["methods"])
    noise = _parse_noise(args.noise, profile["noise"])
    seeds_n = profile["seeds"] if args.seeds is None else args.seeds
    if seeds_n < 1:
        raise BadInput(f"--seeds must be >= 1, got {seeds_n}")
    if args.first_seed < 0:
        raise BadInput(f"--first-seed must be >= 0, got {args.first_seed}")
    seeds = list(range(args.first_seed, args.first_seed + seeds_n))

    config = dict(COMMON)
    for key in ("dataset", "network", "batch_size", "lr", "momentum", "weight_decay", "weight_decay_mode",
                "test_batches"):
        value = getattr(args, key)
        if value is not None:
            config[key] = value
    config["epochs"] = profile["epochs"] if args.epochs is None else args.epochs
    train_size = profile["train_size"] if args.train_size is None else args.train_size
    if str(train_size).lower() in ("all", "none", "full"):
        train_size = None
    else:
        try:
            train_size = int(train_size)
        except ValueError:
            raise BadInput(f"--train-size must be an integer >= 1 or 'all', got {train_size!r}")
        if train_size < 1:
            raise BadInput(f"--train-size must be >= 1 or 'all', got {train_size}")
    config["train_size"] = train_size

    datasets = [d for d in DATASETS if _canonical(d) == _canonical(config["dataset"])]
    if not datasets:
        raise BadInput(f"unknown dataset {config['dataset']!r}; valid datasets: {', '.join(sorted(DATASETS))}")
    config["dataset"] = datasets[0]
    networks = [n for n in _network_names() if _canonical(n) == _canonical(config["network"])]
    if not networks:
        raise BadInput(f"unknown network {config['network']!r}; valid networks: {', '.join(_network_names())}")
    config["network"] = networks[0]
    if config["epochs"] < 1:
        raise BadInput(f"--epochs must be >= 1, got {config['epochs']}")
    if config["batch_size"] < 1:
        raise BadInput(f"--batch-size must be >= 1, got {config['batch_size']}")
    if not (config["lr"] > 0 and math.isfinite(config["lr"])):
        raise BadInput(f"--lr must be > 0, got {config['lr']:g}")
    if not 0.0 <= config["momentum"] < 1.0:
        raise BadInput(f"--momentum must be in [0, 1), got {config['momentum']:g}")
    if not (config["weight_decay"] >= 0 and math.isfinite(config["weight_decay"])):
        raise BadInput(f"--weight-decay must be >= 0, got {config['weight_decay']:g}")
    if config["test_batches"] is not None and config["test_batches"] < 1:
        raise BadInput(f"--test-batches must be >= 1, got {config['test_batches']}")

    # Method hyperparameters: the user's flags go to every method that takes them.
    given = {name: getattr(args, name) for name, _, _ in HYPERPARAMETER_FLAGS if getattr(args, name) is not None}
    config["rho"] = given.get("rho", COMMON["rho"])
    takers = {name: [m for m in methods if name in method_parameters(m)] for name in given}
    unused = [flag for name, flag, _ in HYPERPARAMETER_FLAGS if name in given and not takers[name]]
    if unused:
        raise BadInput(f"{', '.join(unused)}: none of the methods {', '.join(methods)} takes it")

    runs = []
    for rate in noise:
        label = setting_label(rate)
        for seed in seeds:
            for method in methods:
                hp = {"rho": config["rho"]}
                if rate > 0:
                    hp.update(NOISY_HYPERPARAMETERS.get(method, {}))
                hp.update({k: v for k, v in given.items() if k in method_parameters(method)})
                if "seed" in method_parameters(method):
                    hp["seed"] = seed
                try:
                    build_method(method, **hp)
                except (ValueError, TypeError) as err:
                    raise BadInput(f"invalid hyperparameter for {method}: {' '.join(str(err).split())}")
                runs.append(dict(run_id=f"{label}_s{seed}_{method}", kind="method", method=method,
                                 setting=label, noise=rate, seed=seed, hyperparameters=hp, **config))

    peer = args.peer
    peer_note = None
    if peer is None:
        peer = _peer_available() and config["network"] in BENCH_NETWORKS
        if not _peer_available():
            peer_note = f"tf_keras is not installed (pip install '{PEER_REQUIREMENT}')"
        elif config["network"] not in BENCH_NETWORKS:
            peer_note = f"network {config['network']!r} has no tf_keras twin here"
    elif peer:
        if not _peer_available():
            raise BadInput(f"--peer needs tf_keras: pip install '{PEER_REQUIREMENT}'")
        if config["network"] not in BENCH_NETWORKS:
            raise BadInput(f"--peer needs a network with a tf_keras twin: {', '.join(sorted(BENCH_NETWORKS))}")
    if getattr(args, "peer_diagnostic", False) and not peer:
        raise BadInput("--peer-diagnostic needs the peer row (tf_keras installed, a network with a tf_keras twin)")
    if peer:
        rate = noise[0]
        label = setting_label(rate)
        peer_methods = PEER_METHODS if getattr(args, "peer_diagnostic", False) else (PEER_METHOD,)
        for seed in seeds:
            for peer_method in peer_methods:
                runs.append(dict(run_id=f"{label}_s{seed}_{peer_method}", kind="peer", method=peer_method,
                                 setting=label, noise=rate, seed=seed, hyperparameters={"rho": config["rho"]},
                                 **config))
    # Order: setting, seed, then the methods and the peer (interleaved across seeds).
    order = {(setting_label(r), s): i for i, (r, s) in enumerate((r, s) for r in noise for s in seeds)}
    runs.sort(key=lambda spec: (order[(spec["setting"], spec["seed"])], spec["kind"] == "peer"))
    for index, spec in enumerate(runs):
        spec["index"] = index
        spec["spec_hash"] = _spec_hash(spec)

    budget = profile["budget_minutes"] if args.budget_minutes is None else args.budget_minutes
    if budget < 0:
        raise BadInput(f"--budget-minutes must be >= 0, got {budget:g}")
    output = Path(args.output) if args.output else Path("bench_results") / args.profile
    if output.exists() and not output.is_dir():
        raise BadInput(f"--output {str(output)!r} is a file")
    return {
        "profile": args.profile,
        "config": config,
        "methods": methods,
        "noise": noise,
        "seeds": seeds,
        "peer": bool(peer),
        "peer_note": peer_note,
        "runs": runs,
        "budget_minutes": budget,
        "isolation": args.isolation,
        "output": output,
    }


# ------------------------------------------------------------ time estimates


def _train_examples(config):
    """Training examples after the split (Fashion-MNIST: 60 000 · (1 - validation_fraction))."""
    pool = {"fashion_mnist": 60000, "cifar10": 50000, "cifar100": 50000}.get(config["dataset"], 1_281_167)
    pool = int(round(pool * (1 - config["validation_fraction"])))
    return pool if config["train_size"] is None else min(config["train_size"], pool)


def _cost_per_step(method, hp, batch_size=128, expected_fraction=None):
    """Forward-backward passes per step, expected (ESAM: 1 + a forward + ⌈γB⌉/B)."""
    if method in PEER_METHODS:
        return 2.0
    if method == "esam":
        return 1.0 + FORWARD_COST + math.ceil(hp.get("gamma", 0.5) * batch_size) / batch_size
    if expected_fraction is None:
        expected_fraction = {"erm": 0.0, "sam": 1.0, "ss_sam": hp.get("p", 0.5),
                             "looksam": 1.0 / hp.get("k", 5)}.get(method)
    if expected_fraction is None:  # adaptive: the policy's expectation under normal ‖g‖²
        from keras_aesam import build_method

        policy, _ = build_method(method, **hp)
        expected_fraction = policy.expected_sam_fraction(1000) or 0.5
    return 1.0 + expected_fraction


def estimate_seconds(runs, isolation="group") -> float:
    """Wall time of ``runs`` on the reference machine (2 shared cores), from the cost model."""
    total = 0.0
    groups = set()
    for spec in runs:
        step = REFERENCE_STEP_SECONDS.get(spec["network"], UNKNOWN_NETWORK_STEP_SECONDS)
        step *= spec["batch_size"] / 128.0
        steps = math.ceil(_train_examples(spec) / spec["batch_size"]) * spec["epochs"]
        test_batches = math.ceil(10000 / spec["batch_size"])
        if spec["test_batches"]:
            test_batches = min(test_batches, spec["test_batches"])
        cost = _cost_per_step(spec["method"], spec["hyperparameters"], spec["batch_size"])
        total += RUN_OVERHEAD_SECONDS + steps * step * cost + test_batches * step * FORWARD_COST
        if isolation == "run" or spec["kind"] == "peer":
            groups.add(spec["run_id"])
        elif isolation == "group":
            groups.add((spec["setting"], spec["seed"]))
    return total + PROCESS_OVERHEAD_SECONDS * len(groups)


def check_budget(plan) -> float:
    """The plan's estimated seconds; BadInput if it exceeds the budget (0 = no check)."""
    seconds = estimate_seconds(plan["runs"], plan["isolation"])
    budget = plan["budget_minutes"]
    if budget and seconds > 60.0 * budget:
        per_seed = seconds / max(1, len(plan["seeds"]))
        fits = int((60.0 * budget) // per_seed) if per_seed > 0 else 0
        raise BadInput(
            f"profile {plan['profile']!r} must finish within {budget:g} minutes, but "
            f"{len(plan['runs'])} runs ({len(plan['methods'])} methods x {len(plan['seeds'])} seeds x "
            f"{len(plan['noise'])} settings{' + peer' if plan['peer'] else ''}, {plan['config']['epochs']} "
            f"epochs of {_train_examples(plan['config'])} examples) are estimated at "
            f"{seconds / 60:.0f} minutes on the reference machine (2 shared cores); at most {fits} "
            f"seed(s) fit. Use fewer --seeds/--methods/--epochs, or --budget-minutes N (0 = no check) "
            "to run it anyway."
        )
    return seconds


# ------------------------------------------------------------------ the runs


def _write_json(path, payload):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, default=_json_default)
        f.write("\n")
    os.replace(tmp, path)


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return str(value)


def _result_path(out, spec):
    return Path(out) / "runs" / f"{spec['run_id']}.json"


def finished_result(out, spec) -> Optional[dict]:
    """The stored result of ``spec`` if it finished with the same configuration, else None.

    A result of the same run id but another configuration is an error: the output
    directory belongs to a different bench (use another --output or --fresh).
    """
    path = _result_path(out, spec)
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # a torn file: run again
    if result.get("spec_hash") != spec["spec_hash"]:
        old = result.get("spec", {})
        diff = sorted(k for k in set(old) | set(spec) if k not in ("index", "spec_hash")
                      and old.get(k) != spec.get(k))
        raise BadInput(
            f"{str(Path(out))!r} holds a result of run {spec['run_id']!r} with another configuration "
            f"(differs in: {', '.join(diff) or 'unknown'}); use another --output, or --fresh to discard it"
        )
    return result


def _machine():
    model = None
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    if model is None:
        model = platform.processor() or platform.machine()
    return {"cpu": model, "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "hostname": platform.node()}


def _versions():
    import importlib.metadata as md

    versions = {}
    for package in ("keras-aesam", "tensorflow", "keras", "numpy", "scipy", "matplotlib", "tf-keras"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            versions[package] = None
    import keras_aesam

    versions["keras_aesam.__version__"] = keras_aesam.__version__
    return versions


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _make_timer(K):
    """A callback timing every step and epoch (for ``keras`` or ``tf_keras``).

    Wall time with ``time.perf_counter``; CPU time of the whole process (all
    threads) with ``time.process_time``, which other jobs on the machine disturb
    much less than wall time.
    """

    class StepTimer(K.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.epoch_seconds = []
            self.step_seconds = []
            self.step_cpu_seconds = []

        def on_epoch_begin(self, epoch, logs=None):
            self.step_seconds.append([])
            self.step_cpu_seconds.append([])
            self._epoch_start = time.perf_counter()

        def on_train_batch_begin(self, batch, logs=None):
            self._step_cpu_start = time.process_time()
            self._step_start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.step_seconds[-1].append(time.perf_counter() - self._step_start)
            self.step_cpu_seconds[-1].append(time.process_time() - self._step_cpu_start)

        def on_epoch_end(self, epoch, logs=None):
            self.epoch_seconds.append(time.perf_counter() - self._epoch_start)

    return StepTimer()


def _timing(timer):
    """Epoch and step times with the first epoch reported apart (tracing, cache filling).

    With one epoch only, the step mean leaves out the first 5 steps instead.
    """
    epochs = timer.epoch_seconds
    steps = timer.step_seconds
    if len(epochs) > 1:
        later = [s for epoch in steps[1:] for s in epoch]
        later_cpu = [s for epoch in timer.step_cpu_seconds[1:] for s in epoch]
        epoch_mean = float(np.mean(epochs[1:]))
    else:
        later = [s for epoch in steps for s in epoch][5:]
        later_cpu = [s for epoch in timer.step_cpu_seconds for s in epoch][5:]
        epoch_mean = None
    return {
        "epoch_seconds": [round(e, 4) for e in epochs],
        "first_epoch_seconds": round(epochs[0], 4) if epochs else None,
        "epoch_seconds_after_first": None if epoch_mean is None else round(epoch_mean, 4),
        "step_ms": round(1000 * float(np.mean(later)), 3) if later else None,
        "step_cpu_ms": round(1000 * float(np.mean(later_cpu)), 3) if later_cpu else None,
        "step_ms_first_epoch": round(1000 * float(np.mean(steps[0])), 3) if steps and steps[0] else None,
        "timed_steps": len(later),
    }


def _load_data(spec):
    from keras_aesam import data as data_module

    return data_module.get_dataset(
        spec["dataset"], batch_size=spec["batch_size"], seed=spec["seed"], label_noise=spec["noise"],
        train_size=spec["train_size"], validation_fraction=spec["validation_fraction"],
    )


def _init_path(out, spec, input_shape, num_classes):
    shape = "x".join(str(s) for s in input_shape)
    return Path(out) / "init" / f"{spec['network']}_{shape}_{num_classes}c_s{spec['seed']}.npz"


def initial_weights(out, spec, data):
    """The seed's initial weights (built once, then loaded by every method) and a probe batch.

    Returns ``(weights, probe_x, probe_logits)``: logits (inference mode) of a seeded
    random probe batch, so the peer can check that its tf_keras twin computes the
    same function from the same weights.
    """
    path = _init_path(out, spec, data.input_shape, data.num_classes)
    if not path.is_file():
        import keras

        keras.utils.clear_session()
        keras.utils.set_random_seed(spec["seed"])
        net = build_network(keras, spec["network"], num_classes=data.num_classes, input_shape=data.input_shape,
                            weight_decay=spec["weight_decay"], weight_decay_mode=spec["weight_decay_mode"])
        probe_x = np.random.default_rng(spec["seed"]).normal(size=(16, *data.input_shape)).astype("float32")
        probe_logits = np.asarray(net(probe_x, training=False))
        arrays = {f"w{i:04d}": w for i, w in enumerate(net.get_weights())}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, probe_x=probe_x, probe_logits=probe_logits, **arrays)
        os.replace(tmp, path)
    with np.load(path) as stored:
        names = sorted(k for k in stored.files if k.startswith("w"))
        return [stored[k] for k in names], stored["probe_x"], stored["probe_logits"]


def _sam_steps_per_epoch(fractions, steps_per_epoch):
    return [int(round(f * steps_per_epoch)) for f in fractions]


def _run_method(spec, out) -> dict:
    import keras
    import tensorflow as tf

    import keras_aesam

    keras.utils.clear_session()
    keras.utils.set_random_seed(spec["seed"])
    data = _load_data(spec)  # a fresh pipeline under the same seeds: the same batch order for every method
    weights, _, _ = initial_weights(out, spec, data)
    keras.utils.clear_session()
    keras.utils.set_random_seed(spec["seed"])
    inner = build_network(keras, spec["network"], num_classes=data.num_classes, input_shape=data.input_shape,
                          weight_decay=spec["weight_decay"], weight_decay_mode=spec["weight_decay_mode"])
    inner.set_weights(weights)
    total_steps = spec["epochs"] * data.steps_per_epoch
    model = keras_aesam.wrap(inner, method=spec["method"], total_steps=total_steps, **spec["hyperparameters"])
    learning_rate = keras.optimizers.schedules.CosineDecay(spec["lr"], decay_steps=total_steps)
    decoupled = spec["weight_decay"] if spec["weight_decay"] > 0 and spec["weight_decay_mode"] == "decoupled" else None
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=learning_rate, momentum=spec["momentum"], weight_decay=decoupled),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        jit_compile=False,
    )
    timer = _make_timer(keras)
    load_start = _loadavg()
    fit_start = time.perf_counter()
    history = model.fit(data.train.repeat(), steps_per_epoch=data.steps_per_epoch, epochs=spec["epochs"],
                        verbose=0, callbacks=[timer], shuffle=False)
    fit_seconds = time.perf_counter() - fit_start
    test = data.test if not spec["test_batches"] else data.test.take(spec["test_batches"])
    evaluation = model.evaluate(test, verbose=0, return_dict=True)

    fractions = [float(f) for f in history.history.get("sam_fraction", [])]
    sam_per_epoch = _sam_steps_per_epoch(fractions, data.steps_per_epoch)
    state = model.policy_state
    steps = int(state["step"])
    sam_steps = int(sum(sam_per_epoch))
    hp = model.hyperparameters
    if spec["method"] == "esam":
        second = math.ceil(hp["gamma"] * spec["batch_size"]) / spec["batch_size"]
        passes = steps + sam_steps * (second + FORWARD_COST)
    else:
        passes = steps + sam_steps
    return {
        "test_accuracy": float(evaluation["accuracy"]),
        "test_loss": float(evaluation["loss"]),
        "train_accuracy_last_epoch": float(history.history["accuracy"][-1]),
        "train_loss_last_epoch": float(history.history["loss"][-1]),
        "steps": steps,
        "steps_per_epoch": data.steps_per_epoch,
        "sam_steps": sam_steps,
        "sam_fraction": sam_steps / steps if steps else None,
        "sam_fraction_per_epoch": fractions,
        "grad_evals": steps + sam_steps,
        "pass_equivalents": round(passes, 3),
        "skipped_steps": int(sum(history.history.get("skipped_steps", [0]))),
        "fit_seconds": round(fit_seconds, 3),
        **_timing(timer),
        "parameters": int(inner.count_params()),
        "train_examples": data.train_examples,
        "test_examples": data.test_examples if not spec["test_batches"] else None,
        "noise_rate_realised": data.noise_rate_realised,
        "data_source": data.source,
        "resolved_hyperparameters": hp,
        "expected_sam_fraction": model.policy.expected_sam_fraction(total_steps),
        "policy_state": state,
        "framework": f"keras {keras.__version__}, tensorflow {tf.__version__}",
        "loadavg_start": load_start,
        "loadavg_end": _loadavg(),
    }


def _run_peer(spec, out) -> dict:
    """The same SAM run through Keras 2's ``SharpnessAwareMinimization`` (tf_keras, imported explicitly)."""
    import tensorflow as tf
    import tf_keras

    import keras

    keras.utils.clear_session()
    keras.utils.set_random_seed(spec["seed"])  # as in _run_method: the same pipeline seeds
    data = _load_data(spec)
    weights, probe_x, probe_logits = initial_weights(out, spec, data)
    tf_keras.backend.clear_session()
    tf_keras.utils.set_random_seed(spec["seed"])
    inner = build_network(tf_keras, spec["network"], num_classes=data.num_classes, input_shape=data.input_shape,
                          weight_decay=spec["weight_decay"], weight_decay_mode=spec["weight_decay_mode"])
    inner.set_weights(weights)
    parity = float(np.max(np.abs(inner(probe_x, training=False).numpy() - probe_logits)))
    if not parity < 1e-3:
        raise RuntimeError(f"the tf_keras twin of {spec['network']} does not compute the same logits "
                           f"from the same weights (max |diff| {parity:g})")
    total_steps = spec["epochs"] * data.steps_per_epoch
    cls = tf_keras.models.experimental.SharpnessAwareMinimization
    if spec["method"] == PEER_TRAIN_MODE:
        cls = _train_mode_sam(tf_keras)
    model = cls(inner, rho=spec["hyperparameters"]["rho"])
    learning_rate = tf_keras.optimizers.schedules.CosineDecay(spec["lr"], decay_steps=total_steps)
    decoupled = spec["weight_decay"] if spec["weight_decay"] > 0 and spec["weight_decay_mode"] == "decoupled" else None
    model.compile(
        optimizer=tf_keras.optimizers.SGD(learning_rate=learning_rate, momentum=spec["momentum"],
                                          weight_decay=decoupled),
        loss=tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[tf_keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        jit_compile=False,
    )
    timer = _make_timer(tf_keras)
    load_start = _loadavg()
    fit_start = time.perf_counter()
    history = model.fit(data.train.repeat(), steps_per_epoch=data.steps_per_epoch, epochs=spec["epochs"],
                        verbose=0, callbacks=[timer], shuffle=False)
    fit_seconds = time.perf_counter() - fit_start
    test = data.test if not spec["test_batches"] else data.test.take(spec["test_batches"])
    evaluation = model.evaluate(test, verbose=0, return_dict=True)
    steps = int(model.optimizer.iterations.numpy())
    return {
        "test_accuracy": float(evaluation["accuracy"]),
        "test_loss": float(evaluation["loss"]),
        "train_accuracy_last_epoch": float(history.history["accuracy"][-1]),
        "train_loss_last_epoch": float(history.history["loss"][-1]),
        "steps": steps,
        "steps_per_epoch": data.steps_per_epoch,
        "sam_steps": steps,  # by construction: a second pass on every step
        "sam_fraction": 1.0 if steps else None,
        "sam_fraction_per_epoch": None,
        "grad_evals": 2 * steps,
        "pass_equivalents": 2 * steps,
        "skipped_steps": None,
        "fit_seconds": round(fit_seconds, 3),
        **_timing(timer),
        "parameters": int(inner.count_params()),
        "train_examples": data.train_examples,
        "test_examples": data.test_examples if not spec["test_batches"] else None,
        "noise_rate_realised": data.noise_rate_realised,
        "data_source": data.source,
        "resolved_hyperparameters": {"rho": model.rho, "num_batch_splits": model.num_batch_splits},
        "expected_sam_fraction": 1.0,
        "peer_logit_parity_max_abs": parity,
        "peer_regularization_losses": len(inner.losses),
        "framework": f"tf_keras {tf_keras.__version__}, tensorflow {tf.__version__}",
        "loadavg_start": load_start,
        "loadavg_end": _loadavg(),
    }


def _train_mode_sam(tf_keras):
    """The peer with ``training=True`` on its first pass too (a diagnostic, not the peer).

    ``SharpnessAwareMinimization.train_step`` calls ``self(x)`` for the first pass
    and ``self(x, training=True)`` for the second; this subclass turns the
    unspecified ``training`` into ``True`` (``evaluate``/``predict`` pass ``False``
    explicitly). BatchNorm's moving statistics then move on both passes.
    """

    class TrainModeSAM(tf_keras.models.experimental.SharpnessAwareMinimization):
        def call(self, inputs, training=None, **kwargs):
            return self.model(inputs, training=True if training is None else training, **kwargs)

    return TrainModeSAM


def run_spec(spec, out) -> dict:
    """Runs one spec and writes its result JSON (the moment it finishes); returns the result."""
    started = time.perf_counter()
    started_at = datetime.datetime.now().isoformat(timespec="seconds")
    body = _run_peer(spec, out) if spec["kind"] == "peer" else _run_method(spec, out)
    result = {
        "run_id": spec["run_id"],
        "spec_hash": spec["spec_hash"],
        "kind": spec["kind"],
        "method": spec["method"],
        "setting": spec["setting"],
        "noise": spec["noise"],
        "seed": spec["seed"],
        **body,
        "run_seconds": round(time.perf_counter() - started, 3),
        "started_at": started_at,
        "finished_at": datetime.datetime.now().isoformat(timespec="seconds"),
        "pid": os.getpid(),
        "spec": spec,
    }
    _write_json(_result_path(out, spec), result)
    error = _result_path(out, spec).with_suffix(".error.txt")
    if error.exists():
        error.unlink()
    return result


def _worker(job_path) -> int:
    """Worker process: runs the job's specs in order, each result written when it finishes."""
    job = json.loads(Path(job_path).read_text())
    out = job["out"]
    failures = 0
    for spec in job["specs"]:
        if finished_result(out, spec) is not None:
            continue
        try:
            result = run_spec(spec, out)
            print(f"finished {spec['run_id']}: test accuracy {result['test_accuracy']:.4f}", flush=True)
        except KeyboardInterrupt:
            raise
        except Exception:  # noqa: BLE001 - recorded, the next run still runs
            failures += 1
            text = traceback.format_exc()
            print(text, file=sys.stderr, flush=True)
            path = _result_path(out, spec).with_suffix(".error.txt")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    return 1 if failures else 0


# ---------------------------------------------------------------- the driver


def _groups(plan):
    groups = []
    for spec in plan["runs"]:
        if plan["isolation"] == "run" or spec["kind"] == "peer":
            key = spec["run_id"]
        else:
            key = f"{spec['setting']}_s{spec['seed']}"
        if groups and groups[-1][0] == key:
            groups[-1][1].append(spec)
        else:
            groups.append((key, [spec]))
    return groups


def _describe(result):
    step = result.get("step_ms")
    epoch = result.get("epoch_seconds_after_first")
    timing = f"{epoch:.1f} s/epoch, {step:.0f} ms/step" if epoch is not None and step is not None else (
        f"{step:.0f} ms/step" if step is not None else "n/a")
    frac = result.get("sam_fraction")
    sam = "n/a" if frac is None else f"{100 * frac:.1f} %"
    return f"test acc {result['test_accuracy']:.4f}, SAM {sam}, {timing}"


def _run_group(out, key, specs, isolation, progress):
    """Runs one group; returns the number of specs without a result afterwards."""
    if isolation == "none":
        for spec in specs:
            if finished_result(out, spec) is not None:
                continue
            try:
                result = run_spec(spec, out)
                progress(spec, result)
            except Exception:  # noqa: BLE001
                text = traceback.format_exc()
                _result_path(out, spec).with_suffix(".error.txt").write_text(text)
                progress(spec, None)
        return sum(finished_result(out, s) is None for s in specs)

    job = Path(out) / "logs" / f"{key}.job.json"
    _write_json(job, {"out": str(out), "specs": specs})
    log_path = Path(out) / "logs" / f"{key}.log"
    env = os.environ.copy()
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    reported = set()
    with open(log_path, "a") as log:
        log.write(f"--- {datetime.datetime.now().isoformat(timespec='seconds')} ---\n")
        log.flush()
        proc = subprocess.Popen([sys.executable, "-m", "keras_aesam.bench", "--worker", str(job)],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            while True:
                try:
                    proc.wait(timeout=2.0)
                    done = True
                except subprocess.TimeoutExpired:
                    done = False
                for spec in specs:
                    if spec["run_id"] in reported:
                        continue
                    result = finished_result(out, spec)
                    if result is not None and result.get("pid") == proc.pid:
                        reported.add(spec["run_id"])
                        progress(spec, result)
                if done:
                    break
        except BaseException:
            if proc.poll() is None:  # our own child, by its id
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            raise
    missing = 0
    for spec in specs:
        if finished_result(out, spec) is None:
            missing += 1
            progress(spec, None)
    return missing


#: What a bench writes at the top of its output folder (besides runs/, init/, logs/).
_BENCH_TOP_FILES = ("bench.json", "results.csv", "report.md", "accuracy_vs_sam.png", "time_per_epoch.png",
                    "framework_probe.json", "framework_probe.md")


def _bench_paths(out, plan):
    """Paths (relative to ``out``) this plan writes; init files only once they exist."""
    paths = list(_BENCH_TOP_FILES)
    for spec in plan["runs"]:
        paths += [f"runs/{spec['run_id']}.json", f"runs/{spec['run_id']}.error.txt"]
        paths += [p.relative_to(out).as_posix()
                  for p in (out / "init").glob(f"{spec['network']}_*_s{spec['seed']}.npz")]
    for key, _ in _groups(plan):
        paths += [f"logs/{key}.log", f"logs/{key}.job.json"]
    return paths


def _record_bench_files(out, plan):
    """Lists in ``out``'s manifest (keras_aesam.safety) what this bench writes there."""
    from keras_aesam import safety

    out.mkdir(parents=True, exist_ok=True)
    ours = set(safety.written(out))
    new_dirs = [d for d in ("runs", "init", "logs") if not (out / d).exists()]
    for d in new_dirs:
        (out / d).mkdir()
    # A file already there that the manifest does not list stays someone else's.
    fresh = [p for p in _bench_paths(out, plan)
             if p not in ours and (not (out / p).exists() or p.startswith("init/"))]
    safety.record(out, *fresh, *(out / d for d in new_dirs))


def _read_bench_json(out) -> dict:
    """The previous session's bench.json, or {} (none, or unreadable)."""
    try:
        return json.loads((out / "bench.json").read_text())
    except (OSError, ValueError):
        return {}


def _remove_previous_bench(out, plan, stream):
    """``--fresh``: deletes the files a previous bench wrote in ``out``, and only those."""
    from keras_aesam import safety

    previous = _read_bench_json(out)
    if previous.get("run_ids") and not safety.is_ours(out):  # written before the manifest existed
        safety.adopt(out, "bench.json", [*_BENCH_TOP_FILES, "init/*.npz", "logs/*.log", "logs/*.job.json",
                                         *(f"runs/{r}.json" for r in previous["run_ids"]),
                                         *(f"runs/{r}.error.txt" for r in previous["run_ids"])])
    if any(out.iterdir()) and "bench.json" not in safety.written(out):
        raise BadInput(f"--fresh refuses to delete anything in {str(out)!r}: it holds no keras-aesam bench "
                       f"(no bench.json listed in {safety.MANIFEST}); check --output")
    if (out / "init").is_dir():
        _record_bench_files(out, plan)  # init files of an interrupted session
    left = safety.remove_written(out)
    if left:
        print(f"keras-aesam bench: --fresh kept {len(left)} file(s) in {out} that the bench did not write: "
              f"{', '.join(left)}", file=stream, flush=True)


def run_bench(plan, argv=None, *, fresh=False, stream=sys.stdout, program="keras-aesam bench") -> int:
    """Runs the plan's unfinished runs and writes the report; returns the exit code."""
    out = plan["output"]
    if fresh and out.exists():
        _remove_previous_bench(out, plan, stream)
    done = {spec["run_id"]: finished_result(out, spec) for spec in plan["runs"]}  # BadInput on mismatch
    finished = sum(r is not None for r in done.values())
    _record_bench_files(out, plan)

    previous = _read_bench_json(out)
    for session in previous.get("sessions", []):  # files written before sessions recorded their command
        session.setdefault("command", previous.get("command"))
    estimate = estimate_seconds([s for s in plan["runs"] if done[s["run_id"]] is None], plan["isolation"])
    meta = {
        "command": " ".join([program, *argv]) if argv else program,
        "argv": list(argv or []),
        "profile": plan["profile"],
        "config": plan["config"],
        "methods": plan["methods"],
        "noise": plan["noise"],
        "seeds": plan["seeds"],
        "peer": plan["peer"],
        "peer_note": plan["peer_note"],
        "isolation": plan["isolation"],
        "budget_minutes": plan["budget_minutes"],
        "run_ids": [s["run_id"] for s in plan["runs"]],
        "machine": _machine(),
        "versions": _versions(),
        "started": previous.get("started") or datetime.datetime.now().isoformat(timespec="seconds"),
        "sessions": previous.get("sessions", []) + [{
            "command": " ".join([program, *argv]) if argv else program,
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "skipped_finished_runs": finished,
            "estimated_seconds": round(estimate),
            "loadavg_start": _loadavg(),
        }],
    }
    _write_json(out / "bench.json", meta)
    total = len(plan["runs"])
    print(f"keras-aesam bench: {total} runs ({finished} already finished, skipped), profile {plan['profile']}, "
          f"estimated {estimate / 60:.0f} min on the reference machine -> {out}", file=stream, flush=True)
    if plan["peer_note"]:
        print(f"  no peer row: {plan['peer_note']}", file=stream, flush=True)

    counter = {"n": finished}
    failed = []

    def progress(spec, result):
        if result is None:
            failed.append(spec["run_id"])
            err = _result_path(out, spec).with_suffix(".error.txt")
            where = f"see {err}" if err.exists() else f"see {out / 'logs'}"
            print(f"  FAILED {spec['run_id']} ({where})", file=stream, flush=True)
            return
        counter["n"] += 1
        print(f"  [{counter['n']}/{total}] {spec['run_id']}: {_describe(result)}", file=stream, flush=True)

    started = time.perf_counter()
    interrupted = False
    previous_handler = None
    try:
        previous_handler = signal.signal(signal.SIGTERM, _raise_interrupt)
    except ValueError:  # not the main thread
        previous_handler = None
    try:
        for key, specs in _groups(plan):
            todo = [s for s in specs if done[s["run_id"]] is None]
            if todo:
                _run_group(out, key, todo, plan["isolation"], progress)
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: the finished runs are kept; run the same command again to resume",
              file=stream, flush=True)
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
    meta["sessions"][-1].update(
        finished=datetime.datetime.now().isoformat(timespec="seconds"),
        wall_seconds=round(time.perf_counter() - started, 1),
        loadavg_end=_loadavg(),
        interrupted=interrupted,
        failed=failed,
    )
    _write_json(out / "bench.json", meta)
    paths = write_report(out)
    print(f"report: {paths['report']}", file=stream, flush=True)
    if interrupted:
        return 130
    return 1 if failed else 0


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


# ------------------------------------------------------------- aggregation


def load_results(out) -> List[dict]:
    rows = []
    for path in sorted((Path(out) / "runs").glob("*.json")):
        try:
            rows.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return rows


def _mean_std(values):
    values = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return (None, None, 0)
    std = float(np.std(values, ddof=1)) if len(values) > 1 else None
    return (float(np.mean(values)), std, len(values))


def time_ratios(rows, key="step_ms") -> Dict[str, float]:
    """``run_id -> row[key] / row[key] of ERM`` in the same (setting, seed) group.

    ``key`` is ``step_ms`` (wall time per step) or ``step_cpu_ms`` (CPU time).
    """
    erm = {(r["setting"], r["seed"]): r for r in rows if r["method"] == "erm"}
    ratios = {}
    for r in rows:
        base = erm.get((r["setting"], r["seed"]))
        if not base or not base.get(key) or not r.get(key):
            continue
        if r.get("session") != base.get("session"):
            continue  # not side by side: run in another session of the bench
        ratios[r["run_id"]] = r[key] / base[key]
    return ratios


def _ideal(row):
    """Expected step-time ratio to ERM if a step cost only its passes: pass equivalents / steps."""
    if not row.get("steps"):
        return None
    return row["pass_equivalents"] / row["steps"]


def _method_order(method):
    return ALL_METHODS.index(method) if method in ALL_METHODS else len(ALL_METHODS)


def aggregate(rows) -> List[dict]:
    """One summary per (setting, method): means and sample stds over seeds."""
    ratios = time_ratios(rows)
    cpu_ratios = time_ratios(rows, "step_cpu_ms")
    groups = {}
    for r in rows:
        groups.setdefault((r["setting"], r["noise"], r["method"]), []).append(r)
    summaries = []
    for (setting, noise, method), items in groups.items():
        items = sorted(items, key=lambda r: r["seed"])
        acc = _mean_std([r["test_accuracy"] for r in items])
        frac = _mean_std([r["sam_fraction"] for r in items])
        ratio = _mean_std([ratios.get(r["run_id"]) for r in items])
        cpu_ratio = _mean_std([cpu_ratios.get(r["run_id"]) for r in items])
        ideal = _mean_std([_ideal(r) for r in items])
        over_ideal = _mean_std([ratios[r["run_id"]] / _ideal(r) for r in items
                                if r["run_id"] in ratios and _ideal(r)])
        cpu_over_ideal = _mean_std([cpu_ratios[r["run_id"]] / _ideal(r) for r in items
                                    if r["run_id"] in cpu_ratios and _ideal(r)])
        summaries.append({
            "setting": setting,
            "noise": noise,
            "method": method,
            "n": acc[2],
            "seeds": [r["seed"] for r in items],
            "acc_mean": acc[0], "acc_std": acc[1],
            "sam_mean": frac[0], "sam_std": frac[1],
            "grad_evals_mean": _mean_std([r["grad_evals"] for r in items])[0],
            "pass_equivalents_mean": _mean_std([r["pass_equivalents"] for r in items])[0],
            "epoch_s_mean": _mean_std([r.get("epoch_seconds_after_first") for r in items])[0],
            "epoch_s_std": _mean_std([r.get("epoch_seconds_after_first") for r in items])[1],
            "first_epoch_s_mean": _mean_std([r.get("first_epoch_seconds") for r in items])[0],
            "step_ms_mean": _mean_std([r.get("step_ms") for r in items])[0],
            "timed_steps": int(sum(r.get("timed_steps") or 0 for r in items)),
            "ratio_mean": ratio[0], "ratio_std": ratio[1],
            "cpu_ratio_mean": cpu_ratio[0], "cpu_ratio_std": cpu_ratio[1],
            "step_cpu_ms_mean": _mean_std([r.get("step_cpu_ms") for r in items])[0],
            "ideal_mean": ideal[0],
            "over_ideal_mean": over_ideal[0], "over_ideal_std": over_ideal[1],
            "cpu_over_ideal_mean": cpu_over_ideal[0], "cpu_over_ideal_std": cpu_over_ideal[1],
        })
    settings = []
    for r in rows:
        if (r["noise"], r["setting"]) not in settings:
            settings.append((r["noise"], r["setting"]))
    order = {s: i for i, s in enumerate(sorted(settings))}
    summaries.sort(key=lambda s: (order[(s["noise"], s["setting"])], _method_order(s["method"])))
    return summaries


def paired_difference(a, b, confidence=0.95) -> dict:
    """Paired comparison of ``a`` and ``b`` (same seeds, same order): mean difference ``a - b``,
    its ``confidence`` interval (Student t, n-1 degrees of freedom) and ``scipy.stats.ttest_rel``."""
    from scipy import stats

    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired samples need the same length, got {a.shape} and {b.shape}")
    d = a - b
    n = int(d.size)
    result = {"n": n, "mean_a": float(a.mean()) if n else None, "mean_b": float(b.mean()) if n else None,
              "mean_diff": float(d.mean()) if n else None, "sd_diff": None, "ci_low": None, "ci_high": None,
              "t": None, "p": None, "confidence": confidence}
    if n < 2:
        return result
    sd = float(d.std(ddof=1))
    if sd <= 1e-12 * max(1.0, float(np.abs(d).max())):
        sd = 0.0  # a constant difference (up to round-off): no t statistic
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    result.update(sd_diff=sd, ci_low=float(d.mean()) - half, ci_high=float(d.mean()) + half)
    if sd > 0:
        test = stats.ttest_rel(a, b)
        result.update(t=float(test.statistic), p=float(test.pvalue))
    return result


#: The comparisons the paper's claims rest on: (a, b, what the paper says).
COMPARISONS = (
    ("ae_sam", "ss_sam", "AE-SAM > SS-SAM at about the same %SAM (paper: significant at 95 %)"),
    ("ae_looksam", "looksam", "AE-LookSAM > LookSAM"),
    ("ae_sam", "sam", "AE-SAM ≈ SAM with about half the SAM steps"),
    ("ae_looksam", "sam", "AE-LookSAM ≈ SAM with about a fifth (clean) / half (noisy) of the SAM steps"),
    ("sam", "erm", "SAM > ERM (the premise; robustness to label noise)"),
    ("ae_sam", "erm", "AE-SAM > ERM"),
    ("ae_looksam", "erm", "AE-LookSAM > ERM"),
)


def paired_tests(rows, comparisons=COMPARISONS) -> List[dict]:
    """Paired t-tests over seeds, per setting and pooled over settings, for each comparison."""
    by_key = {(r["setting"], r["seed"], r["method"]): r["test_accuracy"] for r in rows}
    settings = []
    for r in sorted(rows, key=lambda r: r["noise"]):
        if r["setting"] not in settings:
            settings.append(r["setting"])
    tests = []
    for a, b, claim in comparisons:
        pooled_a, pooled_b = [], []
        for setting in settings:
            seeds = sorted({s for (st, s, m) in by_key if st == setting and m == a}
                           & {s for (st, s, m) in by_key if st == setting and m == b})
            if not seeds:
                continue
            xa = [by_key[(setting, s, a)] for s in seeds]
            xb = [by_key[(setting, s, b)] for s in seeds]
            pooled_a += xa
            pooled_b += xb
            tests.append({"a": a, "b": b, "claim": claim, "setting": setting, "seeds": seeds,
                          **paired_difference(xa, xb)})
        if len(settings) > 1 and pooled_a:
            tests.append({"a": a, "b": b, "claim": claim, "setting": "pooled", "seeds": None,
                          **paired_difference(pooled_a, pooled_b)})
    return tests


def verdict(test) -> str:
    """A plain reading of one paired test at 95 %."""
    if test["n"] < 2 or test["ci_low"] is None:
        return "too few seeds"
    if test["ci_low"] > 0:
        return f"{_pretty(test['a'])} better (95 % CI excludes 0)"
    if test["ci_high"] < 0:
        return f"{_pretty(test['a'])} worse (95 % CI excludes 0)"
    return "no significant difference (95 % CI includes 0)"


# ------------------------------------------------------------------ report

_PRETTY = {"erm": "ERM", "sam": "SAM", "esam": "ESAM", "ss_sam": "SS-SAM", "looksam": "LookSAM",
           "ae_sam": "AE-SAM", "ae_looksam": "AE-LookSAM", PEER_METHOD: "Keras 2 SAM (peer)",
           PEER_TRAIN_MODE: "Keras 2 SAM, 1st pass training=True (diagnostic)"}

CSV_COLUMNS = (
    "run_id", "kind", "setting", "noise", "seed", "method", "test_accuracy", "test_loss",
    "train_accuracy_last_epoch", "train_loss_last_epoch", "steps", "sam_steps", "sam_fraction",
    "expected_sam_fraction", "grad_evals", "pass_equivalents", "first_epoch_seconds",
    "epoch_seconds_after_first", "step_ms", "step_ms_first_epoch", "step_cpu_ms", "timed_steps", "ratio_to_erm",
    "cpu_ratio_to_erm",
    "fit_seconds", "run_seconds", "skipped_steps", "parameters", "train_examples", "noise_rate_realised",
    "hyperparameters", "framework", "loadavg_start", "loadavg_end", "finished_at",
)


def _pretty(method):
    return _PRETTY.get(method, method)


def _fmt(value, digits=2, scale=1.0):
    if value is None:
        return "–"
    return f"{value * scale:.{digits}f}"


def _fmt_p(p):
    if p is None:
        return "–"
    return f"{p:.1e}" if p < 0.001 else f"{p:.3f}"


def _pm(mean, std, digits=2, scale=1.0):
    if mean is None:
        return "–"
    if std is None:
        return _fmt(mean, digits, scale)
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def write_csv(rows, path):
    ratios = time_ratios(rows)
    cpu_ratios = time_ratios(rows, "step_cpu_ms")
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for r in sorted(rows, key=lambda r: (r["noise"], r["seed"], _method_order(r["method"]))):
            values = []
            for col in CSV_COLUMNS:
                if col == "ratio_to_erm":
                    value = ratios.get(r["run_id"])
                elif col == "cpu_ratio_to_erm":
                    value = cpu_ratios.get(r["run_id"])
                elif col == "hyperparameters":
                    value = json.dumps(r.get("resolved_hyperparameters"), sort_keys=True)
                elif col in ("loadavg_start", "loadavg_end"):
                    value = " ".join(str(x) for x in (r.get(col) or []))
                else:
                    value = r.get(col)
                if isinstance(value, float):
                    value = f"{value:.6g}"
                values.append("" if value is None else value)
            writer.writerow(values)


def write_plots(rows, summaries, out) -> List[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    settings = []
    for s in summaries:
        if s["setting"] not in settings:
            settings.append(s["setting"])
    if not settings:
        return []
    colors = {m: plt.cm.tab10(i) for i, m in enumerate(list(ALL_METHODS) + list(PEER_METHODS))}

    fig, axes = plt.subplots(1, len(settings), figsize=(5.2 * len(settings), 4.4), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        for s in (s for s in summaries if s["setting"] == setting):
            marker = "*" if s["method"] in PEER_METHODS else "o"
            ax.errorbar(100 * (s["sam_mean"] or 0), 100 * s["acc_mean"],
                        xerr=None if s["sam_std"] is None else 100 * s["sam_std"],
                        yerr=None if s["acc_std"] is None else 100 * s["acc_std"],
                        fmt=marker, ms=9 if marker == "*" else 6, capsize=3, color=colors.get(s["method"]),
                        label=f"{_pretty(s['method'])} (n={s['n']})")
        ax.set_xlabel("SAM steps (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(setting)
        ax.set_xlim(-5, 105)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle("Test accuracy vs. share of SAM steps (mean ± std over seeds)")
    fig.tight_layout()
    path = Path(out) / "accuracy_vs_sam.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    methods = []
    for s in summaries:
        if s["method"] not in methods:
            methods.append(s["method"])
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(17, 4.6))
    width = 0.8 / len(settings)

    def values(items, key):
        return [np.nan if items.get(m, {}).get(key) is None else items[m][key] for m in methods]

    for i, setting in enumerate(settings):
        by_method = {s["method"]: s for s in summaries if s["setting"] == setting}
        xs = np.arange(len(methods)) + (i - (len(settings) - 1) / 2) * width
        for ax, key in ((ax1, "epoch_s"), (ax2, "ratio"), (ax3, "cpu_ratio")):
            err = [0.0 if np.isnan(v) else v for v in values(by_method, f"{key}_std")]
            ax.bar(xs, values(by_method, f"{key}_mean"), width, yerr=err, capsize=2, label=setting)
        for ax in (ax2, ax3):
            ax.scatter(xs, values(by_method, "ideal_mean"), marker="_", s=200, color="black",
                       zorder=3, label="ideal (1+ζ)" if i == 0 else None)
    for ax in (ax1, ax2, ax3):
        ax.set_xticks(np.arange(len(methods)))
        short = {PEER_METHOD: "Keras 2 SAM\n(peer)", PEER_TRAIN_MODE: "Keras 2 SAM\ntrain-mode 1st pass"}
        ax.set_xticklabels([short.get(m, _pretty(m)) for m in methods], fontsize=8,
                           rotation=30, ha="right")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    ax1.set_ylabel("seconds per epoch (after the first)")
    ax1.set_title("Wall time per epoch (mean ± std over seeds)")
    ax2.set_ylabel("step time / ERM step time (same seed)")
    ax2.set_title("Wall-time ratio to ERM vs. the ideal 1 + ζ")
    ax3.set_ylabel("CPU time per step / ERM's (same seed)")
    ax3.set_title("CPU-time ratio to ERM vs. the ideal 1 + ζ")
    fig.tight_layout()
    path = Path(out) / "time_per_epoch.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written


def _report_text(meta, rows, summaries, tests, plots, probe=None):
    config = meta.get("config", {})
    lines = []
    add = lines.append
    overrides = [a for a in meta.get("argv", []) if a.startswith("--") and a not in (
        "--profile", "--output", "-o", "--resume", "--fresh")]
    add(f"# keras-aesam bench: {meta.get('profile', '?')} profile"
        + (" with command-line overrides" if overrides else ""))
    add("")
    sessions = meta.get("sessions", [])
    expected = len(meta.get("run_ids", [])) or len(rows)
    status = "complete" if len(rows) >= expected else f"PARTIAL: {len(rows)} of {expected} runs finished"
    add(f"Status: **{status}**.")
    add("")
    add("## What ran")
    add("")
    commands = []
    for s in meta.get("sessions", []):
        if s.get("command") and s["command"] not in commands:
            commands.append(s["command"])
    if not commands:
        commands = [meta.get("command", "keras-aesam bench")]
    add("- Command" + ("s (one per session; a later one resumed the earlier)" if len(commands) > 1 else "")
        + ": " + "; ".join(f"`{c}`" for c in commands))
    machine = meta.get("machine", {})
    add(f"- Machine: {machine.get('cpu')}, {machine.get('cores')} cores ({machine.get('platform')}, "
        f"Python {machine.get('python')}); shared with other jobs, load average at start/end of each "
        "session below.")
    versions = meta.get("versions", {})
    add("- Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v is not None))
    for i, s in enumerate(sessions):
        wall = s.get("wall_seconds")
        add(f"- Session {i + 1}: started {s.get('started')}, finished {s.get('finished', '?')}, wall "
            f"{_fmt(None if wall is None else wall / 60, 1)} min, skipped {s.get('skipped_finished_runs', 0)} "
            f"finished runs, load average {s.get('loadavg_start')} → {s.get('loadavg_end')}"
            f"{' (interrupted)' if s.get('interrupted') else ''}")
    parameters = next((r.get("parameters") for r in rows if r.get("parameters")), None)
    train_examples = next((r.get("train_examples") for r in rows if r.get("train_examples")), None)
    steps_per_epoch = next((r.get("steps_per_epoch") for r in rows if r.get("steps_per_epoch")), None)
    test_set = ("the full test set" if not config.get("test_batches")
                else f"the first {config['test_batches']} test batches only")
    add(f"- Data: {config.get('dataset')}, {train_examples} training examples (seeded subset of the "
        f"{100 * (1 - config.get('validation_fraction', 0.1)):.0f} % left after the validation split), "
        f"{test_set}; label noise flips that share of the training labels only (test labels clean).")
    add(f"- Network: {config.get('network')} ({parameters} parameters), logits + sparse cross-entropy.")
    add(f"- Optimizer (every method): SGD momentum {config.get('momentum')}, lr {config.get('lr')} with a "
        f"cosine decay to 0 over {config.get('epochs')} epochs × {steps_per_epoch} steps, batch "
        f"{config.get('batch_size')}, weight decay {config.get('weight_decay')} "
        f"({config.get('weight_decay_mode')}{': Keras SGD(weight_decay=…), outside g' if config.get('weight_decay_mode') == 'decoupled' else ': L2 kernel regularizer of weight_decay/2, inside g'}), "
        "XLA off.")
    add(f"- Methods: {', '.join(_pretty(m) for m in meta.get('methods', []))}; seeds {meta.get('seeds')}; "
        f"label noise {meta.get('noise')}. ρ = {config.get('rho')} (not tuned). On noisy labels LookSAM k=2 and "
        "AE-SAM/AE-LookSAM λ1=-1, λ2=1 (paper §4.3); otherwise the paper's defaults "
        "(SS-SAM p=0.5, LookSAM k=5 α=0.7, AE-SAM λ=(-1,1), AE-LookSAM λ=(0,2), δ=0.9, ESAM β=0.6 γ=0.5).")
    add("- Same for every method of a seed: the data split and noise, the batch order, the initial weights "
        "(built once per seed, loaded by every method), the method seeds. "
        f"Isolation: {meta.get('isolation')} (a fresh worker process per (setting, seed) group for `group`).")
    if meta.get("peer_note"):
        add(f"- No peer row: {meta['peer_note']}.")
    add("")
    add("## Results")
    add("")
    add("Test accuracy and timing: mean ± sample std over seeds. %SAM is measured (SAM steps / steps). "
        "Grad evals = steps × (1 + ζ) (ESAM: 2 per step, its second on ⌈γB⌉ samples). "
        "Passes = forward-backward passes in whole-batch units (ESAM: 1 + ⌈γB⌉/B + a forward pass counted as 1/3), "
        "and **ideal** = passes / steps, the step-time ratio to ERM if a step cost only its passes. "
        "Epoch s leaves out the first epoch (tracing, cache filling), reported apart as 1st epoch s. "
        "× ERM = mean step time / ERM's mean step time of the same seed and setting (runs back to back), "
        "in wall time and in CPU time of the process (`time.process_time`, less disturbed by the other jobs "
        "on the machine); / ideal = (× ERM) / ideal, 1.0 meaning no overhead beyond the extra passes. "
        "Ratios pair runs of the same bench session only (a run resumed in a later session gets none).")
    add("")
    settings = []
    for s in summaries:
        if s["setting"] not in settings:
            settings.append(s["setting"])
    for setting in settings:
        items = [s for s in summaries if s["setting"] == setting]
        realised = sorted({round(r.get("noise_rate_realised") or 0, 4) for r in rows if r["setting"] == setting})
        add(f"### {setting}" + (f" (realised noise {', '.join(f'{100 * x:.1f} %' for x in realised)})"
                               if setting != "clean" else ""))
        add("")
        add("| method | n | test acc (%) | %SAM | grad evals | passes | ideal | epoch s | 1st epoch s | "
            "step ms | × ERM (wall) | / ideal (wall) | × ERM (CPU) | / ideal (CPU) |")
        add("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for s in items:
            add(f"| {_pretty(s['method'])} | {s['n']} | {_pm(s['acc_mean'], s['acc_std'], 2, 100)} | "
                f"{_pm(s['sam_mean'], s['sam_std'], 1, 100)} | {_fmt(s['grad_evals_mean'], 0)} | "
                f"{_fmt(s['pass_equivalents_mean'], 0)} | {_fmt(s['ideal_mean'], 2)} | "
                f"{_pm(s['epoch_s_mean'], s['epoch_s_std'], 1)} | {_fmt(s['first_epoch_s_mean'], 1)} | "
                f"{_fmt(s['step_ms_mean'], 0)} | {_pm(s['ratio_mean'], s['ratio_std'], 2)} | "
                f"{_pm(s['over_ideal_mean'], s['over_ideal_std'], 2)} | "
                f"{_pm(s['cpu_ratio_mean'], s['cpu_ratio_std'], 2)} | "
                f"{_pm(s['cpu_over_ideal_mean'], s['cpu_over_ideal_std'], 2)} |")
        add("")
    add("## Paired t-tests over seeds")
    add("")
    add("Difference of test accuracy a − b in percentage points, paired by seed (same data, initial weights); "
        "95 % CI from Student's t with n−1 degrees of freedom; p from `scipy.stats.ttest_rel` (two-sided). "
        "`pooled` pairs every (setting, seed) of all settings (n = settings × seeds), a rougher test since the "
        "settings differ.")
    add("")
    add("| a − b | setting | n | mean a (%) | mean b (%) | diff (pp) | 95 % CI (pp) | t | p | reading |")
    add("|---|---|---|---|---|---|---|---|---|---|")
    for t in tests:
        ci = "–" if t["ci_low"] is None else f"[{100 * t['ci_low']:+.2f}, {100 * t['ci_high']:+.2f}]"
        diff = "–" if t["mean_diff"] is None else f"{100 * t['mean_diff']:+.2f}"
        add(f"| {_pretty(t['a'])} − {_pretty(t['b'])} | {t['setting']} | {t['n']} | {_fmt(t['mean_a'], 2, 100)} | "
            f"{_fmt(t['mean_b'], 2, 100)} | {diff} | {ci} | {_fmt(t['t'], 2)} | {_fmt_p(t['p'])} | {verdict(t)} |")
    add("")
    peers = [r for r in rows if r["method"] == PEER_METHOD]
    if peers:
        add("## Peer row: Keras 2's `SharpnessAwareMinimization`")
        add("")
        add("`tf_keras.models.experimental.SharpnessAwareMinimization` (package "
            f"`{PEER_REQUIREMENT}`), in its own process with `tf_keras` imported explicitly, on the same "
            "`tf.data` pipeline (same split, normalization and batch order), the same architecture rebuilt in "
            "tf_keras and loaded with the same initial weights (checked: max |logit difference| on a probe "
            f"batch {max(r.get('peer_logit_parity_max_abs') or 0 for r in peers):.1e}), the same SGD, cosine "
            "schedule and decoupled weight decay, ρ as SAM's.")
        add("")
        by = {(r["setting"], r["seed"], r["method"]): r for r in rows}

        def ratio(r, other, key):
            return r[key] / other[key] if other and other.get(key) and r.get(key) else None

        add("| seed | setting | peer test acc (%) | our SAM test acc (%) | peer step ms | our SAM step ms | "
            "our ERM step ms | peer / our SAM (wall) | peer / our SAM (CPU) | peer / our ERM (wall) | "
            "peer / our ERM (CPU) |")
        add("|---|---|---|---|---|---|---|---|---|---|---|")
        collected = {"sam_wall": [], "sam_cpu": [], "erm_wall": [], "erm_cpu": [], "acc_diff": []}
        for r in sorted(peers, key=lambda r: r["seed"]):
            ours = by.get((r["setting"], r["seed"], "sam"))
            erm = by.get((r["setting"], r["seed"], "erm"))
            values = {"sam_wall": ratio(r, ours, "step_ms"), "sam_cpu": ratio(r, ours, "step_cpu_ms"),
                      "erm_wall": ratio(r, erm, "step_ms"), "erm_cpu": ratio(r, erm, "step_cpu_ms"),
                      "acc_diff": None if not ours else r["test_accuracy"] - ours["test_accuracy"]}
            for k, v in values.items():
                if v is not None:
                    collected[k].append(v)
            add(f"| {r['seed']} | {r['setting']} | {_fmt(r['test_accuracy'], 2, 100)} | "
                f"{_fmt(ours and ours['test_accuracy'], 2, 100)} | {_fmt(r.get('step_ms'), 0)} | "
                f"{_fmt(ours and ours.get('step_ms'), 0)} | {_fmt(erm and erm.get('step_ms'), 0)} | "
                f"{_fmt(values['sam_wall'], 2)} | {_fmt(values['sam_cpu'], 2)} | {_fmt(values['erm_wall'], 2)} | "
                f"{_fmt(values['erm_cpu'], 2)} |")
        if collected["sam_wall"]:
            add("")
            parts = [f"{label}: {_pm(*_mean_std(collected[k])[:2], 2)}" for k, label in (
                ("sam_wall", "peer / our SAM step time (wall)"), ("sam_cpu", "(CPU)"),
                ("erm_wall", "peer / our ERM (wall)"), ("erm_cpu", "(CPU)"))]
            add("Mean ± std over seeds: " + "; ".join(parts) + f" (n = {len(collected['sam_wall'])}).")
        if collected["acc_diff"]:
            test = paired_difference([r["test_accuracy"] for r in sorted(peers, key=lambda r: r["seed"])
                                      if by.get((r["setting"], r["seed"], "sam"))],
                                     [by[(r["setting"], r["seed"], "sam")]["test_accuracy"]
                                      for r in sorted(peers, key=lambda r: r["seed"])
                                      if by.get((r["setting"], r["seed"], "sam"))])
            ci = "" if test["ci_low"] is None else (
                f", 95 % CI [{100 * test['ci_low']:+.2f}, {100 * test['ci_high']:+.2f}] pp, p = {_fmt_p(test['p'])}")
            add(f"Test accuracy, peer − our SAM (paired by seed): {100 * test['mean_diff']:+.2f} pp{ci} "
                f"(n = {test['n']}).")
        add("")
        diagnostics = {(r["setting"], r["seed"]): r for r in rows if r["method"] == PEER_TRAIN_MODE}
        if diagnostics:
            add("Diagnostic: the same peer with `training=True` on its first pass as well (a subclass whose "
                "`call` turns the unspecified `training` of the first pass into `True`; BatchNorm statistics then "
                "move on both passes). Test accuracy (%):")
            add("")
            add("| seed | peer | peer, 1st pass training=True | our SAM | our ERM |")
            add("|---|---|---|---|---|")
            pairs = []
            for r in sorted(peers, key=lambda r: r["seed"]):
                d = diagnostics.get((r["setting"], r["seed"]))
                ours = by.get((r["setting"], r["seed"], "sam"))
                erm = by.get((r["setting"], r["seed"], "erm"))
                add(f"| {r['seed']} | {_fmt(r['test_accuracy'], 2, 100)} | {_fmt(d and d['test_accuracy'], 2, 100)} | "
                    f"{_fmt(ours and ours['test_accuracy'], 2, 100)} | {_fmt(erm and erm['test_accuracy'], 2, 100)} |")
                if d and ours:
                    pairs.append((r["test_accuracy"], d["test_accuracy"], ours["test_accuracy"]))
            if pairs:
                add("")
                for label, i, j in (("peer − train-mode peer", 0, 1), ("train-mode peer − our SAM", 1, 2)):
                    t = paired_difference([p[i] for p in pairs], [p[j] for p in pairs])
                    ci = "" if t["ci_low"] is None else (
                        f", 95 % CI [{100 * t['ci_low']:+.2f}, {100 * t['ci_high']:+.2f}] pp, p = {_fmt_p(t['p'])}")
                    add(f"- {label}: {100 * t['mean_diff']:+.2f} pp{ci} (n = {t['n']})")
            add("")
        add("What the peer does differently (read in `tf_keras/src/models/sharpness_aware_minimization.py` of "
            f"{PEER_REQUIREMENT} and checked by `tests/test_bench.py`):")
        add("")
        add("- The first pass is `self(x_batch)` without `training=True`, so it runs in inference mode: "
            "BatchNorm normalizes with its moving statistics and Dropout is off when `g` (hence the "
            "perturbation) is computed; only the second pass, at `w + e`, has `training=True`. BatchNorm's "
            "moving statistics are therefore updated once per step, from the perturbed weights.")
        add("- It perturbs the variables in place (`assign_add(e)`) and restores them with `assign_add(-e)`: "
            "`w + e − e` is not bit-exact in float32.")
        add("- The loss is `compiled_loss(y, pred, sample_weight)` without `regularization_losses`: "
            "`model.losses` (e.g. L2 kernel regularizers) are not part of either gradient. (`sample_weight` "
            "*is* passed to the loss.) With the bench's decoupled weight decay this changes nothing here.")
        add("- The reported training `loss` metric is updated by both `compiled_loss` calls, so it averages the "
            "loss at `w` and at `w + e`; the accuracy metric uses the first (inference-mode) pass.")
        add("- Every step is a SAM step (no policy), no ASAM, no mixed-precision loss scaling in `train_step`.")
        add("")
    if probe:
        c = probe["configs"]
        k3, tfk = c["k3_plain"]["cpu_ms"], c["tfk_plain"]["cpu_ms"]
        add("### Where the step-time difference comes from (framework probe)")
        add("")
        add(_probe_markdown(probe))
        add(f"Per step, in CPU time: tf_keras's plain `fit` costs {tfk / k3:.2f}× Keras 3's on the same network "
            f"({c['tfk_plain_unfused_bn']['cpu_ms'] / k3:.2f}× with tf_keras's BatchNormalization(fused=False)); "
            f"relative to its own framework's plain step, SAM costs {c['k3_sam']['cpu_ms'] / k3:.2f}× in keras_aesam "
            f"and {c['tfk_sam']['cpu_ms'] / tfk:.2f}× in tf_keras; keras_aesam's ERM costs "
            f"{c['k3_erm']['cpu_ms'] / k3:.2f}× Keras 3's plain step. (`python -m keras_aesam.bench "
            "--framework-probe --output OUT` reruns it.)")
        add("")
    add("## Claims check (mechanical; see docs/results/README.md for the reading)")
    add("")
    for t in tests:
        if t["setting"] == "pooled":
            continue
        sam_a = next((s["sam_mean"] for s in summaries if s["setting"] == t["setting"] and s["method"] == t["a"]), None)
        sam_b = next((s["sam_mean"] for s in summaries if s["setting"] == t["setting"] and s["method"] == t["b"]), None)
        diff = "–" if t["mean_diff"] is None else f"{100 * t['mean_diff']:+.2f} pp"
        ci = "" if t["ci_low"] is None else f", 95 % CI [{100 * t['ci_low']:+.2f}, {100 * t['ci_high']:+.2f}]"
        add(f"- {t['claim']} — {t['setting']}: {_pretty(t['a'])} {_fmt(sam_a, 1, 100)} % SAM vs "
            f"{_pretty(t['b'])} {_fmt(sam_b, 1, 100)} % SAM; difference {diff}{ci} (n = {t['n']}): "
            f"{verdict(t)}.")
    add("")
    if plots:
        add("## Plots")
        add("")
        for p in plots:
            add(f"![{p.stem}]({p.name})")
            add("")
    failed = [s for s in sessions if s.get("failed")]
    if failed:
        add("## Failed runs")
        add("")
        for s in failed:
            add(f"- session started {s.get('started')}: {', '.join(s['failed'])} (see logs/ and runs/*.error.txt)")
        add("")
    add("Every run: `results.csv` (one row per run) and `runs/<run id>.json` (everything measured, with the "
        "run's full specification).")
    add("")
    return "\n".join(lines)


def write_report(out) -> dict:
    """Writes ``results.csv``, the plots and ``report.md`` from the results in ``out``."""
    out = Path(out)
    meta = {}
    if (out / "bench.json").is_file():
        meta = json.loads((out / "bench.json").read_text())
    wanted = set(meta.get("run_ids") or [])
    rows = [r for r in load_results(out) if not wanted or r["run_id"] in wanted]
    sessions = meta.get("sessions", [])
    for r in rows:  # which session ran it: timing ratios pair runs of one session only
        r["session"] = None
        for i, s in enumerate(sessions):
            if s.get("started") and r.get("finished_at") and s["started"] <= r["finished_at"] <= (
                    s.get("finished") or "9999"):
                r["session"] = i + 1
    summaries = aggregate(rows)
    tests = paired_tests([r for r in rows if r["kind"] == "method"])
    write_csv(rows, out / "results.csv")
    plots = write_plots(rows, summaries, out) if rows else []
    probe = None
    if (out / "framework_probe.json").is_file():
        probe = json.loads((out / "framework_probe.json").read_text())
    report = out / "report.md"
    report.write_text(_report_text(meta, rows, summaries, tests, plots, probe))
    return {"report": report, "csv": out / "results.csv", "plots": plots, "summaries": summaries, "tests": tests}


# ---------------------------------------------------------- framework probe

#: (key, label) of the framework probe's configurations, in the order they run.
PROBE_CONFIGS = (
    ("k3_plain", "Keras 3, plain `fit` (no wrapper)"),
    ("k3_erm", "keras_aesam ERM"),
    ("k3_sam", "keras_aesam SAM"),
    ("tfk_plain", "tf_keras, plain `fit`"),
    ("tfk_plain_unfused_bn", "tf_keras, plain `fit`, BatchNormalization(fused=False)"),
    ("tfk_sam", "tf_keras SharpnessAwareMinimization (peer)"),
)


def framework_probe(out, network="resnet8", batch_size=128, steps=20, repeats=5, warmup=3, rho=0.05,
                    stream=sys.stdout) -> dict:
    """Per-step cost of one network in Keras 3 and tf_keras, with and without SAM, in one process.

    Every configuration is built from the same initial weights and fitted on the same
    cached batches (synthetic, Fashion-MNIST-shaped: the cost does not depend on the
    values); the configurations run interleaved, ``repeats`` times ``steps`` steps
    each, the first ``warmup`` steps of every fit dropped. Writes
    ``OUT/framework_probe.json`` and ``.md``; answers why the peer's step is cheaper
    (or not) than ours.
    """
    import keras
    import tensorflow as tf
    import tf_keras

    import keras_aesam

    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch_size * 8, 28, 28, 1)).astype("float32")
    y = rng.integers(0, 10, batch_size * 8).astype("int32")
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size).cache().repeat().prefetch(2)
    keras.utils.set_random_seed(0)
    weights = build_network(keras, network, num_classes=10, input_shape=(28, 28, 1)).get_weights()

    def make(key):
        K = tf_keras if key.startswith("tfk") else keras
        options = {"bn_options": {"fused": False}} if key == "tfk_plain_unfused_bn" else {}
        inner = build_network(K, network, num_classes=10, input_shape=(28, 28, 1), **options)
        inner.set_weights(weights)
        if key in ("k3_plain", "tfk_plain", "tfk_plain_unfused_bn"):
            model = inner
        elif key == "tfk_sam":
            model = tf_keras.models.experimental.SharpnessAwareMinimization(inner, rho=rho)
        else:
            model = keras_aesam.wrap(inner, method=key.split("_", 1)[1], rho=rho)
        model.compile(optimizer=K.optimizers.SGD(0.01, momentum=0.9),
                      loss=K.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=[K.metrics.SparseCategoricalAccuracy(name="accuracy")], jit_compile=False)
        model.fit(ds, steps_per_epoch=warmup, epochs=1, verbose=0)  # tracing
        return model, _make_timer(K)

    keys = [k for k, _ in PROBE_CONFIGS]
    models = {k: make(k) for k in keys}
    wall = {k: [] for k in keys}
    cpu = {k: [] for k in keys}
    load_start = _loadavg()
    for _ in range(repeats):
        for key in keys:
            model, timer = models[key]
            timer.step_seconds.clear()
            timer.step_cpu_seconds.clear()
            timer.epoch_seconds.clear()
            model.fit(ds, steps_per_epoch=steps, epochs=1, verbose=0, callbacks=[timer])
            wall[key] += timer.step_seconds[0][warmup:]
            cpu[key] += timer.step_cpu_seconds[0][warmup:]
    result = {
        "network": network, "batch_size": batch_size, "steps": steps, "repeats": repeats, "warmup": warmup,
        "loadavg_start": load_start, "loadavg_end": _loadavg(), "machine": _machine(), "versions": _versions(),
        "finished": datetime.datetime.now().isoformat(timespec="seconds"),
        "configs": {k: {"label": label, "n": len(wall[k]), "wall_ms": 1000 * float(np.mean(wall[k])),
                        "cpu_ms": 1000 * float(np.mean(cpu[k]))} for k, label in PROBE_CONFIGS},
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "framework_probe.json", result)
    (out / "framework_probe.md").write_text(_probe_markdown(result))
    print(_probe_markdown(result), file=stream, flush=True)
    return result


def _probe_markdown(result):
    c = result["configs"]
    base = {"k3": c["k3_plain"], "tfk": c["tfk_plain"]}
    lines = [
        f"Framework probe: {result['network']}, batch {result['batch_size']}, {result['repeats']} interleaved "
        f"rounds of {result['steps']} steps per configuration (first {result['warmup']} of each dropped), one "
        f"process, finished {result['finished']}, load average {result['loadavg_start']} → "
        f"{result['loadavg_end']}.",
        "",
        "| configuration | n | wall ms/step | CPU ms/step | CPU / Keras 3 plain | CPU / same framework's plain |",
        "|---|---|---|---|---|---|",
    ]
    for key, label in PROBE_CONFIGS:
        row = c[key]
        own = base["tfk" if key.startswith("tfk") else "k3"]
        lines.append(f"| {label} | {row['n']} | {row['wall_ms']:.0f} | {row['cpu_ms']:.0f} | "
                     f"{row['cpu_ms'] / c['k3_plain']['cpu_ms']:.2f} | {row['cpu_ms'] / own['cpu_ms']:.2f} |")
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------- entry point


#: The evidence profile (``keras_aesam.evidence``): its own plan, flags and report.
NOISY_LABELS_PROFILE = "noisy-labels"


def _noisy_labels_argv(argv):
    """The arguments left for the evidence profile when ``--profile noisy-labels`` is given, else None."""
    for i, arg in enumerate(argv):
        if arg == f"--profile={NOISY_LABELS_PROFILE}":
            return argv[:i] + argv[i + 1:]
        if arg == "--profile" and i + 1 < len(argv) and argv[i + 1] == NOISY_LABELS_PROFILE:
            return argv[:i] + argv[i + 2:]
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``keras-aesam bench``: returns the exit code (2 for bad input, as argparse)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    evidence_argv = _noisy_labels_argv(argv)
    if evidence_argv is not None:
        from keras_aesam import evidence

        return evidence.main(evidence_argv, prog="keras-aesam bench --profile noisy-labels")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker:
        return _worker(args.worker)
    try:
        if args.framework_probe:
            if not _peer_available():
                raise BadInput(f"--framework-probe needs tf_keras: pip install '{PEER_REQUIREMENT}'")
            if args.probe_repeats < 1:
                raise BadInput(f"--probe-repeats must be >= 1, got {args.probe_repeats}")
            network = args.network or COMMON["network"]
            if network not in BENCH_NETWORKS:
                raise BadInput(f"--framework-probe needs one of {', '.join(sorted(BENCH_NETWORKS))}")
            out = Path(args.output) if args.output else Path("bench_results") / args.profile
            framework_probe(out, network=network, batch_size=args.batch_size or COMMON["batch_size"],
                            repeats=args.probe_repeats, rho=args.rho or COMMON["rho"])
            if (out / "runs").is_dir():
                write_report(out)
            return 0
        if args.report_only:
            out = Path(args.output) if args.output else Path("bench_results") / args.profile
            if not (out / "runs").is_dir():
                raise BadInput(f"no results in {str(out)!r} (expected {str(out / 'runs')!r})")
            paths = write_report(out)
            print(f"report: {paths['report']}")
            return 0
        plan = resolve(args)
        seconds = check_budget(plan)
        if args.dry_run:
            print(f"{len(plan['runs'])} runs, estimated {seconds / 60:.1f} min on the reference machine "
                  f"(budget {plan['budget_minutes']:g} min) -> {plan['output']}")
            for spec in plan["runs"]:
                print(f"  {spec['run_id']}: {spec['hyperparameters']}")
            return 0
        program = "python -m keras_aesam.bench" if __name__ == "__main__" else "keras-aesam bench"
        return run_bench(plan, argv, fresh=args.fresh, program=program)
    except BadInput as err:
        parser.error(str(err))
    except FileNotFoundError as err:
        print(f"keras-aesam bench: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
