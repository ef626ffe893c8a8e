"""The ``keras-aesam`` command: ``train`` one experiment, ``plot`` a run again.

``keras-aesam train`` runs a whole experiment of the paper's kind: data (with
optional label noise), network, method, SGD with momentum, weight decay and a
cosine schedule, Keras progress bars, and a run directory::

    RUN_DIR/config.json          every setting, resolved, plus the results
    RUN_DIR/history.csv          per-epoch logs (keras.callbacks.CSVLogger)
    RUN_DIR/steps.csv            per-step logs (keras_aesam.callbacks.StepRecorder)
    RUN_DIR/grad_norms.csv       ‖g‖² samples at chosen epochs (Fig. 3)
    RUN_DIR/*.png                the plots of keras_aesam.plots
    RUN_DIR/model.keras          the trained sharpness-aware model
    RUN_DIR/backup/state.npz     the run's full state while it trains (see below)
    RUN_DIR/.keras-aesam-files   the manifest of the files above (keras_aesam.safety)
    EXPORT_DIR/<run name>/       the exported SavedModel (inference only)

and ends with one summary line (test accuracy, %SAM, wall time).
``keras-aesam plot RUN_DIR`` redraws the plots from the CSV files.

Resuming. The backup (every variable of model, optimizer and metrics, the
position in the data stream, the StepRecorder's unwritten rows and the CSV
files' sizes) is written at every epoch end and, with ``--backup-steps N``,
every N steps; SIGINT and SIGTERM write it at the next step boundary and exit
with the command to continue. ``keras-aesam train --resume --output RUN_DIR``
continues from it with the flags in ``config.json`` and ends exactly where an
uninterrupted run ends. ``--overwrite`` and every other removal delete only the
files the manifest lists (:mod:`keras_aesam.safety`).

Bad input (unknown names, out-of-range numbers, a hyperparameter the method
does not take, an existing output directory without ``--overwrite``, labels
that do not fit the number of classes) stops the command before any training,
with exit code 2 and a one-line message, as argparse does.

Programmatic use: :func:`run` takes the same arguments and returns the results
as a dict (the examples use it); :func:`main` is the console script.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from keras_aesam import devices, flags, safety
from keras_aesam.flags import (  # noqa: F401  (BadInput and the table are part of this module's API)
    HYPERPARAMETER_FLAGS,
    BadInput,
    check as _check,
    method_takes as _method_takes,
    one_line as _one_line,
    write_json as _write_json,
)
from keras_aesam.validation import canonical_name as _canonical

__all__ = ["DEFAULTS", "HYPERPARAMETER_FLAGS", "build_parser", "main", "run"]

#: Defaults of ``keras-aesam train``. Chosen so that the bare command (offline
#: Fashion-MNIST, the 784-512-512-10 MLP, AE-SAM, all 54 000 training examples,
#: 10 epochs) trains in about a minute on 2 CPU cores: measured 89.3 % test
#: accuracy, 45.2 % SAM steps, 54 s of training (1m05s wall time) on 2 cores
#: shared with other jobs (load average 7-9). The small CNN took 5m42s for 86.5 %.
DEFAULTS = {
    "dataset": "fashion_mnist",
    "network": "mlp",
    "method": "ae_sam",
    "epochs": 10,
    "batch_size": 128,
    "lr": None,  # resolved by _default_lr
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "weight_decay_mode": "l2",
    "schedule": "cosine",
    "label_noise": 0.0,
    "seed": 0,
    "train_size": "all",
    "validation_fraction": 0.1,
    "grad_norm_batches": 32,
}

#: The paper's learning rate (§4.1, SGD for the CIFAR networks); the small CNN
#: (no BatchNorm before its dense layers) diverges at first with it: 0.02 was
#: the best of 0.005 / 0.01 / 0.02 / 0.03 / 0.05 / 0.1 in the default setting.
PAPER_LR = 0.1
SMALL_CNN_LR = 0.02

#: The backup inside a run directory, and the CSV logs it keeps in step with.
BACKUP_FILE = "backup/state.npz"
_CSV_FILES = ("history.csv", "steps.csv", "grad_norms.csv")
#: Files a run directory gets (the PNGs are claimed by keras_aesam.plots).
_RUN_FILES = ("config.json", "config.json.tmp", *_CSV_FILES, "model.keras", BACKUP_FILE, BACKUP_FILE + ".tmp")
#: What run directories and exports written before the manifest existed hold.
_LEGACY_RUN_FILES = ("config.json", *_CSV_FILES, "model.keras", "*.png")
_LEGACY_EXPORT_FILES = ("saved_model.pb", "fingerprint.pb", "variables/*", "assets/*")
#: Flags that may differ on --resume: they change what is shown, not what is computed.
_RESUME_FREE = ("resume", "output", "overwrite", "quiet", "verbose", "no_plots", "backup_steps")

logger = logging.getLogger("keras_aesam.cli")


class DataUnavailable(Exception):
    """The data set cannot be loaded here (no files, no network, a missing module): exit code 1."""


# ---------------------------------------------------------------------- helpers




def _resolve_name(kind, name, valid):
    """The registry key matching ``name`` (case, '-', '_' ignored), else BadInput."""
    wanted = _canonical(name)
    for key in valid:
        if _canonical(key) == wanted:
            return key
    raise BadInput(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(sorted(valid))}")


def _default_export_root() -> Path:
    """The repository's ``saved_models/`` for a source checkout, else ``./saved_models``."""
    repo = Path(__file__).resolve().parent.parent
    if (repo / "pyproject.toml").is_file() and (repo / "keras_aesam").is_dir():
        return repo / "saved_models"
    return Path.cwd() / "saved_models"


def _default_lr(model):
    return SMALL_CNN_LR if _canonical(model) == _canonical("small_cnn") else PAPER_LR


def _int_list(text):
    """``"1,5,10"`` -> [1, 5, 10]; ``"none"`` -> []; ``"auto"`` -> None."""
    text = text.strip().lower()
    if text == "auto":
        return None
    if text in ("", "none", "off"):
        return []
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, 'auto' or 'none', got {text!r}") from None


