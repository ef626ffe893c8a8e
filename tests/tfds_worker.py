"""The data sets' tfds path in a fresh interpreter that sees only declared dependencies.

A new user's ``pip install keras-aesam`` installs what pyproject.toml's
``dependencies`` name, and what those name in turn. This script refuses every
other installed third-party module (an import hook raises ModuleNotFoundError,
as on a fresh install), then:

1. loads CIFAR-10 with the module given by ``--block`` refused as well, and
   records the error (what a missing module looks like to the user);
2. builds and loads CIFAR-10, CIFAR-100 (tiny archives served on loopback) and
   ImageNet (tiny manual_dir archives) through keras_aesam.data.

Prints one JSON line ``RESULT {...}``. Used by tests/test_data_tfds.py; a
subprocess because modules already imported cannot be made missing.
"""

import argparse
import importlib.abc
import importlib.metadata as metadata
import json
import os
import sys

import tomllib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from packaging.requirements import Requirement  # noqa: E402
from packaging.utils import canonicalize_name  # noqa: E402


def declared_closure(pyproject: str) -> set:
    """Installed distributions reachable from pyproject's dependencies (extras and markers followed)."""
    with open(pyproject, "rb") as f:
        roots = tomllib.load(f)["project"]["dependencies"]
    extras_of = {}
    stack = [(Requirement(text), "") for text in roots]
    while stack:
        req, parent_extra = stack.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": parent_extra}):
            continue
        name = canonicalize_name(req.name)
        known = extras_of.get(name)
        if known is not None and set(req.extras) <= known:
            continue
        extras_of[name] = (known or set()) | set(req.extras)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue  # not installed; `pip check` reports that
        for text in requires:
            for extra in extras_of[name] | {""}:
                stack.append((Requirement(text), extra))
    return set(extras_of)


class RefuseUndeclared(importlib.abc.MetaPathFinder):
    """Refuses top-level third-party modules that no allowed distribution provides."""

    def __init__(self, allowed: set):
        self.allowed = allowed | {"keras-aesam"}
        self.owners = {m: {canonicalize_name(d) for d in ds} for m, ds in metadata.packages_distributions().items()}
        self.extra_blocked = set()
        self.refused = set()

    def find_spec(self, name, path, target=None):
        top = name.split(".")[0]
        owners = self.owners.get(top)
        if top in self.extra_blocked or (owners and not owners & self.allowed):
            self.refused.add(top)
            raise ModuleNotFoundError(f"No module named {top!r}", name=top)
        return None  # not ours to decide: the normal finders run


def attempt(fn):
    try:
        splits = fn()
    except Exception as err:  # noqa: BLE001 - reported to the test
        return {"ok": False, "type": type(err).__name__, "message": str(err)}
    return {"ok": True, "train_examples": splits.train_examples, "input_shape": list(splits.input_shape)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--block", required=True, help="a declared module to refuse for the first attempt")
    args = parser.parse_args()

    hook = RefuseUndeclared(declared_closure(os.path.join(os.path.dirname(HERE), "pyproject.toml")))
    sys.meta_path.insert(0, hook)
    for name in list(sys.modules):  # anything undeclared imported at start-up is forgotten
        if name.split(".")[0] in hook.owners and not hook.owners[name.split(".")[0]] & hook.allowed:
            del sys.modules[name]

    import tfds_fixtures as fx
    from keras_aesam import data

    work = args.workdir
    result = {}
    archives = {name: fx.write_cifar_archive(os.path.join(work, "site"), name, per_file=4) for name in fx.CIFAR}
    fx.write_imagenet_manual_dir(os.path.join(work, "manual"), ["n01440764", "n01443537"], per_class=2,
                                 val_images=2)
    with fx.serve_directory(os.path.join(work, "site")) as base:
        with fx.cifar_source_at("cifar10", f"{base}/cifar-10-binary.tar.gz", archives["cifar10"]["path"]):
            hook.extra_blocked.add(args.block)
            result["blocked"] = attempt(lambda: data.cifar10(data_dir=os.path.join(work, "blocked"), batch_size=4))
            hook.extra_blocked.clear()
            result["cifar10"] = attempt(lambda: data.cifar10(data_dir=os.path.join(work, "tfds"), batch_size=4))
        with fx.cifar_source_at("cifar100", f"{base}/cifar-100-binary.tar.gz", archives["cifar100"]["path"]):
            result["cifar100"] = attempt(lambda: data.cifar100(data_dir=os.path.join(work, "tfds"), batch_size=4))
    result["imagenet2012"] = attempt(lambda: data.imagenet2012(
        manual_dir=os.path.join(work, "manual"), data_dir=os.path.join(work, "tfds"), batch_size=2,
        image_size=16, validation_fraction=0.0))
    result["refused"] = sorted(hook.refused - {args.block})
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
