#!/usr/bin/env python
"""§4.2 of the AE-SAM paper: ResNet-50 on ImageNet (Table 2).

The paper: 90 epochs, SGD momentum 0.9, weight decay 1e-4, lr 0.1 with a cosine
schedule, batch 512, ρ = 0.05, 3 seeds; AE-SAM λ = (-1, 1), AE-LookSAM λ = (0, 2),
LookSAM k = 5. The network is ``keras.applications.ResNet50(weights=None)``
(the standard ImageNet ResNet-50, randomly initialized) with an L2 kernel
regularizer of weight_decay/2 added to every conv and dense kernel (the CLI's
default ``--weight-decay-mode l2``).

ImageNet cannot be downloaded: tensorflow-datasets builds ``imagenet2012`` from
``ILSVRC2012_img_train.tar`` and ``ILSVRC2012_img_val.tar`` that you place in
``--manual-dir`` (the first run extracts them into tfds's data dir, which takes
hours and ~150 GB; later runs, also offline, need only ``--data-dir``). The
defaults are a CPU-sized smoke run (128-pixel images, a few thousand examples,
one epoch, 20 evaluation batches); ``--paper`` is the full setting, for a
machine with accelerators.

    python examples/imagenet_resnet50.py --manual-dir /data/imagenet
    python examples/imagenet_resnet50.py --manual-dir /data/imagenet --methods sam,ae_sam,looksam,ae_looksam
    python examples/imagenet_resnet50.py --manual-dir /data/imagenet --paper
    python examples/imagenet_resnet50.py --data-dir /data/tfds   # once prepared there
"""

import argparse
from pathlib import Path

import _common

METHODS = ["erm", "sam", "ae_sam", "looksam", "ae_looksam"]


def resnet50(num_classes, input_shape, kernel_regularizer=None):
    """``keras.applications.ResNet50(weights=None)`` returning logits, with an
    optional regularizer on every conv / dense kernel."""
    import keras

    model = keras.applications.ResNet50(
        weights=None, input_shape=tuple(input_shape), classes=num_classes, classifier_activation=None
    )
    if kernel_regularizer is not None:
        for layer in model.layers:
            if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
                layer.kernel_regularizer = kernel_regularizer  # for get_config
                layer.kernel.regularizer = kernel_regularizer  # what Layer.losses reads
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manual-dir", default=None,
                        help="folder with the ImageNet tar files (needed only until imagenet2012 is "
                             "prepared in --data-dir)")
    parser.add_argument("--data-dir", default=None, help="tensorflow-datasets data dir (default ~/tensorflow_datasets)")
    parser.add_argument("--methods", type=_common.csv_list(str), default=["ae_sam"],
                        help=f"comma-separated, from {','.join(METHODS)} (default ae_sam)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--train-size", default="2048", help="examples, or 'all'")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--seeds", type=_common.csv_list(int), default=[0])
    parser.add_argument("--output", default="runs/imagenet_resnet50")
    parser.add_argument("--eval-batches", type=int, default=20,
                        help="validation/test batches evaluated (default %(default)s; --paper: all)")
    parser.add_argument("--rerun", action="store_true")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--paper", action="store_true",
                        help="90 epochs, batch 512, 224-pixel images, full training set, seeds 0,1,2")
    args = parser.parse_args(argv)
    if args.paper:
        args.epochs, args.batch_size, args.image_size, args.train_size = 90, 512, 224, "all"
        args.eval_batches = None
        args.seeds = [0, 1, 2] if args.seeds == [0] else args.seeds
    args.dataset, args.model = "imagenet2012", "resnet50"

    rows = []
    for method in args.methods:
        results = []
        for seed in args.seeds:
            run_dir = Path(args.output) / f"resnet50_{method}_seed{seed}"
            argv_run = _common.train_argv(args, run_dir, method=method, seed=seed, rho=args.rho,
                                          manual_dir=args.manual_dir, data_dir=args.data_dir,
                                          grad_norm_epochs="none", eval_batches=args.eval_batches)
            results.append(_common.run_or_reuse(argv_run, run_dir, args.rerun, network=resnet50,
                                                dataset_kwargs={"image_size": args.image_size}))
        acc, acc_sd = _common.mean_std([r["test_accuracy"] for r in results])
        sam, _ = _common.mean_std([r["sam_fraction"] for r in results])
        rows.append({"method": method, "top-1 accuracy %": f"{100 * acc:.2f} ± {100 * acc_sd:.2f}",
                     "%SAM": f"{100 * sam:.1f}"})
    print()
    _common.write_table(rows, ["method", "top-1 accuracy %", "%SAM"], Path(args.output) / "imagenet_table")


if __name__ == "__main__":
    main()
