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
    OUT/final/<run id>.npz   the network's weights at the end of every method run
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

Devices. ``--strategy``, ``--cpu-devices`` and ``--sync-perturbation`` are
``keras-aesam train``'s (:mod:`keras_aesam.cli.devices`), the same for every run;
``--batch-size`` is the global batch; the peer row stays on one device.

Resume. A finished run's result is on disk before the next run starts; running the
same command again (or with ``--resume``) skips every finished run, and ``--fresh``
starts over. An interrupted bench writes a partial report of what finished.

Training recipe: every method and the peer train through :mod:`keras_aesam.recipe`
(SGD with momentum, cosine schedule, weight decay, loss, accuracy metric), the one
``keras-aesam train`` uses. Weight decay has the recipe's default, ``l2``: an L2 kernel
penalty of ``weight_decay/2`` (default 1e-4), PyTorch's coupled ``SGD(weight_decay=1e-4)``
of the paper, inside ``g``, ``‖g‖²`` and the perturbation. ``--weight-decay-mode decoupled``
uses Keras's ``SGD(weight_decay=...)`` instead (outside ``g``). tf_keras's
``SharpnessAwareMinimization`` leaves ``model.losses`` out of its gradient, so in ``l2`` mode
the peer row trains without weight decay. Earlier results under
``docs/results/fashion_mnist_standard`` were run with decoupled decay 1e-3 (their
``bench.json`` records it); rerunning them under the new default is another configuration.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

# The names below are re-exported: tests, the CLI and the evidence profile import them from here.
from keras_aesam.bench.networks import (  # noqa: F401
    BENCH_NETWORKS,
    _network_names,
    _resnet_cifar,
    build_network,
)
from keras_aesam.bench.peer import (  # noqa: F401
    PROBE_CONFIGS,
    _probe_markdown,
    _run_peer,
    _train_mode_sam,
    framework_probe,
)
from keras_aesam.bench.plan import (  # noqa: F401
    ALL_METHODS,
    COMMON,
    FORWARD_COST,
    HYPERPARAMETER_FLAGS,
    NOISY_HYPERPARAMETERS,
    NOISY_LABELS_PROFILE,
    PEER_METHOD,
    PEER_METHODS,
    PEER_REQUIREMENT,
    PEER_TRAIN_MODE,
    PROCESS_OVERHEAD_SECONDS,
    PROFILES,
    REFERENCE_STEP_SECONDS,
    RUN_OVERHEAD_SECONDS,
    UNKNOWN_NETWORK_STEP_SECONDS,
    BadInput,
    _cost_per_step,
    _parse_methods,
    _parse_noise,
    _peer_available,
    _pretty,
    _spec_hash,
    _train_examples,
    build_parser,
    check_budget,
    estimate_seconds,
    resolve,
    setting_label,
)
from keras_aesam.bench.plots import write_plots  # noqa: F401
from keras_aesam.bench.records import (  # noqa: F401
    _json_default,
    _loadavg,
    _machine,
    _result_path,
    _versions,
    _write_json,
    finished_result,
    load_results,
)
from keras_aesam.bench.report import CSV_COLUMNS, _report_text, write_report, write_results_csv  # noqa: F401
from keras_aesam.bench.session import run_bench  # noqa: F401
from keras_aesam.bench.stats import (  # noqa: F401
    COMPARISONS,
    aggregate,
    mean_std,
    paired_difference,
    paired_tests,
    time_ratios,
    verdict,
)
from keras_aesam.bench.worker import (  # noqa: F401
    _make_timer,
    _run_method,
    _timing,
    _worker,
    initial_weights,
    run_spec,
)
from keras_aesam.cli import devices

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


def _noisy_labels_argv(argv):
    """The arguments left for the evidence profile when ``--profile noisy-labels`` is given, else None."""
    for i, arg in enumerate(argv):
        if arg == f"--profile={NOISY_LABELS_PROFILE}":
            return argv[:i] + argv[i + 1:]
        if arg == "--profile" and i + 1 < len(argv) and argv[i + 1] == NOISY_LABELS_PROFILE:
            return argv[:i] + argv[i + 2:]
    return None


def main(argv: Sequence[str] | None = None, program: str = "keras-aesam bench") -> int:
    """``keras-aesam bench``: returns the exit code (2 for bad input, as argparse)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    evidence_argv = _noisy_labels_argv(argv)
    if evidence_argv is not None:
        from keras_aesam.bench import noisy_labels

        return noisy_labels.main(evidence_argv, prog="keras-aesam bench --profile noisy-labels")
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
            if args.strategy == "multi-worker" and not devices.tf_config_is_chief():
                print("--report-only: the chief writes the report (this worker is not the chief)")
                return 0
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
        return run_bench(plan, argv, fresh=args.fresh, program=program)
    except (BadInput, devices.DeviceError) as err:
        parser.error(str(err))
    except FileNotFoundError as err:
        print(f"keras-aesam bench: error: {err}", file=sys.stderr)
        return 1
    return 0
