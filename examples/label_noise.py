#!/usr/bin/env python
"""§4.3 of the AE-SAM paper: robustness to label noise (Table 3, Fig. 4).

A fraction ``r`` of the training labels is flipped uniformly to another class
(seeded; validation and test stay clean) and every method is trained on the
noisy set. As in the paper, LookSAM takes a SAM step every ``k = 2`` steps and
both AE variants use ``λ1 = -1, λ2 = 1`` (so all four cheap methods sit near
50 % SAM). The script prints test accuracy and %SAM per noise level and method,
and plots train (noisy) / validation (clean) accuracy per epoch for the
highest noise level, the paper's Fig. 4.

    python examples/label_noise.py                        # small, offline
    python examples/label_noise.py --noise-levels 0.8 --methods erm,sam,ae_looksam --epochs 10
    python examples/label_noise.py --paper --dataset cifar10 --network resnet18

``--paper``: noise 20/40/60/80 %, 200 epochs, full training set, lr 0.1,
seeds 0-4 (CIFAR needs tensorflow-datasets' download: not possible offline).
"""

import argparse
from pathlib import Path

import _common

METHODS = ["erm", "sam", "esam", "ss_sam", "looksam", "ae_sam", "ae_looksam"]
# The paper's §4.3 settings, on top of each method's defaults.
NOISE_SETTINGS = {"looksam": {"k": 2}, "ae_looksam": {"lambda1": -1.0, "lambda2": 1.0},
                  "ae_sam": {"lambda1": -1.0, "lambda2": 1.0}}


def plot_curves(histories, path, title):
    from matplotlib.ticker import MaxNLocator

    from keras_aesam.cli.plots import new_figure, save_figure

    fig = new_figure(10, 3.8)
    for i, (column, name) in enumerate((("accuracy", "train accuracy (noisy labels)"),
                                        ("val_accuracy", "validation accuracy (clean labels)"))):
        ax = fig.add_subplot(1, 2, i + 1)
        for method, history in histories.items():
            if column in history:
                ax.plot(history["epoch"] + 1, history[column], "-o", ms=3, label=method)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_common_flags(parser, epochs=3, train_size=5000, output="runs/label_noise")
    parser.add_argument("--noise-levels", type=_common.csv_list(float), default=[0.2, 0.4],
                        help="label-noise rates in [0, 1), comma-separated (paper: 0.2,0.4,0.6,0.8)")
    parser.add_argument("--methods", type=_common.csv_list(str), default=METHODS)
    parser.add_argument("--paper", action="store_true", help="the paper's full settings (see above)")
    args = parser.parse_args(argv)
    if args.paper:
        args.noise_levels = [0.2, 0.4, 0.6, 0.8]
        args.epochs, args.train_size = 200, "all"
        args.lr = 0.1 if args.lr is None else args.lr
        args.seeds = [0, 1, 2, 3, 4] if args.seeds == [0] else args.seeds

    from keras_aesam.cli.plots import read_csv

    rows, curves = [], {}
    for noise in args.noise_levels:
        for method in args.methods:
            results = []
            for seed in args.seeds:
                run_dir = Path(args.output) / f"noise{noise:g}_{method}_seed{seed}"
                argv_run = _common.train_argv(args, run_dir, method=method, seed=seed, rho=args.rho,
                                              label_noise=noise, grad_norm_epochs="none",
                                              **NOISE_SETTINGS.get(method, {}))
                results.append(_common.run_or_reuse(argv_run, run_dir, args.rerun))
                if noise == max(args.noise_levels) and seed == args.seeds[0]:
                    curves[method] = read_csv(run_dir / "history.csv")
            acc, acc_sd = _common.mean_std([r["test_accuracy"] for r in results])
            sam, _ = _common.mean_std([r["sam_fraction"] for r in results])
            rows.append({"noise %": f"{100 * noise:g}", "method": method,
                         "test accuracy %": f"{100 * acc:.2f} ± {100 * acc_sd:.2f}", "%SAM": f"{100 * sam:.1f}"})
    print(f"\n{args.dataset}, {args.model}, {args.epochs} epochs, train size {args.train_size}, seeds {args.seeds}")
    _common.write_table(rows, ["noise %", "method", "test accuracy %", "%SAM"], Path(args.output) / "label_noise")
    path = plot_curves(curves, Path(args.output) / "label_noise_curves.png",
                       f"{args.dataset} · {args.model} · {100 * max(args.noise_levels):g} % label noise")
    print(f"written: {path}")


if __name__ == "__main__":
    main()
