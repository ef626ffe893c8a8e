"""One ``keras-aesam train`` run: a :class:`~keras_aesam.cli.train_spec.TrainSpec` trained into a RunDirectory.

:func:`train` loads the data, builds the network wrapped by the method and
compiled with the recipe, trains it with ``fit`` over one seeded stream of
batches (so that a resumed run sees exactly the batches an uninterrupted one
would), evaluates, saves, exports and plots. What it writes goes through the
:class:`~keras_aesam.cli.run_directory.RunDirectory`; what it computes is the spec's;
:class:`RunOptions` holds what only changes how the run is shown and backed up.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import math
import signal
import sys
import time
from typing import Optional

from keras_aesam.cli.flags import BadInput, check, one_line
from keras_aesam.cli.run_directory import BACKUP_FILE, RunDirectory, backup_meta
from keras_aesam.cli.training_loop import StreamView, TrainingLoop as _TrainingLoop

__all__ = ["DataUnavailable", "RunOptions", "StreamView", "format_duration", "train"]  # StreamView: re-exported


class DataUnavailable(Exception):
    """The data set cannot be loaded here (no files, no network, a missing module): exit code 1."""


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How a run is shown and backed up: the settings that may differ when it is resumed."""

    resume: bool = False
    quiet: bool = False
    verbose: bool = False
    plots: bool = True
    backup_steps: int = 0
    argv: Optional[tuple] = None

    def __post_init__(self):
        check(self.backup_steps >= 0,
              f"--backup-steps must be >= 0 (0 = every epoch only), got {self.backup_steps}")


def format_duration(seconds) -> str:
    """``42s``, ``3m05s`` or ``1h02m03s``."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s"


@dataclasses.dataclass
class _Session:
    """What the stages of one run share."""

    spec: object
    run_dir: RunDirectory
    options: RunOptions
    strategy: object
    data: object = None
    model: object = None
    inner: object = None
    num_classes: int = 0
    total_steps: int = 0
    resume_meta: Optional[dict] = None

    @property
    def start(self):
        """``(step, epoch, batch)`` the run starts from: 0s, or the backup's."""
        meta = self.resume_meta or {}
        return meta.get("step", 0), meta.get("epoch", 0), meta.get("batch", 0)

    @property
    def steps(self) -> int:
        return self.spec.epochs * self.data.steps_per_epoch


