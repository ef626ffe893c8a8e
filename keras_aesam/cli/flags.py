"""The command line's shared vocabulary: one flag name per concept for ``keras-aesam train`` and ``bench``.

Both parsers take their method hyperparameters from :data:`HYPERPARAMETER_FLAGS`
(one table, with its help texts), report bad input as :class:`BadInput`, write
their JSON files with :func:`write_json`, and spell the settings they share the
same way: ``--network`` (the registry in :mod:`keras_aesam.networks`),
``--label-noise`` (``label_noise`` of :func:`keras_aesam.data.get_dataset`),
``--grad-norm-epochs`` / ``--grad-norm-batches`` (the ``grad_norm_*`` samples of
:class:`keras_aesam.callbacks.StepRecorder`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Callable, NamedTuple, Optional

__all__ = [
    "HYPERPARAMETER_FLAGS",
    "BadInput",
    "Hyperparameter",
    "add_hyperparameter_flags",
    "check",
    "given_hyperparameters",
    "method_takes",
    "methods_taking",
    "one_line",
    "parse_train_size",
    "refuse_unused",
    "write_json",
]


class BadInput(Exception):
    """A user error found before anything runs: the commands report it as ``parser.error`` (exit code 2)."""


def check(condition, message):
    """BadInput(``message``) unless ``condition``."""
    if not condition:
        raise BadInput(message)


def check_recipe(epochs, batch_size, lr, momentum, weight_decay) -> None:
    """BadInput, naming the flag and its range, for a training recipe value out of range
    (the checks ``train`` and ``bench`` share)."""
    check(epochs >= 1, f"--epochs must be >= 1, got {epochs}")
    check(batch_size >= 1, f"--batch-size must be >= 1, got {batch_size}")
    check(lr > 0 and math.isfinite(lr), f"--lr must be > 0, got {lr:g}")
    check(0.0 <= momentum < 1.0, f"--momentum must be in [0, 1), got {momentum:g}")
    check(weight_decay >= 0 and math.isfinite(weight_decay), f"--weight-decay must be >= 0, got {weight_decay:g}")


def one_line(err) -> str:
    """``err``'s message on one line (an error line must not break the terminal's layout)."""
    return " ".join(str(err).split())


# ------------------------------------------------------------------ JSON files


def json_default(value):
    """JSON for what ``json`` cannot write: NumPy scalars and arrays as numbers, the rest as text."""
    if hasattr(value, "item") and getattr(value, "shape", None) == ():
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def write_json(path, payload) -> Path:
    """Writes ``payload`` to ``path`` atomically: ``<path>.tmp`` first, then renamed over ``path``.

    A reader (a resuming run, a report, another worker) sees the old file or the
    new one, never half of one. The folder is created if needed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, default=json_default)
        f.write("\n")
    os.replace(tmp, path)
    return path


# ------------------------------------------------------- method hyperparameters


class Hyperparameter(NamedTuple):
    """A method hyperparameter's flag: unpacks as ``(name, flag, type, help)``; ``type`` None is a switch."""

    name: str
    flag: str
    type: Optional[Callable]
    help: str

    @property
    def dest(self) -> str:
        """The argparse destination: the flag without dashes (``--coin-schedule`` for ``schedule``)."""
        return self.flag.lstrip("-").replace("-", "_")


class _Unbounded:
    """The parsed value of ``none`` for a hyperparameter whose ``None`` means something (not "not given")."""

    def __repr__(self):
        return "none"


UNBOUNDED = _Unbounded()


def int_or_none(value):
    """An integer, or ``none`` (the hyperparameter's ``None``, e.g. ``--max-age none``)."""
    if str(value).lower() == "none":
        return UNBOUNDED
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'none', got {value!r}") from None


