"""Property-based tests over every constructor and ``wrap``.

For every named method, built through ``wrap``, ``SharpnessAwareModel(inner=...)``
and the named class's functional form, and for every policy and direction:

- each invalid hyperparameter value raises ``ValueError`` naming the parameter
  and its accepted range;
- each valid combination builds, and ``get_config -> from_config -> get_config``
  gives an equal config (compared as JSON, where tuples and lists are equal).

Models are built, never fitted.
"""

import copy
import json
import math
import re

import keras
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import keras_aesam
from keras_aesam import directions, policies

SETTINGS = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

METHOD_CLASSES = {
    "erm": keras_aesam.ERMModel,
    "sam": keras_aesam.SAMModel,
    "esam": keras_aesam.ESAMModel,
    "ss_sam": keras_aesam.SSSAMModel,
    "looksam": keras_aesam.LookSAMModel,
    "ae_sam": keras_aesam.AESAMModel,
    "ae_looksam": keras_aesam.AELookSAMModel,
    "late_sam": keras_aesam.LateSAMModel,
    "rst": keras_aesam.RSTModel,
    "quantile_sam": keras_aesam.QuantileSAMModel,
    "msam": keras_aesam.MSAMModel,
}
METHODS = sorted(keras_aesam.METHODS)


def as_json(config):
    return json.loads(json.dumps(config))


# --------------------------------------------------------------------------
# What each hyperparameter accepts
# --------------------------------------------------------------------------
NON_NUMBERS = st.sampled_from(["0.5", "", None, [0.5], (1,), {"v": 1}, 1j, b"1", True, False])
NON_FINITE = st.sampled_from([math.nan, math.inf, -math.inf, np.float32("nan"), np.float64("inf")])


def _fmt(v):
    return "-inf" if v == -math.inf else ("inf" if v == math.inf else f"{v:g}")


class Real:
    """A real hyperparameter in an interval (check_range)."""

    def __init__(self, low=-math.inf, high=math.inf, low_open=False, high_open=False, nullable=False):
        self.low, self.high, self.low_open, self.high_open = low, high, low_open, high_open
        self.nullable = nullable  # None means "not given" (the default)
        left = "(" if low_open or low == -math.inf else "["
        right = ")" if high_open or high == math.inf else "]"
        self.interval = f"{left}{_fmt(low)}, {_fmt(high)}{right}"

    def valid(self):
        low = max(self.low, -1e6)
        high = min(self.high, 1e6)
        floats = st.floats(
            min_value=low, max_value=high,
            exclude_min=self.low_open and low == self.low,
            exclude_max=self.high_open and high == self.high,
            allow_nan=False, allow_infinity=False,
        )
        ints = st.integers(math.ceil(low), math.floor(high)).filter(
            lambda i: (i > self.low if self.low_open else i >= self.low)
            and (i < self.high if self.high_open else i <= self.high)
        )
        return st.one_of(floats, floats.map(np.float64), ints)

    def invalid(self):
        out_of_range = []
        if self.low > -math.inf:
            out_of_range.append(st.floats(max_value=self.low, exclude_max=not self.low_open,
                                          allow_nan=False, allow_infinity=False))
        if self.high < math.inf:
            out_of_range.append(st.floats(min_value=self.high, exclude_min=not self.high_open,
                                          allow_nan=False, allow_infinity=False))
        non_numbers = NON_NUMBERS.filter(lambda v: v is not None) if self.nullable else NON_NUMBERS
        return st.one_of(*out_of_range, NON_FINITE, non_numbers)

    def message(self, name):
        return rf"{name} must be (a real number )?in {re.escape(self.interval)}"


class Integer:
    """A whole number >= low (check_int); NaN/Inf are covered by a separate test."""

    def __init__(self, low=1, nullable=False):
        self.low, self.nullable = low, nullable

    def valid(self):
        ints = st.integers(self.low, 10**6)
        return st.one_of(ints, ints.map(float), ints.map(np.int64))

    def invalid(self):
        return st.one_of(
            st.integers(max_value=self.low - 1),
            st.floats(allow_nan=False, allow_infinity=False).filter(lambda v: v != int(v)),
            NON_NUMBERS.filter(lambda v: v is not None) if self.nullable else NON_NUMBERS,
        )

    def message(self, name):
        return rf"{name} must be an integer >= {self.low}"


