"""Helpers shared by the example scripts (not part of the library).

Every example trains through ``keras_aesam.cli.run``, the function behind
``keras-aesam train``, so each run gets the usual run directory (config.json,
history.csv, steps.csv, plots, model.keras) and the summary line. A run whose
directory already holds finished results is reused, so an interrupted sweep
can be started again and only the missing runs train. Training again
(``--rerun``) and rewriting the tables replace only files keras-aesam wrote
(``keras_aesam.cli.safety``): anything else in ``--output`` is left alone.
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
import sys
from pathlib import Path

# Run from a source checkout without installing: make the package importable.
_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path and (_REPO / "keras_aesam").is_dir():
    sys.path.insert(0, str(_REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def csv_list(kind):
    """An argparse type: ``"a,b,c"`` -> list of ``kind``."""

    def parse(text):
        return [kind(part) for part in text.split(",") if part.strip()]

    return parse


def add_common_flags(parser, *, epochs, train_size, output):
    """Flags every example shares; its own defaults are CPU-sized."""
    parser.add_argument("--dataset", default="fashion_mnist",
                        help="fashion_mnist (offline, default), cifar10, cifar100 (need tfds's download)")
    parser.add_argument("--network", dest="model", default="small_cnn",
                        help="small_cnn (default), resnet18, resnet32, wrn28_10, ...")
    parser.add_argument("--epochs", type=int, default=epochs, help="default %(default)s")
    parser.add_argument("--train-size", default=str(train_size), help="examples, or 'all' (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=None, help="default: keras-aesam train's")
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--seeds", type=csv_list(int), default=[0], help="comma-separated, e.g. 0,1,2,3,4")
    parser.add_argument("--output", default=output, help="folder for the runs and the summary (default %(default)s)")
    parser.add_argument("--rerun", action="store_true", help="train again even where finished results exist")
    parser.add_argument("--verbose", action="store_true", help="show Keras progress bars")
    return parser


def train_argv(args, run_dir, **flags):
    """The ``keras-aesam train`` arguments for one run of an example."""
    argv = [
        "train",
        "--dataset", args.dataset,
        "--network", args.model,
        "--epochs", str(args.epochs),
        "--train-size", str(args.train_size),
        "--batch-size", str(args.batch_size),
        "--output", str(run_dir),
        "--export-dir", str(Path(args.output) / "saved_models"),
        "--overwrite",
    ]
    if args.lr is not None:
        argv += ["--lr", str(args.lr)]
    if not args.verbose:
        argv.append("--quiet")
    from keras_aesam.cli import flags as cli_flags

    hyperparameters = {hp.name for hp in cli_flags.HYPERPARAMETER_FLAGS}
    takes = set(cli_flags.method_takes(flags["method"])) if "method" in flags else hyperparameters
    for key, value in flags.items():
        if value is None or value is False:
            continue
        if key in hyperparameters and key not in takes:
            continue  # one --rho for all methods: erm takes none (train refuses a flag a method does not take)
        flag = "--" + key.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    return argv


def run_or_reuse(argv, run_dir, rerun=False, **kwargs):
    """``keras_aesam.cli.run(argv)``, the finished results stored in ``run_dir``, or,
    for an interrupted run, ``keras-aesam train --resume`` (its flags must not have changed)."""
    from keras_aesam import cli

    config_path = Path(run_dir) / "config.json"
    if not rerun and config_path.is_file():
        with open(config_path) as f:
            results = json.load(f).get("results") or {}
        if "test_accuracy" in results:
            print(f"reusing finished run {run_dir} (--rerun to train again)")
            return results
        print(f"resuming interrupted run {run_dir} (--rerun to start it over)")
        return cli.run([*argv[:1], "--resume", *[a for a in argv[1:] if a != "--overwrite"]], **kwargs)
    return cli.run(argv, **kwargs)


def mean_std(values):
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def write_table(rows, columns, path_stem):
    """Prints ``rows`` (dicts) as a Markdown table and writes ``.md`` and ``.csv``.

    An existing ``.md`` or ``.csv`` that keras-aesam did not write is not
    overwritten (keras_aesam.cli.safety.NotOurs, before anything is written).
    """
    from keras_aesam.cli import safety

    path_stem = Path(path_stem)
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    for suffix in (".md", ".csv"):
        safety.claim(path_stem.with_suffix(suffix))
    header = "| " + " | ".join(columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    lines = [header, rule] + ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    text = "\n".join(lines)
    print(text)
    path_stem.with_suffix(".md").write_text(text + "\n")
    with open(path_stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    print(f"\nwritten: {path_stem.with_suffix('.md')} and {path_stem.with_suffix('.csv')}")


def pct(value, digits=1):
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.{digits}f}"
