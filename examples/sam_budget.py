#!/usr/bin/env python
"""A SAM budget: AE-SAM with ``target_sam_fraction=f``, measured against the target.

The adaptive policy's expected share of SAM steps has a closed form when ‖g‖²
is normal (docs/algorithms.md): the average of ``1 - Φ(c_t)`` over the
schedule. ``target_sam_fraction`` inverts it, choosing λ1, λ2 (with the
method's default spread λ2 - λ1) so that the expected share is ``f``. This
script trains once per target and prints the measured share next to it.

    python examples/sam_budget.py                              # 10, 25, 50, 75 %
    python examples/sam_budget.py --targets 0.2,0.5 --method ae_looksam
    python examples/sam_budget.py --dataset cifar10 --network resnet18 --epochs 200 --train-size all --lr 0.1
"""

import argparse
from pathlib import Path

import _common


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_common_flags(parser, epochs=2, train_size=5000, output="runs/sam_budget")
    parser.add_argument("--targets", type=_common.csv_list(float), default=[0.1, 0.25, 0.5, 0.75],
                        help="target SAM fractions in (0, 1), comma-separated")
    parser.add_argument("--method", default="ae_sam", choices=["ae_sam", "ae_looksam"])
    args = parser.parse_args(argv)
    from keras_aesam import build_method

    rows = []
    for target in args.targets:
        for seed in args.seeds:
            run_dir = Path(args.output) / f"{args.method}_target{target:g}_seed{seed}"
            argv_run = _common.train_argv(args, run_dir, method=args.method, seed=seed, rho=args.rho,
                                          target_sam_fraction=target, grad_norm_epochs="none")
            results = _common.run_or_reuse(argv_run, run_dir, args.rerun)
            policy, _ = build_method(args.method, target_sam_fraction=target)
            rows.append({
                "target %SAM": _common.pct(target),
                "λ1, λ2": f"{policy.lambda1:.2f}, {policy.lambda2:.2f}",
                "measured %SAM": _common.pct(results["sam_fraction"]),
                "test accuracy %": _common.pct(results["test_accuracy"], 2),
                "seed": seed,
                "run": str(run_dir),
            })
    print()
    _common.write_table(rows, ["target %SAM", "λ1, λ2", "measured %SAM", "test accuracy %", "seed", "run"],
                        Path(args.output) / "sam_budget")
    print("The measured share differs from the target where ‖g‖² is not normal, or where the EMAs lag it.")


if __name__ == "__main__":
    main()