class Flag:
    """A boolean switch (invalid values: see the tests at the end)."""

    def valid(self):
        return st.booleans()


class Choice:
    """One of a few names."""

    def __init__(self, *names):
        self.names = names

    def valid(self):
        return st.sampled_from(self.names)


class Seed:
    """An integer seed (invalid values: see the tests at the end)."""

    def valid(self):
        return st.integers(0, 2**31 - 1)


SPECS = {
    "rho": Real(0.0, low_open=True),
    "adaptive": Flag(),
    "alpha": Real(0.0),
    "per_tensor": Flag(),
    "beta": Real(0.0, 1.0, low_open=True),
    "gamma": Real(0.0, 1.0, low_open=True),
    "seed": Seed(),
    "p": Real(0.0, 1.0, low_open=True, nullable=True),
    "k": Integer(1),
    "max_age": Integer(1, nullable=True),
    "lambda1": Real(nullable=True),
    "lambda2": Real(nullable=True),
    "delta": Real(0.0, 1.0, low_open=True, high_open=True),
    "target_sam_fraction": Real(0.0, 1.0, low_open=True, high_open=True, nullable=True),
    "total_steps": Integer(1, nullable=True),
    "schedule": Choice("linear", "constant"),
    "p_start": Real(0.0, 1.0, nullable=True),
    "p_end": Real(0.0, 1.0, nullable=True),
    "step_size": Real(0.0, low_open=True),
    "spread": Real(0.0),
    "sync_perturbation": Flag(),
}
VALIDATED = sorted(k for k, v in SPECS.items() if isinstance(v, (Real, Integer)))


def model_parameters(method):
    return keras_aesam.method_parameters(method) + ["total_steps", "sync_perturbation"]


def test_every_hyperparameter_has_a_spec():
    for method in METHODS:
        assert set(model_parameters(method)) <= set(SPECS), method


# --------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------
def tiny_inner():
    return keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])


def build(how, method, hp):
    if how == "wrap":
        return keras_aesam.wrap(tiny_inner(), method=method, **hp)
    if how == "inner":
        return keras_aesam.SharpnessAwareModel(inner=tiny_inner(), method=method, **hp)
    inputs = keras.Input((3,))
    return METHOD_CLASSES[method](inputs, keras.layers.Dense(2)(inputs), **hp)


CONSTRUCTORS = st.sampled_from(["wrap", "inner", "named"])


@st.composite
def valid_hyperparameters(draw, method):
    names = draw(st.lists(st.sampled_from(model_parameters(method)), unique=True))
    hp = {}
    for name in names:
        if name in ("lambda1", "lambda2", "target_sam_fraction", "p_start", "p_end"):
            continue
        hp[name] = draw(SPECS[name].valid())
    if "p_start" in model_parameters(method):  # the coin: a target or both endpoints
        if draw(st.booleans()):
            hp.pop("schedule", None)
            hp["p_start"] = draw(st.floats(0.01, 1.0))
            hp["p_end"] = draw(SPECS["p_end"].valid())
        elif draw(st.booleans()):
            hp["target_sam_fraction"] = draw(SPECS["target_sam_fraction"].valid())
    elif "target_sam_fraction" in model_parameters(method) and "lambda1" not in model_parameters(method):
        if "p" not in hp and draw(st.booleans()):  # ss_sam: p or the target, not both
            hp["target_sam_fraction"] = draw(SPECS["target_sam_fraction"].valid())
    if "lambda1" in model_parameters(method):
        choice = draw(st.sampled_from(["default", "lambdas", "lambda1", "lambda2", "target"]))
        if choice == "target":
            hp["target_sam_fraction"] = draw(SPECS["target_sam_fraction"].valid())
        elif choice == "lambdas":
            pair = sorted(draw(st.lists(SPECS["lambda1"].valid(), min_size=2, max_size=2)))
            hp["lambda1"], hp["lambda2"] = pair
        elif choice == "lambda1":  # with the method's default lambda2
            hp["lambda1"] = draw(st.floats(-1e6, -1.0, allow_nan=False))
        elif choice == "lambda2":
            hp["lambda2"] = draw(st.floats(2.0, 1e6, allow_nan=False))
    return hp


