#!/usr/bin/env python
"""§4.4 of the AE-SAM paper: the effect of λ1 and λ2 (Fig. 5 and 6).

AE-SAM is trained for every pair λ1 ≤ λ2 from {-2, -1, 0, 1, 2} (15 runs);
two heat maps show the measured %SAM (Fig. 5) and the test accuracy (Fig. 6).
Raising either λ raises the threshold µ + c_t·σ, so %SAM falls. The %SAM
expected under a normal ‖g‖² (docs/algorithms.md) is printed alongside.

    python examples/lambda_sweep.py                       # small, offline
    python examples/lambda_sweep.py --values=-1,0,1 --epochs 3      # "=" because of the minus sign
    python examples/lambda_sweep.py --method ae_looksam --label-noise 0.8    # appendix B.4
    python examples/lambda_sweep.py --dataset cifar10 --network resnet18 --epochs 200 --train-size all --lr 0.1
"""

import argparse
from pathlib import Path

import _common
import numpy as np


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_common_flags(parser, epochs=2, train_size=3000, output="runs/lambda_sweep")
    parser.add_argument("--values", type=_common.csv_list(float), default=[-2.0, -1.0, 0.0, 1.0, 2.0],
                        help="the λ grid, comma-separated, written --values=-1,0,1 (pairs with λ1 <= λ2 are trained)")
    parser.add_argument("--method", default="ae_sam", choices=["ae_sam", "ae_looksam"])
    parser.add_argument("--label-noise", dest="noise", type=float, default=0.0,
                        help="label noise (appendix B.4 uses it with ae_looksam)")
    args = parser.parse_args(argv)

    from keras_aesam import build_method
    from keras_aesam.cli.plots import plot_heatmap

    values = sorted(set(args.values))
    n = len(values)
    sam = np.full((n, n), np.nan)
    accuracy = np.full((n, n), np.nan)
    rows = []
    for i, lambda1 in enumerate(values):
        for j, lambda2 in enumerate(values):
            if lambda1 > lambda2:
                continue
            seed_results = []
            for seed in args.seeds:
                run_dir = Path(args.output) / f"{args.method}_lambda1_{lambda1:g}_lambda2_{lambda2:g}_seed{seed}"
                argv_run = _common.train_argv(args, run_dir, method=args.method, seed=seed, rho=args.rho,
                                              lambda1=lambda1, lambda2=lambda2, label_noise=args.noise or None,
                                              grad_norm_epochs="none")
                seed_results.append(_common.run_or_reuse(argv_run, run_dir, args.rerun))
            sam[i, j], _ = _common.mean_std([r["sam_fraction"] for r in seed_results])
            accuracy[i, j], _ = _common.mean_std([r["test_accuracy"] for r in seed_results])
            policy, _ = build_method(args.method, lambda1=lambda1, lambda2=lambda2)
            rows.append({"λ1": f"{lambda1:g}", "λ2": f"{lambda2:g}",
                         "measured %SAM": _common.pct(sam[i, j]),
                         "expected %SAM": _common.pct(policy.expected_sam_fraction()),
                         "test accuracy %": _common.pct(accuracy[i, j], 2)})
    print()
    _common.write_table(rows, ["λ1", "λ2", "measured %SAM", "expected %SAM", "test accuracy %"],
                        Path(args.output) / "lambda_sweep")
    setting = f"{args.method} · {args.model} · {args.dataset}"
    for matrix, name, label, fmt in ((100 * sam, "lambda_sam_fraction.png", "% SAM steps", "{:.0f}"),
                                     (100 * accuracy, "lambda_accuracy.png", "test accuracy %", "{:.1f}")):
        path = plot_heatmap(matrix, values, values, Path(args.output) / name,
                            title=f"{label} by (λ1, λ2)\n{setting}", colorbar_label=label, fmt=fmt)
        print(f"written: {path}")


if __name__ == "__main__":
    main()
