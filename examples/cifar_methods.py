#!/usr/bin/env python
"""§4.1 of the AE-SAM paper: the method table (test accuracy and %SAM per method).

The paper trains ResNet-18, WRN-28-10 and PyramidNet-110 on CIFAR-10/100 (200 /
300 epochs, batch 128, lr 0.1 cosine, SGD momentum 0.9, weight decay 1e-4,
5 seeds) and reports, per method, the test accuracy and the share of SAM steps.

CIFAR comes through tensorflow-datasets, which downloads it on first use; this
machine has no internet, so the default here is the offline Fashion-MNIST with
the small CNN and a few thousand examples: the same table in a few minutes on
CPU. The numbers then only show the mechanics (%SAM ≈ 50 % for SS-SAM and
AE-SAM, ≈ 20 % for LookSAM and AE-LookSAM), not the paper's accuracy gaps.

    python examples/cifar_methods.py                      # small, offline
    python examples/cifar_methods.py --methods erm,sam,ae_sam --epochs 5
    python examples/cifar_methods.py --paper --dataset cifar10 --network resnet18
    python examples/cifar_methods.py --paper --dataset cifar100 --network pyramidnet110

``--paper`` sets the paper's epochs (200, 300 for PyramidNet-110, 1200 for
ViT-S/16), the full training set, lr 0.1 and seeds 0-4. ρ is grid-searched in
the paper per method and data set; pass ``--rho`` (one value for all methods).
"""

import argparse
from pathlib import Path

import _common

METHODS = ["erm", "sam", "esam", "ss_sam", "looksam", "ae_sam", "ae_looksam"]
PAPER_EPOCHS = {"pyramidnet110": 300, "vit_s16": 1200}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_common_flags(parser, epochs=2, train_size=5000, output="runs/cifar_methods")
    parser.add_argument("--methods", type=_common.csv_list(str), default=METHODS,
                        help="comma-separated (default: all seven)")
    parser.add_argument("--paper", action="store_true", help="the paper's full settings (see above)")
    args = parser.parse_args(argv)
    if args.paper:
        args.epochs = PAPER_EPOCHS.get(args.model.lower().replace("-", "_"), 200)
        args.train_size = "all"
        args.lr = 0.1 if args.lr is None else args.lr
        args.seeds = [0, 1, 2, 3, 4] if args.seeds == [0] else args.seeds

    rows = []
    for method in args.methods:
        results = []
        for seed in args.seeds:
            run_dir = Path(args.output) / f"{args.dataset}_{args.model}_{method}_seed{seed}"
            argv_run = _common.train_argv(args, run_dir, method=method, seed=seed, rho=args.rho,
                                          grad_norm_epochs="none")
            results.append(_common.run_or_reuse(argv_run, run_dir, args.rerun))
        acc, acc_sd = _common.mean_std([r["test_accuracy"] for r in results])
        sam, sam_sd = _common.mean_std([r["sam_fraction"] for r in results])
        wall, _ = _common.mean_std([r.get("train_seconds") for r in results])
        rows.append({
            "method": method,
            "test accuracy %": f"{100 * acc:.2f} ± {100 * acc_sd:.2f}",
            "%SAM": f"{100 * sam:.1f} ± {100 * sam_sd:.1f}",
            "train time s": f"{wall:.0f}",
            "seeds": len(results),
        })
    print(f"\n{args.dataset}, {args.model}, {args.epochs} epochs, train size {args.train_size}")
    _common.write_table(rows, ["method", "test accuracy %", "%SAM", "train time s", "seeds"],
                        Path(args.output) / "methods_table")


if __name__ == "__main__":
    main()