def assert_round_trips(model):
    config = model.get_config()
    # a copy: Keras's Functional.from_config empties the nested config it is given
    # (plain keras.Model.from_config does the same), so the original would be gone
    again = type(model).from_config(copy.deepcopy(config))
    assert type(again) is type(model)
    assert as_json(again.get_config()) == as_json(config)
    assert as_json(again.hyperparameters) == as_json(model.hyperparameters)
    assert again.policy_state == model.policy_state


@SETTINGS
@given(data=st.data(), method=st.sampled_from(METHODS), how=CONSTRUCTORS)
def test_valid_hyperparameters_build_and_round_trip(data, method, how):
    hp = data.draw(valid_hyperparameters(method), label="hyperparameters")
    model = build(how, method, hp)
    assert model.method == method
    resolved = model.hyperparameters
    for name, value in hp.items():
        if name == "total_steps":
            assert model.total_steps == int(value)
            assert model.policy_state["total_steps"] == int(value)
        elif name == "sync_perturbation":
            assert model.sync_perturbation is value
        elif name in ("lambda1", "lambda2") and "target_sam_fraction" in resolved:
            pass
        elif name == "target_sam_fraction" and "p" in resolved:  # SS-SAM: the target is p
            assert resolved["p"] == value
        else:
            assert resolved[name] == value, name
    assert_round_trips(model)


@st.composite
def one_invalid(draw):
    method = draw(st.sampled_from(METHODS))
    name = draw(st.sampled_from([n for n in model_parameters(method) if n in VALIDATED]))
    value = draw(SPECS[name].invalid())
    return method, name, value


@SETTINGS
@given(case=one_invalid(), how=CONSTRUCTORS)
def test_each_invalid_hyperparameter_names_itself_and_its_range(case, how):
    method, name, value = case
    with pytest.raises(ValueError, match=SPECS[name].message(name)):
        build(how, method, {name: value})


@SETTINGS
@given(
    method=st.sampled_from(METHODS + ["ae_lookSAM"]).filter(lambda m: m not in METHODS)
    | st.text(max_size=12).filter(lambda m: m not in METHODS),
    how=st.sampled_from(["wrap", "inner"]),
)
def test_unknown_method_lists_the_methods(method, how):
    with pytest.raises(ValueError, match=r"method must be one of \['ae_looksam', 'ae_sam', 'erm'"):
        build(how, method, {})


@SETTINGS
@given(
    method=st.sampled_from(["ae_sam", "ae_looksam"]),
    lambdas=st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=2, max_size=2, unique=True),
    how=CONSTRUCTORS,
)
def test_lambda1_above_lambda2_is_refused(method, lambdas, how):
    high, low = sorted(lambdas, reverse=True)
    with pytest.raises(ValueError, match=r"lambda1 must be <= lambda2"):
        build(how, method, {"lambda1": high, "lambda2": low})


@SETTINGS
@given(
    method=st.sampled_from(["ae_sam", "ae_looksam"]),
    target=SPECS["target_sam_fraction"].valid(),
    lambdas=st.dictionaries(st.sampled_from(["lambda1", "lambda2"]), st.floats(-5, 5), min_size=1),
)
def test_target_sam_fraction_excludes_the_lambdas(method, target, lambdas):
    with pytest.raises(ValueError, match=r"either target_sam_fraction or the lambdas"):
        build("wrap", method, {"target_sam_fraction": target, **lambdas})


# --------------------------------------------------------------------------
# Policies and directions on their own
# --------------------------------------------------------------------------
PART_PARAMETERS = {
    policies.Always: [],
    policies.Never: [],
    policies.Bernoulli: ["p", "seed"],
    policies.Periodic: ["k"],
    policies.Adaptive: ["lambda1", "lambda2", "delta", "target_sam_fraction"],
    directions.SAM: ["rho", "adaptive"],
    directions.LookSAM: ["rho", "alpha", "per_tensor", "adaptive"],
    directions.ESAM: ["rho", "beta", "gamma", "seed", "adaptive"],
}
PARTS = list(PART_PARAMETERS)