def train(spec, run_dir: RunDirectory, strategy, options: RunOptions, *, network=None,
          dataset_kwargs=None) -> dict:
    """Trains ``spec`` into ``run_dir`` under ``strategy``; returns the results also stored in config.json.

    ``network``: a builder used instead of the registry's ``spec.network``.
    Raises RunInterrupted (after writing the backup) when a signal stops it.
    """
    started = time.perf_counter()
    _log_to_console(options.verbose)
    session = _Session(spec, run_dir, options, strategy)
    _build(session, network, dataset_kwargs)
    run_dir.prepare(fresh=not options.resume,
                    csv_sizes=session.resume_meta["files"] if session.resume_meta and run_dir.chief else None)
    config = _config_record(session)
    run_dir.write_config(config)
    _announce(session, config)
    loop = _TrainingLoop(session)
    interrupted, train_seconds = loop.fit()
    results = _results(session, loop, interrupted, train_seconds)
    if "test_accuracy" in results:
        results["chance_level"] = at_chance_level(results, session.num_classes)
    results["plots"] = _plots(session, config, results)
    results["wall_seconds"] = round(time.perf_counter() - started, 2)
    config["results"] = results
    config["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    run_dir.write_config(config)
    if interrupted is None:
        run_dir.complete()
    _summary(session, loop.recorder, results, train_seconds)
    results["run_dir"] = str(run_dir.path)
    if interrupted is not None:
        _report_interruption(interrupted, run_dir, session.steps)
        raise interrupted
    return results


def _log_to_console(verbose):
    package_logger = logging.getLogger("keras_aesam")  # not the root logger: TF's INFO stays quiet
    if verbose and not package_logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        package_logger.addHandler(handler)
    package_logger.setLevel(logging.INFO if verbose else logging.WARNING)


# ------------------------------------------------------------- data and model


def _build(session, network, dataset_kwargs):
    """Data, model and (on --resume) the backup's state: the remaining bad input shows up here."""
    import keras

    spec = session.spec
    # Seeded first: the shuffle's seed pairs with TensorFlow's global seed, so the
    # batch order must not depend on what ran earlier in this process.
    keras.utils.set_random_seed(spec.seed)
    session.data = _load_data(spec, dataset_kwargs)
    replicas = session.strategy.num_replicas_in_sync
    check(spec.batch_size % replicas == 0,
          f"--batch-size (the global batch) must be a multiple of the {replicas} replicas, got {spec.batch_size}")
    keras.utils.set_random_seed(spec.seed)
    session.total_steps = spec.total_steps or session.steps
    with session.strategy.scope():  # the variables of model, optimizer and metrics are mirrored
        _build_model(session, network)
        if session.options.resume:
            session.resume_meta = _load_backup(session)


def _load_data(spec, dataset_kwargs):
    from keras_aesam import data as data_module

    kwargs = {**spec.dataset_kwargs(), **(dataset_kwargs or {})}
    try:
        return data_module.get_dataset(spec.dataset, **kwargs)
    except ValueError as err:
        raise BadInput(one_line(err)) from err
    except (ConnectionError, ImportError, FileNotFoundError) as err:  # e.g. no Fashion-MNIST anywhere
        raise DataUnavailable(f"cannot load {spec.dataset}: {one_line(err)}") from err


def _build_model(session, network):
    """The network, wrapped by the method and compiled with the recipe."""
    import keras_aesam
    from keras_aesam import recipe
    from keras_aesam.networks import get_network

    spec, data = session.spec, session.data
    num_classes = data.num_classes if spec.num_classes is None else spec.num_classes
    check(num_classes >= data.num_classes,
          f"labels of {spec.dataset} take {data.num_classes} values (0..{data.num_classes - 1}), "
          f"which do not fit --num-classes {num_classes}")
    kwargs = dict(num_classes=num_classes, input_shape=data.input_shape,
                  kernel_regularizer=recipe.kernel_regularizer(spec.recipe()))
    try:
        inner = network(**kwargs) if network is not None else get_network(spec.network, **kwargs)
    except ValueError as err:
        raise BadInput(f"cannot build {spec.network}: {one_line(err)}") from err
    model = keras_aesam.wrap(inner, method=spec.method, total_steps=session.total_steps,
                             sync_perturbation=spec.sync_perturbation, **spec.hyperparameters)
    recipe.compile_model(model, spec.recipe(), session.steps, jit_compile=spec.jit,
                         steps_per_execution=spec.steps_per_execution)
    session.inner, session.num_classes, session.model = inner, num_classes, model


def _load_backup(session):
    """``--resume``: the state of the run's newest intact backup, loaded into the model; None before the first."""
    from keras_aesam.callbacks import DamagedBackup
    from keras_aesam.cli.run_directory import BACKUP_FILES

    if not any((session.run_dir.read_from / name).is_file() for name in BACKUP_FILES):
        return None  # none yet: from the start, as the seeds rebuild it
    model, data = session.model, session.data
    # Metrics and optimizer variables exist only once built; build them now, without data.
    model._symbolic_build(data_batch=next(iter(data.test)))
    try:
        meta = session.run_dir.load_backup(model)
    except DamagedBackup:
        raise  # the files are the problem, not the command: exit code 1
    except ValueError as err:
        raise BadInput(f"--resume: {one_line(err)}") from err
    check(meta.get("steps_per_epoch") == data.steps_per_epoch,
          f"--resume: the backup has {meta.get('steps_per_epoch')} steps per epoch, this data {data.steps_per_epoch}")
    return meta


# ------------------------------------------------------------------ reporting


def _config_record(session) -> dict:
    """config.json: every setting, resolved (the results are added at the end)."""
    import keras
    import tensorflow as tf

    import keras_aesam

    spec, data, model, run_dir = session.spec, session.data, session.model, session.run_dir
    previous = (run_dir.read_config() if session.options.resume else None) or {}
    argv = session.options.argv
    config = {
        "command": "keras-aesam train", "argv": None if argv is None else list(argv),
        "dataset": spec.dataset, "model": spec.network, "method": spec.method,
        "hyperparameters": model.hyperparameters, "total_steps": session.total_steps,
        "expected_sam_fraction": model.policy.expected_sam_fraction(session.total_steps),
        "epochs": spec.epochs, "batch_size": spec.batch_size,
        "strategy": type(session.strategy).__name__, "replicas": session.strategy.num_replicas_in_sync,
        "sync_perturbation": spec.sync_perturbation, "steps_per_epoch": data.steps_per_epoch,
        "lr": spec.lr, "schedule": spec.schedule, "momentum": spec.momentum,
        "weight_decay": spec.weight_decay, "weight_decay_mode": spec.weight_decay_mode,
        "noise": spec.label_noise, "noise_rate_realised": data.noise_rate_realised, "seed": spec.seed,
        "train_size": spec.train_size, "train_examples": data.train_examples,
        "validation_fraction": spec.validation_fraction, "validation_examples": data.validation_examples,
        "test_examples": data.test_examples, "num_classes": session.num_classes,
        "input_shape": list(data.input_shape), "data_source": data.source,
        "parameters": int(session.inner.count_params()), "jit": spec.jit,
        "steps_per_execution": spec.steps_per_execution,
        "hist_epochs": list(spec.grad_norm_epochs), "hist_batches": spec.grad_norm_batches,
        "eval_batches": spec.eval_batches,
        "run_dir": str(run_dir.path),
        "export_dir": str(run_dir.export_path and run_dir.export_path.absolute()),  # resumable from anywhere
        "versions": {"keras_aesam": keras_aesam.__version__, "keras": keras.__version__,
                     "tensorflow": tf.__version__},
        "started": previous.get("started") or datetime.datetime.now().isoformat(timespec="seconds"),
        "resumed": list(previous.get("resumed", [])),
    }
    if session.options.resume:
        config["resumed"].append({"from_step": session.start[0],
                                  "at": datetime.datetime.now().isoformat(timespec="seconds")})
    return config


def _announce(session, config):
    """The start-up line: what trains on what, and where it is written."""
    spec, data, model = session.spec, session.data, session.model
    replicas = session.strategy.num_replicas_in_sync
    hp = ", ".join(f"{k}={v}" for k, v in model.hyperparameters.items())
    noise = f", {100 * data.noise_rate_realised:.1f} % noisy labels" if spec.label_noise else ""
    print(
        f"keras-aesam: {spec.method} ({hp}) on {config['model']} "
        f"({config['parameters'] / 1e6:.2f} M parameters), {spec.dataset}: {data.train_examples} train / "
        f"{data.validation_examples or 0} validation / {data.test_examples or '?'} test{noise}; "
        f"{spec.epochs} epochs x {data.steps_per_epoch} steps of {spec.batch_size} "
        f"({replicas} replica{'s' if replicas > 1 else ''} x {spec.batch_size // replicas}), "
        f"lr {spec.lr:g} {spec.schedule}, "
        f"weight decay {spec.weight_decay:g} ({spec.weight_decay_mode}) -> {session.run_dir.path}",
        flush=True,
    )
    step, epoch, batch = session.start
    if session.options.resume:
        print(f"keras-aesam: resuming at step {step} of {session.steps} "
              f"(epoch {epoch + 1}, step {batch} of it done)", flush=True)
    if session.options.verbose:
        print(f"data source: {data.source}")
        session.inner.summary()


def _results(session, loop, interrupted, train_seconds) -> dict:
    """Test evaluation (unless interrupted), the step counts, and the saved and exported model."""
    recorder, run_dir = loop.recorder, session.run_dir
    results = {"interrupted": interrupted is not None}
    if session.options.resume:
        results["resumed_from_step"] = session.start[0]
    if interrupted is None:
        evaluation = loop.evaluate(loop.test)
        results["test_accuracy"] = float(evaluation.get("accuracy", float("nan")))
        results["test_loss"] = float(evaluation.get("loss", float("nan")))
    results.update(
        sam_fraction=recorder.sam_fraction,
        sam_steps=recorder.sam_steps,
        steps=recorder.total_steps,
        skipped_steps=int(sum(int(r["skipped"] or 0) for r in recorder.rows)),
        policy_state=session.model.policy_state,
        train_seconds=round(train_seconds, 2),
    )
    if interrupted is None:
        results["keras_model"] = str(run_dir.save_model(session.model))
        exported = run_dir.export(session.model)
        if exported is not None:
            results["saved_model"] = str(exported)
    return results


def _plots(session, config, results) -> list:
    """The PNG plots (the chief's, unless --no-plots); config.json first gets the results they show."""
    if not session.options.plots or not session.run_dir.chief:
        return []
    try:
        from keras_aesam.cli.plots import plot_run

        config["results"] = results  # the plots show the test accuracy and %SAM
        session.run_dir.write_config(config)
        return [str(p) for p in plot_run(session.run_dir.path)]
    except ImportError as err:
        print(f"keras-aesam: no plots ({err})", file=sys.stderr)
        return []


def _summary(session, recorder, results, train_seconds):
    sam = "n/a" if recorder.sam_fraction is None else f"{100 * recorder.sam_fraction:.1f} %"
    accuracy = f"{results['test_accuracy']:.4f}" if "test_accuracy" in results else "n/a (interrupted)"
    print(
        f"test accuracy {accuracy} | SAM {sam} of {recorder.total_steps} steps | "
        f"wall time {format_duration(results['wall_seconds'])} "
        f"(training {format_duration(train_seconds)}) | {session.run_dir.path}",
        flush=True,
    )
    if results.get("chance_level"):
        print(chance_level_warning(results, session.num_classes), file=sys.stderr, flush=True)


def at_chance_level(results, num_classes) -> bool:
    """Whether the run ended at chance level: the bench's rule (``progress.is_degenerate``)."""
    from keras_aesam.bench.progress import is_degenerate

    return is_degenerate({**results, "num_classes": num_classes})


def chance_level_warning(results, num_classes) -> str:
    """The closing warning of a run whose test accuracy is at chance level (or whose test loss is not finite)."""
    loss = results.get("test_loss")
    why = (f"the test loss is {loss}" if loss is not None and not math.isfinite(loss)
           else f"chance is 1/{num_classes} = {1 / num_classes:.4f}")
    return (f"keras-aesam: WARNING: test accuracy {results['test_accuracy']:.4f} is at chance level ({why}): "
            "the model learned nothing usable. Check the learning rate and rho; with the LookSAM direction, "
            "max_age none reuses g_v without bound, which can end here.")


def _report_interruption(err, run_dir, total):
    import shlex

    signum = getattr(err, "signum", None)
    name = signal.Signals(signum).name if signum else "stopped at once"
    meta = backup_meta(run_dir.path)
    where = f"backup at step {meta['step']} of {total}" if meta else "no backup yet: it restarts from step 0"
    print(f"interrupted ({name}); {where} in {run_dir.path / BACKUP_FILE}. Continue with:\n"
          f"  keras-aesam train --resume --output {shlex.quote(str(run_dir.path))}", file=sys.stderr, flush=True)