def _format_duration(seconds):
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s"


# ----------------------------------------------------------------------- parser


def _names():
    from keras_aesam import METHODS
    from keras_aesam.data import DATASETS
    from keras_aesam.networks import NETWORKS

    return sorted(DATASETS), sorted(NETWORKS), list(METHODS)


_TRAIN_EPILOG = """\
weight decay (--weight-decay-mode):
  l2         (default) an L2 kernel regularizer of weight_decay/2 on every conv and
             dense kernel: its gradient weight_decay*w enters before momentum, as
             PyTorch's SGD(weight_decay=...) which the paper used. The term is part
             of the loss, so it is also in g, in ||g||^2 (the AE policy's statistic)
             and in SAM's perturbation, as in the original JAX SAM. Biases and
             BatchNorm parameters are not decayed (PyTorch's default decays them too).
  decoupled  keras.optimizers.SGD(weight_decay=...): w -= lr*weight_decay*w after the
             update, on every weight; outside g, but a much weaker decay (no
             momentum amplification, about 10x weaker at momentum 0.9).
  Keep one mode for every method in a comparison.

The cosine schedule decays the learning rate to 0 over epochs x steps per epoch
(keras.optimizers.schedules.CosineDecay). --jit compiles each forward-backward
pass with XLA (the policy's branch stays outside); it is slower on CPU.
steps.csv has one row per step, or per execution with --steps-per-execution > 1.

several devices:
  --batch-size is the global batch: each of R replicas gets --batch-size / R examples
  per step (the start-up line prints both). Under multi-worker every process runs the
  same command with its own TF_CONFIG; only the chief writes the run directory, plots
  and export (the others write to a temporary folder and delete it), and --resume
  continues from the chief's backup, which every worker must be able to read.

examples:
  keras-aesam train              # Fashion-MNIST, MLP, AE-SAM: ~89 % test accuracy, ~1 min of training on 2 cores
  keras-aesam train --model resnet18 --dataset cifar10 --epochs 200 --lr 0.1 \\
      --method ae_looksam --output runs/cifar10-aelooksam
  keras-aesam train --noise 0.4 --method looksam --k 2 --output runs/noise40
  keras-aesam train --resume --output runs/noise40   # after a crash, kill or Ctrl-C
  keras-aesam plot runs/noise40
"""


def build_parser() -> argparse.ArgumentParser:
    datasets, networks, methods = _names()
    parser = argparse.ArgumentParser(
        prog="keras-aesam",
        description="Sharpness-aware training that uses SAM only where it pays (AE-SAM, ICLR 2023).",
    )
    from keras_aesam import __version__

    parser.add_argument("--version", action="version", version=f"keras-aesam {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{train,plot,bench}")
    sub.required = True

    t = sub.add_parser(
        "train",
        help="train a model and write a run directory",
        description="Train a network with a sharpness-aware method and write a run directory "
        "(config.json, history.csv, steps.csv, plots, model.keras) plus an exported SavedModel.",
        epilog=_TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = t.add_argument_group("experiment")
    g.add_argument("--dataset", default=DEFAULTS["dataset"],
                   help=f"one of {', '.join(datasets)} (default %(default)s, offline)")
    flags.add_flag(g, "--network", default=DEFAULTS["network"],
                   help=f"one of {', '.join(networks)} (default %(default)s; also --model)")
    g.add_argument("--method", default=DEFAULTS["method"],
                   help=f"one of {', '.join(methods)} (default %(default)s)")
    g.add_argument("--epochs", type=int, default=DEFAULTS["epochs"], help="default %(default)s")
    g.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"], help="default %(default)s")
    g.add_argument("--train-size", type=str, default=str(DEFAULTS["train_size"]),
                   help="training examples kept after the validation split, or 'all' "
                   "(default %(default)s)")
    flags.add_flag(g, "--label-noise", type=float, default=DEFAULTS["label_noise"],
                   help="fraction of training labels flipped to another class, in [0, 1) "
                   "(paper §4.3; default %(default)s)")
    g.add_argument("--seed", type=int, default=DEFAULTS["seed"],
                   help="seed of the split, the noise, the initialization and the methods' "
                   "random draws (default %(default)s)")
    g.add_argument("--validation-fraction", type=float, default=DEFAULTS["validation_fraction"],
                   help="share of the training set held out (default %(default)s)")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="pad-4 / random-crop / flip augmentation (default: on for CIFAR, off otherwise)")
    g.add_argument("--num-classes", type=int, default=None,
                   help="classifier outputs (default: the data set's; must fit every label)")
    g.add_argument("--data-dir", default=None, help="where the data set's files are (optional)")
    g.add_argument("--manual-dir", default=None, help="imagenet2012 only: the folder with the tar files")

    g.add_argument("--eval-batches", type=int, default=None,
                   help="evaluate validation and test on their first N batches only (default: all; "
                   "for quick runs on large data sets; config.json records it)")

    o = t.add_argument_group("optimizer")
    o.add_argument("--lr", type=float, default=DEFAULTS["lr"],
                   help=f"initial learning rate (default {PAPER_LR} as in the paper; "
                   f"{SMALL_CNN_LR} for small_cnn)")
    o.add_argument("--momentum", type=float, default=DEFAULTS["momentum"], help="SGD momentum (default %(default)s)")
    o.add_argument("--weight-decay", type=float, default=DEFAULTS["weight_decay"], help="default %(default)s")
    o.add_argument("--weight-decay-mode", choices=("l2", "decoupled"), default=DEFAULTS["weight_decay_mode"],
                   help="how weight decay is applied (default %(default)s: PyTorch's coupled decay "
                   "through an L2 kernel regularizer of weight_decay/2; see below)")
    o.add_argument("--schedule", choices=("cosine", "constant"), default=DEFAULTS["schedule"],
                   help="learning-rate schedule (default %(default)s, over all training steps)")
    o.add_argument("--jit", action="store_true", help="XLA-compile the passes (slower on CPU)")
    o.add_argument("--steps-per-execution", type=int, default=1, help="default %(default)s")

    d = t.add_argument_group("devices (see 'several devices' below)")
    devices.add_strategy_flags(d)

    h = t.add_argument_group("method hyperparameters (only those the method takes; defaults are the paper's)")
    flags.add_hyperparameter_flags(h)
    h.add_argument("--total-steps", type=int, default=None,
                   help="the schedule's T (default: epochs x steps per epoch) [all]")

    r = t.add_argument_group("output")
    r.add_argument("--output", default=None,
                   help="run directory (default runs/<dataset>_<model>_<method>_<time>)")
    r.add_argument("--overwrite", action="store_true",
                   help="replace an existing run directory and export (deletes only files keras-aesam wrote)")
    r.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in --output from its last backup, with the flags "
                   "of its config.json (flags given must match them)")
    r.add_argument("--backup-steps", type=int, default=0,
                   help="also back up the run every N steps (default 0: at the end of every epoch only)")
    r.add_argument("--export-dir", default=None,
                   help=f"where the SavedModel goes, as <export-dir>/<run name> "
                   f"(default: {_default_export_root()})")
    flags.add_flag(r, "--grad-norm-epochs", type=_int_list, default=None,
                   help="completed epochs after which to sample ||g||^2 at fixed weights for the "
                   "Fig. 3 histogram, e.g. 1,50,200 (0 = before training; default 'auto' = first, "
                   "middle, last; 'none' to skip)")
    flags.add_flag(r, "--grad-norm-batches", type=int, default=DEFAULTS["grad_norm_batches"],
                   help="mini-batches per sampled epoch (default %(default)s)")
    r.add_argument("--no-plots", action="store_true", help="do not draw the PNG plots")
    r.add_argument("--verbose", action="store_true",
                   help="also log the data source, the model summary and the policy state per epoch")
    r.add_argument("--quiet", action="store_true", help="no progress bars (the summary line still prints)")

    p = sub.add_parser(
        "plot",
        help="redraw the plots of a run directory",
        description="Redraw the PNG plots of a run directory from its history.csv, steps.csv "
        "and grad_norms.csv.",
    )
    p.add_argument("run_dir", help="a directory written by keras-aesam train")
    p.add_argument("--epochs", type=_int_list, default=None,
                   help="epochs for the ||g||^2 distribution plot, e.g. 0,5: completed epochs as sampled "
                   "in grad_norms.csv, else epochs of steps.csv (default: all sampled)")
    p.add_argument("--output-dir", default=None, help="where to write the PNGs (default RUN_DIR)")
    # `keras-aesam bench ...` is handed to keras_aesam.bench before parsing (see main);
    # listed here for --help only.
    sub.add_parser("bench", help="compare methods side by side on identical data, "
                   "weights and seeds (keras-aesam bench --help)", add_help=False)
    parser.subcommands = {"train": t, "plot": p}  # for error messages in the subcommand's name
    return parser


