#!/usr/bin/env python
"""The paper's Fig. 3 (and Fig. 8-9): is ‖∇L(B; w)‖² normally distributed?

AE-SAM models the squared stochastic gradient norm as N(µ_t, σ_t²). This script
trains once and, after chosen epochs, samples ``{‖∇L(B; w)‖² : B ∼ D}`` over
many mini-batches at fixed weights (``keras-aesam train --grad-norm-epochs``). It
draws the histogram and the normal Q-Q plot per epoch
(``grad_norm_distribution.png`` in the run directory) and prints per epoch the
mean, std, skewness, the Q-Q correlation r (1 = exactly normal) and, with
scipy, the Shapiro-Wilk p-value.

    python examples/grad_norm_distribution.py                  # small, offline
    python examples/grad_norm_distribution.py --epochs 10 --grad-norm-epochs 1,5,10 --batches 300
    python examples/grad_norm_distribution.py --paper          # ResNet-18, CIFAR-100, 200 epochs

The paper does not say which method trained the network of Fig. 3; the default
here is ERM (plain training), ``--method`` picks another.
"""

import argparse
from pathlib import Path

import _common
import numpy as np


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_common_flags(parser, epochs=4, train_size=10000, output="runs/grad_norm_distribution")
    parser.add_argument("--method", default="erm")
    parser.add_argument("--grad-norm-epochs", dest="hist_epochs", default=None,
                        help="completed epochs to sample at, e.g. 0,1,4 (default: 0, 1, middle, last)")
    parser.add_argument("--batches", type=int, default=200, help="mini-batches sampled per epoch (default %(default)s)")
    parser.add_argument("--paper", action="store_true", help="ResNet-18 on CIFAR-100, 200 epochs, lr 0.1")
    args = parser.parse_args(argv)
    if args.paper:
        args.dataset, args.model, args.epochs, args.train_size = "cifar100", "resnet18", 200, "all"
        args.lr = 0.1 if args.lr is None else args.lr
    hist_epochs = args.hist_epochs or ",".join(str(e) for e in sorted({0, 1, (args.epochs + 1) // 2, args.epochs}))

    seed = args.seeds[0]
    run_dir = Path(args.output) / f"{args.dataset}_{args.model}_{args.method}_seed{seed}"
    argv_run = _common.train_argv(args, run_dir, method=args.method, seed=seed,
                                  grad_norm_epochs=hist_epochs, grad_norm_batches=args.batches)
    _common.run_or_reuse(argv_run, run_dir, args.rerun)

    from keras_aesam.cli.plots import normal_qq, plot_run, read_csv

    plot_run(run_dir)
    table = read_csv(run_dir / "grad_norms.csv")
    try:
        from scipy import stats
    except ImportError:
        stats = None
    rows = []
    for epoch in sorted({int(e) for e in table["epoch"]}):
        values = table["grad_norm_sq"][table["epoch"] == epoch]
        mean, std = float(values.mean()), float(values.std(ddof=1))
        skew = float(np.mean(((values - mean) / std) ** 3)) if std > 0 else float("nan")
        _, _, _, _, r = normal_qq(values)
        row = {"after epoch": epoch, "n": values.size, "mean ‖g‖²": f"{mean:.4g}", "std": f"{std:.4g}",
               "skewness": f"{skew:.2f}", "Q-Q r": f"{r:.4f}"}
        if stats is not None and values.size >= 3:
            row["Shapiro-Wilk p"] = f"{stats.shapiro(values).pvalue:.3g}"
        rows.append(row)
    columns = ["after epoch", "n", "mean ‖g‖²", "std", "skewness", "Q-Q r"] + (
        ["Shapiro-Wilk p"] if stats is not None else [])
    print()
    _common.write_table(rows, columns, Path(args.output) / "grad_norm_normality")
    print(f"plot: {run_dir / 'grad_norm_distribution.png'}")


if __name__ == "__main__":
    main()
