"""The ``keras-aesam`` command: ``train`` one experiment, ``plot`` a run again.

``keras-aesam train`` runs a whole experiment of the paper's kind: data (with
optional label noise), network, method, SGD with momentum, weight decay and a
cosine schedule, Keras progress bars, and a run directory::

    RUN_DIR/config.json          every setting, resolved, plus the results
    RUN_DIR/history.csv          per-epoch logs (keras.callbacks.CSVLogger)
    RUN_DIR/steps.csv            per-step logs (keras_aesam.callbacks.StepRecorder)
    RUN_DIR/grad_norms.csv       ‖g‖² samples at chosen epochs (Fig. 3)
    RUN_DIR/*.png                the plots of keras_aesam.cli.plots
    RUN_DIR/model.keras          the trained sharpness-aware model
    RUN_DIR/backup/state.npz     the run's full state while it trains (see below)
    RUN_DIR/.keras-aesam-files   the manifest of the files above (keras_aesam.cli.safety)
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
files the manifest lists (:mod:`keras_aesam.cli.safety`).

Bad input (unknown names, out-of-range numbers, a hyperparameter the method
does not take, an existing output directory without ``--overwrite``, labels
that do not fit the number of classes) stops the command before any training,
with exit code 2 and a one-line message, as argparse does. Other ends, each
one line: 1 for data that cannot be loaded or no backup that reads back whole,
74 (``run_directory.DISK_FULL_EXIT``) for a full disk, naming the file, 75
(``run_lock.LOCKED_EXIT``) for a run directory another process holds, naming
its pid and host; 130 and 143 for SIGINT and SIGTERM.

Programmatic use: :func:`run` takes the same arguments and returns the results
as a dict (the examples use it); :func:`main` is the console script.

This module parses and orchestrates: the flags become a checked
:class:`~keras_aesam.cli.train_spec.TrainSpec`, the output a
:class:`~keras_aesam.cli.run_directory.RunDirectory` (which does all of the writing),
and :func:`keras_aesam.cli.training.train` runs the one into the other. The flag
names and the method-hyperparameter table are shared with ``keras-aesam bench``
(:mod:`keras_aesam.cli.flags`).
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from keras_aesam.callbacks import DamagedBackup
from keras_aesam.cli import devices, flags, safety
from keras_aesam.cli.flags import (  # noqa: F401  (part of this module's API: BadInput, the table)
    HYPERPARAMETER_FLAGS,
    BadInput,
    check as _check,
    method_takes as _method_takes,
    one_line as _one_line,
)
from keras_aesam.cli.run_directory import (  # noqa: F401  (BACKUP_FILE, backup_meta: read by the tests)
    BACKUP_FILE,
    DISK_FULL_EXIT,
    LEGACY_RUN_FILES,
    RunDirectory,
    backup_meta as _backup_meta,
    default_export_root,
    disk_full_message,
    is_disk_full,
    is_finished,
    read_config,
)
from keras_aesam.cli.run_lock import LOCKED_EXIT, Locked
from keras_aesam.cli.train_spec import DEFAULTS, PAPER_LR, SMALL_CNN_LR, TrainSpec
from keras_aesam.cli.training import DataUnavailable, RunOptions, train

__all__ = ["DEFAULTS", "HYPERPARAMETER_FLAGS", "build_parser", "main", "run"]

#: Flags that may differ on --resume: they change what is shown, not what is computed.
_RESUME_FREE = ("resume", "output", "overwrite", "quiet", "verbose", "no_plots", "backup_steps")

# ---------------------------------------------------------------------- helpers


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
  keras-aesam train --network resnet18 --dataset cifar10 --epochs 200 --lr 0.1 \\
      --method ae_looksam --output runs/cifar10-aelooksam
  keras-aesam train --label-noise 0.4 --method looksam --k 2 --output runs/noise40
  keras-aesam train --resume --output runs/noise40   # after a crash, kill or Ctrl-C
  keras-aesam plot runs/noise40
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``keras-aesam`` parser: ``train`` and ``plot`` (``bench`` has its own, see :func:`main`)."""
    from keras_aesam import __version__

    parser = argparse.ArgumentParser(
        prog="keras-aesam",
        description="Sharpness-aware training that uses SAM only where it pays (AE-SAM, ICLR 2023).",
    )
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
    _experiment_flags(t.add_argument_group("experiment"))
    _optimizer_flags(t.add_argument_group("optimizer"))
    devices.add_strategy_flags(t.add_argument_group("devices (see 'several devices' below)"))
    h = t.add_argument_group("method hyperparameters (only those the method takes; defaults are the paper's)")
    flags.add_hyperparameter_flags(h)
    h.add_argument("--total-steps", type=int, default=None,
                   help="the schedule's T (default: epochs x steps per epoch) [all]")
    _output_flags(t.add_argument_group("output"))
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