@st.composite
def valid_part(draw, base=object):
    cls = draw(st.sampled_from([c for c in PARTS if issubclass(c, base)]))
    kwargs = {}
    for name in draw(st.lists(st.sampled_from(PART_PARAMETERS[cls] or ["-"]), unique=True)):
        if name in ("-", "lambda1", "lambda2", "target_sam_fraction"):
            continue
        kwargs[name] = draw(SPECS[name].valid())
    if cls is policies.Adaptive:
        choice = draw(st.sampled_from(["lambdas", "target", "default"]))
        if choice == "lambdas":
            kwargs["lambda1"], kwargs["lambda2"] = sorted(
                draw(st.lists(SPECS["lambda1"].valid(), min_size=2, max_size=2))
            )
        elif choice == "target":
            kwargs["target_sam_fraction"] = draw(SPECS["target_sam_fraction"].valid())
    return cls(**kwargs)


@SETTINGS
@given(part=valid_part())
def test_parts_round_trip_through_their_config(part):
    config = part.get_config()
    again = type(part)(**config)
    assert as_json(again.get_config()) == as_json(config)
    for attribute in ("p", "k", "lambda1", "lambda2", "delta", "rho", "alpha", "beta", "gamma", "seed"):
        if hasattr(part, attribute):
            assert getattr(again, attribute) == getattr(part, attribute), attribute


@st.composite
def one_invalid_part(draw):
    cls = draw(st.sampled_from([c for c in PARTS if set(PART_PARAMETERS[c]) & set(VALIDATED)]))
    name = draw(st.sampled_from([n for n in PART_PARAMETERS[cls] if n in VALIDATED]))
    return cls, name, draw(SPECS[name].invalid())


@SETTINGS
@given(case=one_invalid_part())
def test_parts_refuse_each_invalid_value_by_name_and_range(case):
    cls, name, value = case
    with pytest.raises(ValueError, match=SPECS[name].message(name)):
        cls(**{name: value})


@SETTINGS
@given(
    policy=valid_part(policies.Policy),
    direction=valid_part(directions.Direction),
    total_steps=st.none() | SPECS["total_steps"].valid(),
    sync=st.booleans(),
)
def test_any_policy_with_any_direction_builds_and_round_trips(policy, direction, total_steps, sync):
    model = keras_aesam.SharpnessAwareModel(
        inner=tiny_inner(), policy=policy, direction=direction,
        total_steps=total_steps, sync_perturbation=sync,
    )
    assert model.method is None
    assert_round_trips(model)
    again = type(model).from_config(copy.deepcopy(model.get_config()))
    assert type(again.policy) is type(policy) and type(again.direction) is type(direction)
    assert as_json(again.policy.get_config()) == as_json(policy.get_config())
    assert as_json(again.direction.get_config()) == as_json(direction.get_config())


# --------------------------------------------------------------------------
# Invalid values that once got through: non-finite integers, seeds, switches
# --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "method, name, value", [("looksam", "k", math.inf), ("ae_sam", "total_steps", math.nan)],
    ids=["k-inf", "total_steps-nan"],
)
def test_non_finite_integer_hyperparameters_name_themselves(method, name, value):
    with pytest.raises(ValueError, match=SPECS[name].message(name)):
        build("wrap", method, {name: value})


@pytest.mark.parametrize(
    "method, value", [("ss_sam", 1.5), ("ss_sam", None), ("esam", "abc"), ("esam", 2**62)],
    ids=["ss_sam-1.5", "ss_sam-None", "esam-abc", "esam-2**62"],
)
def test_invalid_seed_names_itself(method, value):
    with pytest.raises(ValueError, match=r"seed must be an integer"):
        build("wrap", method, {"seed": value})


@pytest.mark.parametrize(
    "method, name",
    [("sam", "adaptive"), ("looksam", "per_tensor"), ("ae_sam", "sync_perturbation")],
)
def test_non_boolean_switches_are_refused(method, name):
    with pytest.raises(ValueError, match=rf"{name} must be True or False"):
        build("wrap", method, {name: "false"})


@pytest.mark.parametrize("method", ["sam"])
def test_method_parameters_are_only_hyperparameters(method):
    assert not {"args", "kwargs"} & set(keras_aesam.method_parameters(method))
    with pytest.raises(TypeError, match=rf"method '{method}' does not take \['kwargs'\]"):
        build("wrap", method, {"kwargs": 1})