#: Every method hyperparameter of :mod:`keras_aesam.methods`, its flag and what it does.
HYPERPARAMETER_FLAGS = (
    Hyperparameter("rho", "--rho", float, "perturbation radius ρ (default 0.05; msam 0.6, its own scale)"),
    Hyperparameter("lambda1", "--lambda1", float, "c_t at the last step, λ1 (AE-SAM -1, AE-LookSAM 0)"),
    Hyperparameter("lambda2", "--lambda2", float, "c_t at the first step, λ2 (AE-SAM 1, AE-LookSAM 2)"),
    Hyperparameter("delta", "--delta", float, "forgetting rate δ of the ‖g‖² EMAs (default 0.9)"),
    Hyperparameter("target_sam_fraction", "--target-sam-fraction", float,
                   "share of SAM steps to aim for (late_sam, rst, quantile_sam, ss_sam; for AE-SAM and "
                   "AE-LookSAM it chooses λ1, λ2 instead of --lambda1/--lambda2)"),
    Hyperparameter("p", "--p", float, "SAM probability per step (default 0.5)"),
    Hyperparameter("k", "--k", int, "a SAM step every k steps (default 5; the paper uses 2 for label noise)"),
    Hyperparameter("alpha", "--alpha", float, "weight α of the reused g_v (default 0.7)"),
    Hyperparameter("max_age", "--max-age", int_or_none,
                   "LookSAM direction: reuse g_v on at most this many steps after its SAM step, then ERM "
                   "steps (AE-LookSAM default 10; 'none': without bound, the paper's rule, which can end "
                   "at chance level)"),
    Hyperparameter("per_tensor", "--per-tensor", None,
                   "LookSAM projection and norms per weight tensor (default: global)"),
    Hyperparameter("adaptive", "--adaptive", None, "ASAM's scale-invariant perturbation (Kwon et al., 2021)"),
    Hyperparameter("beta", "--beta", float, "ESAM: share of weight tensors perturbed, SWP (default 0.6)"),
    Hyperparameter("gamma", "--gamma", float, "ESAM: share of the batch used for the SAM gradient, SDS (default 0.5)"),
    Hyperparameter("p_start", "--p-start", float, "the coin's SAM probability at the first step (with --p-end)"),
    Hyperparameter("p_end", "--p-end", float, "the coin's SAM probability at the last step (with --p-start)"),
    # --schedule is the learning rate's: the coin's schedule has a flag of its own.
    Hyperparameter("schedule", "--coin-schedule", str,
                   "shape of the coin's probability for --target-sam-fraction: linear or constant "
                   "(default linear)"),
    Hyperparameter("step_size", "--step-size", float, "rate at which the quantile threshold moves (default 0.3)"),
    Hyperparameter("spread", "--spread", float, "λ2 - λ1 of the c_t schedule behind the quantile's target (default 2)"),
)

#: Method parameters with no flag of their own: ``seed`` is the run's ``--seed``.
_NOT_FLAGS = {"seed"}


def method_takes(method) -> list:
    """The hyperparameter names ``method`` takes that have a flag.

    Those of :func:`keras_aesam.methods.method_parameters` (its policy's and its
    direction's), except that a method whose policy never takes a SAM step and
    whose direction needs one (``erm``) takes none of its direction's: ``--rho``
    would change nothing. (``msam``'s direction perturbs its only pass, so its
    ``--rho`` counts.)
    """
    import inspect

    from keras_aesam.methods import build_method, method_parameters

    names = [p for p in method_parameters(method) if p not in _NOT_FLAGS]
    policy, direction = build_method(method)
    if policy.never_sam and not direction.perturbs_before_pass:
        names = [p for p in names if p in inspect.signature(type(policy).__init__).parameters]
    return names


def methods_taking(name) -> list:
    """The methods taking hyperparameter ``name``."""
    from keras_aesam.methods import METHODS

    return [m for m in METHODS if name in method_takes(m)]


def add_hyperparameter_flags(group) -> None:
    """Adds every flag of :data:`HYPERPARAMETER_FLAGS` to ``group``, default None (= not given)."""
    for hp in HYPERPARAMETER_FLAGS:
        text = f"{hp.help} [{', '.join(methods_taking(hp.name))}]"
        if hp.type is None:
            group.add_argument(hp.flag, dest=hp.dest, action="store_true", default=None, help=text)
        else:
            group.add_argument(hp.flag, dest=hp.dest, type=hp.type, default=None, help=text)


def refuse_unused(method, given) -> None:
    """BadInput unless ``method`` takes every hyperparameter name in ``given``.

    The message names each flag it does not take with the methods that do, and
    the flags it takes.
    """
    takes = method_takes(method)
    known = {hp.name for hp in HYPERPARAMETER_FLAGS}
    refused = [f"{hp.flag} ({_takers(hp.name)})" for hp in HYPERPARAMETER_FLAGS
               if hp.name in given and hp.name not in takes]
    refused += [f"{name!r}" for name in given if name not in known]
    if refused:
        accepted = [hp.flag for hp in HYPERPARAMETER_FLAGS if hp.name in takes] + ["--total-steps"]
        raise BadInput(f"method {method!r} does not take {', '.join(refused)}; it takes {', '.join(accepted)}")


def _takers(name) -> str:
    """``"taken by sam, esam"``: who takes hyperparameter ``name`` (for error messages)."""
    takers = methods_taking(name)
    return f"taken by {', '.join(takers)}" if takers else "taken by no method"


def given_hyperparameters(args) -> dict:
    """``{name: value}`` of the hyperparameter flags ``args`` gives (those not given are left out)."""
    values = {hp.name: getattr(args, hp.dest, None) for hp in HYPERPARAMETER_FLAGS}
    return {name: None if value is UNBOUNDED else value for name, value in values.items() if value is not None}


# ------------------------------------------------------------- shared values


def parse_train_size(value) -> Optional[int]:
    """``--train-size``: None for ``all`` (also ``none``, ``full``), else an integer >= 1; BadInput otherwise."""
    if str(value).lower() in ("all", "none", "full"):
        return None
    try:
        size = int(value)
    except ValueError:
        raise BadInput(f"--train-size must be an integer >= 1 or 'all', got {value!r}") from None
    check(size >= 1, f"--train-size must be >= 1 or 'all', got {size}")
    return size
