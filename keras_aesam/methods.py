"""The paper's seven methods, the budgeted rivals and Momentum-SAM, as (policy, direction) pairs.

A method is a name, a policy class, a direction class and the paper's defaults.
``build_method(name, **hyperparameters)`` splits the hyperparameters between the
two parts and rejects any the method does not take.
"""

import inspect

from keras_aesam import directions, policies

#: name -> (policy class, direction class, policy defaults, direction defaults)
METHODS = {
    "erm": (policies.Never, directions.SAM, {}, {}),
    "sam": (policies.Always, directions.SAM, {}, {}),
    "esam": (policies.Always, directions.ESAM, {}, {"beta": 0.6, "gamma": 0.5}),
    "ss_sam": (policies.Bernoulli, directions.SAM, {}, {}),
    # Periodic(k) bounds the age of g_v at k - 1 itself: k is LookSAM's staleness knob.
    "looksam": (policies.Periodic, directions.LookSAM, {"k": 5}, {"alpha": 0.7, "max_age": None}),
    "ae_sam": (
        policies.Adaptive,
        directions.SAM,
        {"default_lambdas": (-1.0, 1.0)},
        {},
    ),
    "ae_looksam": (
        policies.Adaptive,
        directions.LookSAM,
        {"default_lambdas": (0.0, 2.0)},
        {"alpha": 0.7, "max_age": directions.DEFAULT_MAX_AGE},
    ),
    # Rivals at a SAM budget (``target_sam_fraction``, default 0.5).
    "late_sam": (policies.Late, directions.SAM, {}, {}),
    "rst": (policies.ScheduledCoin, directions.SAM, {}, {}),
    "quantile_sam": (policies.Quantile, directions.SAM, {}, {}),
    # One pass per step, at w + e from the optimizer's momentum (no second pass).
    "msam": (policies.Never, directions.MSAM, {}, {}),
}

#: The paper's seven methods, in its order of presentation.
PAPER_METHODS = ("erm", "sam", "esam", "ss_sam", "looksam", "ae_sam", "ae_looksam")

#: Display names, for reports and plots.
PRETTY_NAMES = {
    "erm": "ERM", "sam": "SAM", "esam": "ESAM", "ss_sam": "SS-SAM", "looksam": "LookSAM",
    "ae_sam": "AE-SAM", "ae_looksam": "AE-LookSAM", "late_sam": "late SAM",
    "rst": "RST (scheduled coin)", "quantile_sam": "quantile SAM", "msam": "MSAM",
}

_INTERNAL = {"self", "default_lambdas"}


def _parameters(cls):
    params = inspect.signature(cls.__init__).parameters.values()
    return [
        p.name for p in params
        if p.name not in _INTERNAL
        and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]


def method_parameters(name):
    """The hyperparameter names ``name`` accepts (besides ``total_steps``)."""
    policy_cls, direction_cls, _, _ = _lookup(name)
    names = _parameters(policy_cls) + _parameters(direction_cls)
    return sorted(set(names))


def _lookup(name):
    if name not in METHODS:
        raise ValueError(
            f"Unknown method {name!r}; method must be one of {sorted(METHODS)}."
        )
    return METHODS[name]


def build_method(name, **hyperparameters):
    """``(policy, direction)`` for method ``name`` with the paper's defaults.

    ``seed`` goes to whichever part draws random numbers (SS-SAM's coin,
    ESAM's tensor choice).
    """
    policy_cls, direction_cls, policy_defaults, direction_defaults = _lookup(name)
    policy_names = set(_parameters(policy_cls))
    direction_names = set(_parameters(direction_cls))
    unknown = set(hyperparameters) - policy_names - direction_names
    if unknown:
        raise TypeError(
            f"method {name!r} does not take {sorted(unknown)}; it takes "
            f"{method_parameters(name)} (and total_steps)."
        )
    policy_kw = dict(policy_defaults)
    direction_kw = dict(direction_defaults)
    for key, value in hyperparameters.items():
        if key in policy_names:
            policy_kw[key] = value
        if key in direction_names:
            direction_kw[key] = value
    return policy_cls(**policy_kw), direction_cls(**direction_kw)


def method_config(policy, direction):
    """The hyperparameters of a (policy, direction) pair, as one flat dict."""
    return {**policy.get_config(), **direction.get_config()}