# ------------------------------------------------------------------- validation


def _resolve(args, network=None, chief=True):
    """Checks every argument that can be checked without data; returns the plan."""
    from keras_aesam import METHODS, build_method
    from keras_aesam.data import DATASETS
    from keras_aesam.networks import NETWORKS

    dataset = _resolve_name("dataset", args.dataset, DATASETS)
    model = args.model if network is not None else _resolve_name("network", args.model, NETWORKS)
    method = _resolve_name("method", args.method, METHODS)

    _check(args.epochs >= 1, f"--epochs must be >= 1, got {args.epochs}")
    _check(args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}")
    _check(0.0 <= args.noise < 1.0, f"--noise must be in [0, 1), got {args.noise:g}")
    _check(args.seed >= 0, f"--seed must be >= 0, got {args.seed}")
    _check(0.0 <= args.validation_fraction < 1.0,
           f"--validation-fraction must be in [0, 1), got {args.validation_fraction:g}")
    if str(args.train_size).lower() in ("all", "none", "full"):
        train_size = None
    else:
        try:
            train_size = int(args.train_size)
        except ValueError:
            raise BadInput(f"--train-size must be an integer >= 1 or 'all', got {args.train_size!r}") from None
        _check(train_size >= 1, f"--train-size must be >= 1 or 'all', got {train_size}")
    lr = _default_lr(model) if args.lr is None else args.lr
    _check(lr > 0 and math.isfinite(lr), f"--lr must be > 0, got {lr:g}")
    _check(0.0 <= args.momentum < 1.0, f"--momentum must be in [0, 1), got {args.momentum:g}")
    _check(args.weight_decay >= 0, f"--weight-decay must be >= 0, got {args.weight_decay:g}")
    _check(args.steps_per_execution >= 1, f"--steps-per-execution must be >= 1, got {args.steps_per_execution}")
    _check(args.eval_batches is None or args.eval_batches >= 1,
           f"--eval-batches must be >= 1, got {args.eval_batches}")
    _check(args.hist_batches >= 1, f"--hist-batches must be >= 1, got {args.hist_batches}")
    _check(args.num_classes is None or args.num_classes >= 1,
           f"--num-classes must be >= 1, got {args.num_classes}")
    _check(args.total_steps is None or args.total_steps >= 1,
           f"--total-steps must be >= 1, got {args.total_steps}")
    _check(args.manual_dir is None or dataset == "imagenet2012",
           f"--manual-dir is for imagenet2012 only, not {dataset}")
    if args.hist_epochs is None:
        hist_epochs = sorted({1, (args.epochs + 1) // 2, args.epochs})
    else:
        hist_epochs = sorted(set(args.hist_epochs))
        bad = [e for e in hist_epochs if not 0 <= e <= args.epochs]
        _check(not bad, f"--hist-epochs must be in [0, {args.epochs}] (completed epochs), got {bad}")

    # Method hyperparameters: only those the method takes, and valid values.
    takes = _method_takes(method)
    hyperparameters = {}
    refused = []
    for name, flag, _kind, _ in HYPERPARAMETER_FLAGS:
        value = getattr(args, _HYPERPARAMETER_DEST.get(name, name))
        if value is None:
            continue
        if name not in takes:
            refused.append(flag)
        else:
            hyperparameters[name] = value
    if refused:
        accepted = [f for n, f, _, _ in HYPERPARAMETER_FLAGS if n in takes] + ["--total-steps"]
        raise BadInput(
            f"method {method!r} does not take {', '.join(refused)}; it takes {', '.join(accepted)}"
        )
    from keras_aesam.methods import method_parameters

    if "seed" in method_parameters(method):
        hyperparameters["seed"] = args.seed
    try:
        policy, direction = build_method(method, **hyperparameters)
    except (ValueError, TypeError) as err:
        raise BadInput(f"invalid hyperparameter for {method}: {_one_line(err)}") from err

    plan = {
        "dataset": dataset,
        "model": model,
        "method": method,
        "train_size": train_size,
        "lr": lr,
        "hist_epochs": hist_epochs,
        "hyperparameters": hyperparameters,
        "policy": policy,
        "direction": direction,
    }
    # Output locations.
    if args.output is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = Path("runs") / f"{dataset}_{_canonical(model)}_{method}_{stamp}"
    else:
        run_dir = Path(args.output)
    _check(run_dir.name not in ("", ".", ".."), f"--output must name a directory, got {args.output!r}")
    export_root = Path(args.export_dir) if args.export_dir else _default_export_root()
    export_path = export_root / run_dir.resolve().name
    _check(args.backup_steps >= 0, f"--backup-steps must be >= 0 (0 = every epoch only), got {args.backup_steps}")
    _check(not run_dir.exists() or run_dir.is_dir(), f"--output {str(run_dir)!r} is a file")
    if not chief:  # another worker of a cluster: the chief checks and writes the run directory
        return {**plan, "read_dir": run_dir, "run_dir": Path(tempfile.mkdtemp(prefix="keras-aesam-worker-")),
                "export_path": None}
    if not args.overwrite and not args.resume:
        unfinished = _unfinished(run_dir)
        _check(not run_dir.exists(),
               f"output directory {str(run_dir)!r} holds an unfinished run ({unfinished}); pass --resume to "
               "continue it, --overwrite to replace it, or choose another --output" if unfinished else
               f"output directory {str(run_dir)!r} exists; pass --overwrite to replace it or choose another --output")
        _check(not export_path.exists(),
               f"export directory {str(export_path)!r} exists; pass --overwrite or another --export-dir/--output")
    from keras_aesam.plots import PLOT_FILES

    action = "--resume" if args.resume else "--overwrite"
    _check_replaceable(run_dir, "config.json", _LEGACY_RUN_FILES, _RUN_FILES + tuple(PLOT_FILES.values()), action)
    _check_replaceable(export_path, "saved_model.pb", _LEGACY_EXPORT_FILES, (), action)
    return {**plan, "read_dir": run_dir, "run_dir": run_dir, "export_path": export_path}


# --------------------------------------------------------------------- training


def _load_data(args, plan, dataset_kwargs):
    from keras_aesam import data as data_module

    kwargs = dict(
        batch_size=args.batch_size,
        seed=args.seed,
        label_noise=args.noise,
        train_size=plan["train_size"],
        validation_fraction=args.validation_fraction,
    )
    if args.data_dir is not None:
        kwargs["data_dir"] = args.data_dir
    if args.manual_dir is not None:
        kwargs["manual_dir"] = args.manual_dir
    if args.augment is not None:
        kwargs["augment"] = args.augment
    kwargs.update(dataset_kwargs or {})
    return data_module.get_dataset(plan["dataset"], **kwargs)


def _build_network(args, plan, data, network):
    from keras_aesam.networks import get_network
    from keras_aesam.recipe import kernel_regularizer

    num_classes = data.num_classes if args.num_classes is None else args.num_classes
    if num_classes < data.num_classes:
        raise BadInput(
            f"labels of {plan['dataset']} take {data.num_classes} values (0..{data.num_classes - 1}), "
            f"which do not fit --num-classes {num_classes}"
        )
    regularizer = kernel_regularizer(_recipe(args, plan))
    kwargs = dict(num_classes=num_classes, input_shape=data.input_shape, kernel_regularizer=regularizer)
    try:
        if network is not None:
            return network(**kwargs), num_classes
        return get_network(plan["model"], **kwargs), num_classes
    except ValueError as err:
        raise BadInput(f"cannot build {plan['model']}: {_one_line(err)}") from err


class StreamView:
    """The next ``count`` batches of a shared iterator, as a generator function that may be called again.

    Under a distribution strategy Keras opens the training data once to build
    the model and once more to train; each call of this object starts at the
    view's first batch again, replaying the batches an earlier call took (an
    earlier call stops once a later one starts). Only the last ``keep`` batches
    are kept: a call that would need older ones raises RuntimeError.
    """

    def __init__(self, stream, count, keep=256):
        self.stream, self.count, self.keep = stream, count, keep
        self.taken = []  # the batches taken from ``stream`` so far, from index ``self.dropped`` on
        self.dropped = 0
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self):
        with self.lock:
            self.calls += 1
            call = self.calls
            if self.dropped:
                raise RuntimeError(f"the training data was read again after {self.dropped} of its "
                                   f"batches were passed on; at most {self.keep} can be replayed")
        for index in range(self.count):
            with self.lock:
                if call != self.calls:  # a later call took over
                    return
                if index - self.dropped == len(self.taken):
                    try:
                        self.taken.append(next(self.stream))
                    except StopIteration:
                        return
                batch = self.taken[index - self.dropped]
                if len(self.taken) > self.keep:
                    del self.taken[0]
                    self.dropped += 1
            yield batch


def _build_model(args, plan, data, network, total_steps):
    """The network, wrapped by the method and compiled with the recipe: ``(inner, num_classes, model)``."""
    import keras_aesam
    from keras_aesam import recipe

    inner, num_classes = _build_network(args, plan, data, network)
    model = keras_aesam.wrap(inner, method=plan["method"], total_steps=total_steps,
                             sync_perturbation=args.sync_perturbation, **plan["hyperparameters"])
    recipe.compile_model(model, _recipe(args, plan), args.epochs * data.steps_per_epoch,
                         jit_compile=bool(args.jit), steps_per_execution=args.steps_per_execution)
    return inner, num_classes, model


def _recipe(args, plan):
    from keras_aesam.recipe import Recipe

    return Recipe(lr=plan["lr"], momentum=args.momentum, weight_decay=args.weight_decay,
                  weight_decay_mode=args.weight_decay_mode, schedule=args.schedule)


def _load_backup(args, plan, model, data):
    """``--resume``: the state of the run's last backup, loaded into ``model``; None before the first one.

    Every worker of a cluster reads the chief's backup (Keras's BackupAndRestore convention).
    """
    from keras_aesam.callbacks import load_training_state

    backup_file = plan["read_dir"] / BACKUP_FILE
    if not backup_file.is_file():  # none yet: from the start, as the seeds rebuild it
        return None
    # Metrics and optimizer variables exist only once built; build them now, without data.
    model._symbolic_build(data_batch=next(iter(data.test)))
    try:
        meta = load_training_state(model, backup_file)
    except ValueError as err:
        raise BadInput(f"--resume: {_one_line(err)}") from err
    _check(meta.get("steps_per_epoch") == data.steps_per_epoch,
           f"--resume: the backup has {meta.get('steps_per_epoch')} steps per epoch, this data {data.steps_per_epoch}")
    return meta


def _evaluate_locally(model, dataset):
    """``{"accuracy", "loss"}`` of ``model`` on ``dataset`` in this process, as ``model.evaluate`` computes them.

    The loss is the mean cross-entropy over the examples plus the weight penalty.
    """
    import numpy as np

    total_loss, correct, count = 0.0, 0, 0
    for x, y in dataset:
        logits = model(x, training=False).numpy().astype("float64")
        labels = np.asarray(y).reshape(-1)
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        total_loss -= float(log_probs[np.arange(len(labels)), labels].sum())
        correct += int((logits.argmax(axis=1) == labels).sum())
        count += len(labels)
    penalty = float(sum(float(loss) for loss in model.losses))
    return {"accuracy": correct / max(count, 1), "loss": total_loss / max(count, 1) + penalty}


def _LocalValidation(evaluate, validation):
    """A callback adding ``val_accuracy`` and ``val_loss`` of :func:`_evaluate_locally` at each epoch end."""
    import keras

    class LocalValidation(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if logs is not None:
                logs.update({f"val_{name}": value for name, value in evaluate(validation).items()})

    return LocalValidation()


def _policy_printer(model):
    """A callback printing the policy state after each epoch (``--verbose``)."""
    import keras

    class PolicyPrinter(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            state = model.policy_state
            parts = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in state.items())
            print(f"  policy state after epoch {epoch + 1}: {parts}", flush=True)

    return PolicyPrinter()


def _check_replaceable(path: Path, marker: str, legacy: Sequence[str], names: Sequence[str], action: str):
    """BadInput unless the files of ours in ``path`` may be replaced (keras_aesam.safety).

    A folder written before manifests existed is recognised by ``marker`` and its
    ``legacy`` files adopted. A file a user put there under one of ``names`` (which
    the run will write) is refused; other files of theirs are kept.
    """
    if not path.exists():
        return
    _check(path.is_dir(), f"{str(path)!r} is a file, not a folder")
    safety.adopt(path, marker, legacy)
    try:
        safety.check_ours(path, action)
    except safety.NotOurs as err:
        raise BadInput(str(err)) from err
    ours = set(safety.written(path))
    clash = [n for n in names if (path / n).exists() and n not in ours]
    _check(not clash, f"{action} refuses to replace {', '.join(str(path / n) for n in clash)}: "
           "keras-aesam did not write it")


def _unfinished(run_dir: Path) -> Optional[str]:
    """``"last backup at step N of T"`` for an interrupted run of ours, else None."""
    config = _read_config(run_dir)
    if config is None or _finished(config):
        return None
    meta = _backup_meta(run_dir)
    total = config.get("epochs", 0) * config.get("steps_per_epoch", 0)
    return f"last backup at step {meta['step'] if meta else 0} of {total}"


def _read_config(run_dir: Path) -> Optional[dict]:
    try:
        return json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None


def _finished(config: dict) -> bool:
    return "test_accuracy" in (config.get("results") or {})


def _backup_meta(run_dir: Path) -> Optional[dict]:
    """The backup's record (step, epoch, batch, ...) without loading a model, or None."""
    import numpy as np

    try:
        with np.load(run_dir / BACKUP_FILE) as data:
            return json.loads(bytes(data["meta"]).decode("utf-8"))
    except (OSError, KeyError, ValueError):
        return None


def _explicit_flags(argv: Sequence[str]) -> dict:
    """The ``train`` flags ``argv`` gives explicitly (defaults left out)."""
    parser = build_parser()
    for action in parser.subcommands["train"]._actions:
        if action.dest != "help":
            action.default = argparse.SUPPRESS
    namespace = parser.parse_args(list(argv))
    return {k: v for k, v in vars(namespace).items() if k != "command"}


def _resume_args(parser, argv, args):
    """``--resume``: the run's own flags (from its config.json), after checking ``argv`` against them."""
    _check(args.output is not None, "--resume needs --output RUN_DIR (the run to continue)")
    _check(not args.overwrite, "--resume and --overwrite exclude each other")
    run_dir = Path(args.output)
    config = _read_config(run_dir)
    _check(config is not None and config.get("command") == "keras-aesam train",
           f"--resume: {str(run_dir)!r} holds no keras-aesam train run (no readable config.json)")
    if _finished(config):
        raise BadInput(f"--resume: the run in {str(run_dir)!r} already finished (test accuracy "
                       f"{config['results']['test_accuracy']:.4f}); nothing to resume")
    stored_argv = config.get("argv")
    _check(isinstance(stored_argv, list) and stored_argv[:1] == ["train"],
           f"--resume: {str(run_dir / 'config.json')!r} does not record the command's flags")
    stored = parser.parse_args(stored_argv)
    given = _explicit_flags(argv)
    differ = []
    for dest, value in given.items():
        if dest not in _RESUME_FREE and getattr(stored, dest, None) != value:
            flag = "--" + dest.replace("_", "-")
            differ.append(f"{flag} {value} (the run has {getattr(stored, dest, None)})")
    _check(not differ, f"--resume: flags differ from {str(run_dir / 'config.json')!r}: {'; '.join(differ)}. "
           "Resume with the run's own flags (--resume --output RUN_DIR is enough), or start a new run "
           "with another --output")
    for dest in _RESUME_FREE:
        if dest in given:
            setattr(stored, dest, given[dest])
    stored.resume, stored.overwrite, stored.output = True, False, args.output
    stored.argv = stored_argv
    return stored


def _train(args, plan, network=None, dataset_kwargs=None):
    import keras
    import tensorflow as tf

    import keras_aesam
    from keras_aesam.callbacks import RunBackup, RunInterrupted, StepRecorder

    started = time.perf_counter()
    run_dir, export_path = plan["run_dir"], plan["export_path"]
    package_logger = logging.getLogger("keras_aesam")  # not the root logger: TF's INFO stays quiet
    if args.verbose and not package_logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        package_logger.addHandler(handler)
    package_logger.setLevel(logging.INFO if args.verbose else logging.WARNING)

    # Data and network: the remaining bad input (labels, shapes) shows up here.
    # Seeded first: the shuffle's seed pairs with TensorFlow's global seed, so the
    # batch order must not depend on what ran earlier in this process.
    keras.utils.set_random_seed(args.seed)
    try:
        data = _load_data(args, plan, dataset_kwargs)
    except ValueError as err:
        raise BadInput(_one_line(err)) from err
    except (ConnectionError, ImportError, FileNotFoundError) as err:  # e.g. no Fashion-MNIST anywhere
        raise DataUnavailable(f"cannot load {plan['dataset']}: {_one_line(err)}") from err
    strategy = plan["strategy"]
    replicas = strategy.num_replicas_in_sync
    _check(args.batch_size % replicas == 0,
           f"--batch-size (the global batch) must be a multiple of the {replicas} replicas, got {args.batch_size}")
    keras.utils.set_random_seed(args.seed)
    steps_per_epoch = data.steps_per_epoch
    total_steps = args.total_steps or args.epochs * steps_per_epoch
    with strategy.scope():  # the variables of model, optimizer and metrics are mirrored
        inner, num_classes, model = _build_model(args, plan, data, network, total_steps)
        resume_meta = _load_backup(args, plan, model, data) if args.resume else None
    start_step = resume_meta["step"] if resume_meta else 0
    start_epoch = resume_meta["epoch"] if resume_meta else 0
    start_batch = resume_meta["batch"] if resume_meta else 0

    # The run directory, only now that nothing can be refused any more.
    if not args.resume and plan["chief"]:
        for path in (run_dir, export_path):
            left = safety.remove_written(path)
            if left:
                print(f"keras-aesam: kept {len(left)} file(s) in {path} that keras-aesam did not write: "
                      f"{', '.join(left)}", file=sys.stderr, flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in _RUN_FILES:
        safety.claim(run_dir / name, run_dir)
    if not (run_dir / "backup").exists():
        (run_dir / "backup").mkdir()
        safety.record(run_dir, run_dir / "backup")
    sizes = resume_meta["files"] if resume_meta and plan["chief"] else {name: 0 for name in _CSV_FILES}
    for name in _CSV_FILES:  # back to the backup's point: every step once
        safety.truncate_written(run_dir / name, sizes.get(name, 0), run_dir)

    expected = model.policy.expected_sam_fraction(total_steps)
    previous = _read_config(run_dir) if args.resume else None
    config = {
        "command": "keras-aesam train",
        "argv": list(args.argv) if getattr(args, "argv", None) is not None else None,
        "dataset": plan["dataset"],
        "model": plan["model"] if isinstance(plan["model"], str) else getattr(inner, "name", "custom"),
        "method": plan["method"],
        "hyperparameters": model.hyperparameters,
        "total_steps": total_steps,
        "expected_sam_fraction": expected,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "strategy": type(strategy).__name__,
        "replicas": replicas,
        "sync_perturbation": bool(args.sync_perturbation),
        "steps_per_epoch": steps_per_epoch,
        "lr": plan["lr"],
        "schedule": args.schedule,
        "momentum": args.momentum,
        "weight_decay": args.weight_decay,
        "weight_decay_mode": args.weight_decay_mode,
        "noise": args.noise,
        "noise_rate_realised": data.noise_rate_realised,
        "seed": args.seed,
        "train_size": plan["train_size"],
        "train_examples": data.train_examples,
        "validation_fraction": args.validation_fraction,
        "validation_examples": data.validation_examples,
        "test_examples": data.test_examples,
        "num_classes": num_classes,
        "input_shape": list(data.input_shape),
        "data_source": data.source,
        "parameters": int(inner.count_params()),
        "jit": bool(args.jit),
        "steps_per_execution": args.steps_per_execution,
        "hist_epochs": plan["hist_epochs"],
        "hist_batches": args.hist_batches,
        "eval_batches": args.eval_batches,
        "run_dir": str(run_dir),
        "export_dir": str(export_path),
        "versions": {
            "keras_aesam": keras_aesam.__version__,
            "keras": keras.__version__,
            "tensorflow": tf.__version__,
        },
        "started": (previous or {}).get("started") or datetime.datetime.now().isoformat(timespec="seconds"),
        "resumed": list((previous or {}).get("resumed", [])),
    }
    if args.resume:
        config["resumed"].append({"from_step": start_step,
                                  "at": datetime.datetime.now().isoformat(timespec="seconds")})
    _write_json(run_dir / "config.json", config)

    hp = ", ".join(f"{k}={v}" for k, v in model.hyperparameters.items())
    noise = f", {100 * data.noise_rate_realised:.1f} % noisy labels" if args.noise else ""
    print(
        f"keras-aesam: {plan['method']} ({hp}) on {config['model']} "
        f"({config['parameters'] / 1e6:.2f} M parameters), {plan['dataset']}: {data.train_examples} train / "
        f"{data.validation_examples or 0} validation / {data.test_examples or '?'} test{noise}; "
        f"{args.epochs} epochs x {steps_per_epoch} steps of {args.batch_size} "
        f"({replicas} replica{'s' if replicas > 1 else ''} x {args.batch_size // replicas}), "
        f"lr {plan['lr']:g} {args.schedule}, "
        f"weight decay {args.weight_decay:g} ({args.weight_decay_mode}) -> {run_dir}",
        flush=True,
    )
    if args.resume:
        print(f"keras-aesam: resuming at step {start_step} of {args.epochs * steps_per_epoch} "
              f"(epoch {start_epoch + 1}, step {start_batch} of it done)", flush=True)
    if args.verbose:
        print(f"data source: {data.source}")
        inner.summary()

    # The batches: one stream over the epochs, drawn from a single iterator, so
    # a resumed run sees exactly the batches the uninterrupted run would. The
    # ‖g‖² sample batches are drawn once, before it (iterating the training
    # set again later would move the shuffle's seed and so the stream).
    hist_data = None
    if plan["hist_epochs"]:
        hist_data = list(data.train.repeat().take(args.hist_batches))
    stream = iter(data.train.repeat().skip(start_step))

    def stream_part(batches):
        # A bounded view (about 0.7 ms per batch, measured): prefetching cannot run past it.
        part = tf.data.Dataset.from_generator(StreamView(stream, batches),
                                              output_signature=data.train.element_spec)
        options = tf.data.Options()  # each worker takes its share of every global batch
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
        return part.prefetch(tf.data.AUTOTUNE).with_options(options)

    recorder = StepRecorder(
        run_dir / "steps.csv",
        append=True,
        initial_step=start_epoch * steps_per_epoch,
        grad_norm_epochs=plan["hist_epochs"],
        grad_norm_data=hist_data,
        grad_norm_batches=args.hist_batches,
        grad_norm_path=run_dir / "grad_norms.csv",
    )
    recorder.load_rows()
    backup = RunBackup(
        run_dir / BACKUP_FILE,
        steps_per_epoch=steps_per_epoch,
        every_steps=args.backup_steps,
        extra_state=lambda: {
            "steps_per_epoch": steps_per_epoch,
            "files": {n: (run_dir / n).stat().st_size if (run_dir / n).exists() else 0 for n in _CSV_FILES},
            "recorder": recorder.get_state(),
        },
    )
    if resume_meta:
        recorder.set_state(resume_meta["recorder"], batch_offset=start_batch)
        recorder.grad_norm_epochs = [e for e in recorder.grad_norm_epochs if e > start_epoch]
        backup.batch_offset = start_batch
        if start_batch:
            backup.metric_values = resume_meta["metric_values"]
    validation, test = data.validation, data.test
    if args.eval_batches is not None:
        validation = None if validation is None else validation.take(args.eval_batches)
        test = test.take(args.eval_batches)
    evaluate = lambda dataset: model.evaluate(dataset, verbose=0, return_dict=True)  # noqa: E731
    callbacks = []
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        # Keras's evaluate fails under this strategy (it reduces scalar metrics along an axis):
        # every worker evaluates on its own, at fixed weights, the same numbers.
        evaluate = lambda dataset: _evaluate_locally(model, dataset)  # noqa: E731
        if validation is not None:
            callbacks.append(_LocalValidation(evaluate, validation))
            validation = None
    callbacks += [keras.callbacks.CSVLogger(str(run_dir / "history.csv"), append=True), recorder]
    if args.verbose:
        callbacks.append(_policy_printer(model))
    callbacks.append(backup)  # last: its epoch-end backup includes the rows written before it

    # (first epoch, end epoch, steps per epoch): a resumed run first finishes its epoch.
    segments = []
    if start_batch:
        segments.append((start_epoch, start_epoch + 1, steps_per_epoch - start_batch))
    first_whole = start_epoch + 1 if start_batch else start_epoch
    if first_whole < args.epochs:
        segments.append((first_whole, args.epochs, steps_per_epoch))

    fit_started = time.perf_counter()
    interrupted = None
    previous_handlers = _catch_stop_signals(backup)
    try:
        for first, end, steps in segments:
            model.fit(
                stream_part(steps * (end - first)),
                initial_epoch=first,
                epochs=end,
                steps_per_epoch=steps,
                validation_data=validation,
                callbacks=callbacks,
                # A live bar on a terminal, one line per epoch in a log file.
                verbose=0 if args.quiet else (1 if sys.stdout.isatty() else 2),
                shuffle=False,  # the pipelines shuffle (seeded) themselves
            )
    except RunInterrupted as err:
        interrupted = err
    except KeyboardInterrupt as err:  # a second signal: stopped at once
        interrupted = err
    finally:
        _restore_signals(previous_handlers)
    if interrupted is None and backup.stop_signal is not None:  # arrived after the last check
        interrupted = RunInterrupted(backup.stop_signal, args.epochs * steps_per_epoch)
    if interrupted is not None:
        recorder.on_train_end()  # the interrupted epoch's rows, for the plots (a resume cuts them off)
    train_seconds = time.perf_counter() - fit_started

    results = {"interrupted": interrupted is not None}
    if args.resume:
        results["resumed_from_step"] = start_step
    if interrupted is None:
        evaluation = evaluate(test)
        results["test_accuracy"] = float(evaluation.get("accuracy", float("nan")))
        results["test_loss"] = float(evaluation.get("loss", float("nan")))
    results.update(
        sam_fraction=recorder.sam_fraction,
        sam_steps=recorder.sam_steps,
        steps=recorder.total_steps,
        skipped_steps=int(sum(int(r["skipped"] or 0) for r in recorder.rows)),
        policy_state=model.policy_state,
        train_seconds=round(train_seconds, 2),
    )
    if interrupted is None:
        model.save(run_dir / "model.keras")
        results["keras_model"] = str(run_dir / "model.keras")
        if plan["chief"]:
            _export(model, export_path)
            results["saved_model"] = str(export_path)

    plots = []
    if not args.no_plots and plan["chief"]:
        try:
            from keras_aesam.plots import plot_run

            config["results"] = results  # the plots show the test accuracy and %SAM
            _write_json(run_dir / "config.json", config)
            plots = plot_run(run_dir)
        except ImportError as err:
            print(f"keras-aesam: no plots ({err})", file=sys.stderr)
    results["plots"] = [str(p) for p in plots]
    results["wall_seconds"] = round(time.perf_counter() - started, 2)
    config["results"] = results
    config["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    _write_json(run_dir / "config.json", config)
    if interrupted is None:
        safety.discard(run_dir / BACKUP_FILE, run_dir)  # the run is complete: model.keras holds its state

    sam = "n/a" if recorder.sam_fraction is None else f"{100 * recorder.sam_fraction:.1f} %"
    accuracy = f"{results['test_accuracy']:.4f}" if "test_accuracy" in results else "n/a (interrupted)"
    print(
        f"test accuracy {accuracy} | SAM {sam} of {recorder.total_steps} steps | "
        f"wall time {_format_duration(results['wall_seconds'])} "
        f"(training {_format_duration(train_seconds)}) | {run_dir}",
        flush=True,
    )
    results["run_dir"] = str(run_dir)
    if interrupted is not None:
        _report_interruption(interrupted, run_dir, backup, args.epochs * steps_per_epoch)
        raise interrupted
    return results


def _export(model, export_path: Path):
    """``model.export`` into ``export_path``, every file it writes listed in the manifest."""
    if export_path.exists():  # a resumed run's partial export of an earlier attempt
        safety.remove_written(export_path)
    before = set(safety.foreign_files(export_path))
    export_path.mkdir(parents=True, exist_ok=True)
    model.export(str(export_path), verbose=False)
    new = [p for p in safety.foreign_files(export_path) if p not in before]
    folders = sorted({str(Path(p).parent) for p in new if str(Path(p).parent) != "."}, key=len)
    safety.record(export_path, *new, *(export_path / f for f in folders))


def _catch_stop_signals(backup):
    """SIGINT/SIGTERM ask ``backup`` for a backup at the next step boundary; a second one stops at once."""

    def handler(signum, frame):
        if backup.stop_signal is not None:
            raise KeyboardInterrupt
        backup.request_stop(signum)
        print(f"\nkeras-aesam: {signal.Signals(signum).name}: writing the backup after this step "
              "(send it again to stop at once)", file=sys.stderr, flush=True)

    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[signum] = signal.signal(signum, handler)
        except ValueError:  # not the main thread: no handlers, Keras's behaviour
            break
    return previous


def _restore_signals(previous):
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def _report_interruption(err, run_dir, backup, total):
    signum = getattr(err, "signum", None)
    name = signal.Signals(signum).name if signum else "stopped at once"
    meta = _backup_meta(run_dir)
    where = f"backup at step {meta['step']} of {total}" if meta else "no backup yet: it restarts from step 0"
    print(f"interrupted ({name}); {where} in {run_dir / BACKUP_FILE}. Continue with:\n"
          f"  keras-aesam train --resume --output {shlex.quote(str(run_dir))}", file=sys.stderr, flush=True)


def _plot(args):
    from keras_aesam.plots import plot_run

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise BadInput(f"run directory {str(run_dir)!r} does not exist")
    safety.adopt(run_dir, "config.json", _LEGACY_RUN_FILES)  # a run written before manifests existed
    try:
        written = plot_run(run_dir, epochs=args.epochs, output_dir=args.output_dir)
    except (FileNotFoundError, safety.NotOurs) as err:
        raise BadInput(_one_line(err)) from err
    for path in written:
        print(path)
    return {"plots": [str(p) for p in written]}


# ------------------------------------------------------------------ entry points


def run(argv: Optional[Sequence[str]] = None, *, network: Optional[Callable] = None,
        dataset_kwargs: Optional[dict] = None) -> dict:
    """Runs ``keras-aesam`` with ``argv`` (without the program name); returns the results.

    ``train`` returns the results dict also stored in ``config.json``
    (``test_accuracy``, ``sam_fraction``, ``wall_seconds``, ``run_dir`` …);
    ``plot`` returns ``{"plots": [...]}``. Bad input raises ``SystemExit(2)``
    after printing argparse's usage and message.

    ``network``: a builder ``(num_classes=, input_shape=, kernel_regularizer=)
    -> keras.Model`` used instead of ``--model``'s registry lookup (``--model``
    then only names it), e.g. ``keras.applications.ResNet50``.
    ``dataset_kwargs``: extra arguments for ``keras_aesam.data.get_dataset``.
    """
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    subparser = parser.subcommands[args.command]
    try:
        if args.command == "plot":
            return _plot(args)
        if args.resume:
            args = _resume_args(parser, argv, args)
        # Before anything else touches TensorFlow: the CPU split and the collectives are set up at its start.
        strategy, chief = devices.strategy_for(args.strategy, args.cpu_devices)
        plan = _resolve(args, network=network, chief=chief)
        plan.update(strategy=strategy, chief=chief)
        try:
            return _train(args, plan, network=network, dataset_kwargs=dataset_kwargs)
        finally:
            if not chief:  # another worker: its files were only for the run's duration
                shutil.rmtree(plan["run_dir"], ignore_errors=True)
    except (BadInput, devices.DeviceError, safety.NotOurs) as err:
        subparser.error(str(err))
    except (DataUnavailable, FileNotFoundError) as err:
        print(f"keras-aesam {args.command}: error: {_one_line(err)}", file=sys.stderr)
        raise SystemExit(1) from err


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The console script ``keras-aesam``: returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        from keras_aesam import bench

        return bench.main(argv[1:])
    try:
        run(argv)
    except KeyboardInterrupt as err:  # 128 + the signal's number, as a shell reports it
        return 128 + int(getattr(err, "signum", None) or signal.SIGINT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