def _experiment_flags(g):
    datasets, networks, methods = _names()
    g.add_argument("--dataset", default=DEFAULTS["dataset"],
                   help=f"one of {', '.join(datasets)} (default %(default)s, offline)")
    g.add_argument("--network", default=DEFAULTS["network"],
                   help=f"one of {', '.join(networks)} (default %(default)s)")
    g.add_argument("--method", default=DEFAULTS["method"],
                   help=f"one of {', '.join(methods)} (default %(default)s)")
    g.add_argument("--epochs", type=int, default=DEFAULTS["epochs"], help="default %(default)s")
    g.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"], help="default %(default)s")
    g.add_argument("--train-size", type=str, default=str(DEFAULTS["train_size"]),
                   help="training examples kept after the validation split, or 'all' "
                   "(default %(default)s)")
    g.add_argument("--label-noise", type=float, default=DEFAULTS["label_noise"],
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


def _optimizer_flags(o):
    from keras_aesam.recipe import SCHEDULES, WEIGHT_DECAY_MODES

    o.add_argument("--lr", type=float, default=DEFAULTS["lr"],
                   help=f"initial learning rate (default {PAPER_LR} as in the paper; "
                   f"{SMALL_CNN_LR} for small_cnn)")
    o.add_argument("--momentum", type=float, default=DEFAULTS["momentum"], help="SGD momentum (default %(default)s)")
    o.add_argument("--weight-decay", type=float, default=DEFAULTS["weight_decay"], help="default %(default)s")
    o.add_argument("--weight-decay-mode", choices=WEIGHT_DECAY_MODES, default=DEFAULTS["weight_decay_mode"],
                   help="how weight decay is applied (default %(default)s: PyTorch's coupled decay "
                   "through an L2 kernel regularizer of weight_decay/2; see below)")
    o.add_argument("--schedule", choices=SCHEDULES, default=DEFAULTS["schedule"],
                   help="learning-rate schedule (default %(default)s, over all training steps)")
    o.add_argument("--jit", action="store_true", help="XLA-compile the passes (slower on CPU)")
    o.add_argument("--steps-per-execution", type=int, default=1, help="default %(default)s")


def _output_flags(r):
    r.add_argument("--output", default=None,
                   help="run directory (default runs/<dataset>_<network>_<method>_<time>)")
    r.add_argument("--overwrite", action="store_true",
                   help="replace an existing run directory and export (deletes only files keras-aesam wrote)")
    r.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in --output from its last backup, with the flags "
                   "of its config.json (flags given must match them)")
    r.add_argument("--backup-steps", type=int, default=0,
                   help="also back up the run every N steps (default 0: at the end of every epoch only)")
    r.add_argument("--export-dir", default=None,
                   help=f"where the SavedModel goes, as <export-dir>/<run name> "
                   f"(default: {default_export_root()})")
    r.add_argument("--grad-norm-epochs", type=_int_list, default=None,
                   help="completed epochs after which to sample ||g||^2 at fixed weights for the "
                   "Fig. 3 histogram, e.g. 1,50,200 (0 = before training; default 'auto' = first, "
                   "middle, last; 'none' to skip)")
    r.add_argument("--grad-norm-batches", type=int, default=DEFAULTS["grad_norm_batches"],
                   help="mini-batches per sampled epoch (default %(default)s)")
    r.add_argument("--no-plots", action="store_true", help="do not draw the PNG plots")
    r.add_argument("--verbose", action="store_true",
                   help="also log the data source, the model summary and the policy state per epoch")
    r.add_argument("--quiet", action="store_true", help="no progress bars (the summary line still prints)")


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
    config = read_config(run_dir)
    _check(config is not None and config.get("command") == "keras-aesam train",
           f"--resume: {str(run_dir)!r} holds no keras-aesam train run (no readable config.json)")
    if is_finished(config):
        raise BadInput(f"--resume: the run in {str(run_dir)!r} already finished (test accuracy "
                       f"{config['results']['test_accuracy']:.4f}); nothing to resume")
    stored_argv = config.get("argv")
    _check(isinstance(stored_argv, list) and stored_argv[:1] == ["train"],
           f"--resume: {str(run_dir / 'config.json')!r} does not record the command's flags")
    stored = parser.parse_args(stored_argv)
    given = _explicit_flags(argv)
    # The export goes where the run's own would have gone, from any working directory.
    recorded = config.get("export_dir")
    if isinstance(recorded, str) and Path(recorded).is_absolute():
        stored.export_dir = str(Path(recorded).parent)
        if "export_dir" in given and Path(given["export_dir"]).absolute() == Path(stored.export_dir):
            del given["export_dir"]
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


def _plot(args):
    from keras_aesam.cli.plots import plot_run

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise BadInput(f"run directory {str(run_dir)!r} does not exist")
    safety.adopt(run_dir, "config.json", LEGACY_RUN_FILES)  # a run written before manifests existed
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
    -> keras.Model`` used instead of ``--network``'s registry lookup (``--network``
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
        spec = TrainSpec.from_args(args, custom_network=network is not None)
        options = RunOptions(resume=args.resume, quiet=args.quiet, verbose=args.verbose, plots=not args.no_plots,
                             backup_steps=args.backup_steps, argv=tuple(args.argv))
        run_dir = RunDirectory.choose(args.output, args.export_dir, chief=chief, overwrite=args.overwrite,
                                      resume=args.resume,
                                      name=RunDirectory.default_name(spec.dataset, spec.network, spec.method))
        print(f"keras-aesam: {devices.describe(strategy)}", flush=True)
        try:
            return train(spec, run_dir, strategy, options, network=network, dataset_kwargs=dataset_kwargs)
        finally:
            run_dir.close()  # another worker: its files were only for the run's duration
    except (BadInput, devices.DeviceError, safety.NotOurs) as err:
        subparser.error(str(err))
    except Locked as err:
        _fail(args.command, err, LOCKED_EXIT)
    except (DataUnavailable, FileNotFoundError, DamagedBackup) as err:
        _fail(args.command, err, 1)
    except Exception as err:
        if not is_disk_full(err):
            raise
        output = getattr(args, "output", None)
        again = f"; free space, then continue with: keras-aesam train --resume --output {output}" \
            if args.command == "train" and output else ""
        _fail(args.command, disk_full_message(err, output or ".") + again, DISK_FULL_EXIT)


def _fail(command, err, code):
    """One line on stderr, ``keras-aesam <command>: error: ...``, and exit ``code``."""
    print(f"keras-aesam {command}: error: {_one_line(err)}", file=sys.stderr, flush=True)
    raise SystemExit(code) from (err if isinstance(err, BaseException) else None)


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
