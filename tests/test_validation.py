"""Bad input is refused at construction, with the parameter's name and range."""

import keras
import numpy as np
import pytest

import keras_aesam
from keras_aesam import directions, policies
from test_model import small_net, toy_data


@pytest.mark.parametrize(
    "method, kwargs, pattern",
    [
        ("sam", {"rho": 0.0}, r"rho must be in \(0, inf\)"),
        ("sam", {"rho": -1.0}, r"rho must be in \(0, inf\)"),
        ("sam", {"rho": float("nan")}, r"rho must be in"),
        ("sam", {"rho": "big"}, r"rho must be a real number"),
        ("ae_sam", {"lambda1": 2.0, "lambda2": 1.0}, r"lambda1 must be <= lambda2"),
        ("ae_sam", {"delta": 0.0}, r"delta must be in \(0, 1\)"),
        ("ae_sam", {"delta": 1.0}, r"delta must be in \(0, 1\)"),
        ("ae_sam", {"total_steps": 0}, r"total_steps must be an integer >= 1"),
        ("ae_sam", {"total_steps": 2.5}, r"total_steps must be an integer >= 1"),
        ("ss_sam", {"p": 0.0}, r"p must be in \(0, 1\]"),
        ("ss_sam", {"p": 1.5}, r"p must be in \(0, 1\]"),
        ("looksam", {"k": 0}, r"k must be an integer >= 1"),
        ("looksam", {"k": 2.5}, r"k must be an integer >= 1"),
        ("looksam", {"alpha": -0.1}, r"alpha must be in \[0, inf\)"),
        ("esam", {"beta": 0.0}, r"beta must be in \(0, 1\]"),
        ("esam", {"beta": 1.2}, r"beta must be in \(0, 1\]"),
        ("esam", {"gamma": 0.0}, r"gamma must be in \(0, 1\]"),
        ("ae_looksam", {"target_sam_fraction": 1.0}, r"target_sam_fraction must be in \(0, 1\)"),
        ("ae_sam", {"target_sam_fraction": 0.0}, r"target_sam_fraction must be in \(0, 1\)"),
        ("ae_sam", {"target_sam_fraction": 0.3, "lambda1": 0.0}, r"either target_sam_fraction or the lambdas"),
    ],
)
def test_invalid_hyperparameters_raise_at_construction(method, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        keras_aesam.wrap(small_net(), method=method, **kwargs)


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"method must be one of .*'ae_looksam'.*'ae_sam'"):
        keras_aesam.wrap(small_net(), method="adam_sam")


def test_hyperparameter_of_another_method_is_refused():
    with pytest.raises(TypeError, match=r"method 'sam' does not take \['alpha'\]"):
        keras_aesam.wrap(small_net(), method="sam", alpha=0.5)


@pytest.mark.parametrize("not_a_model", [keras.layers.Dense(3), lambda x: x, "model"])
def test_wrapping_something_that_is_not_a_keras_model(not_a_model):
    with pytest.raises(TypeError, match="keras.Model"):
        keras_aesam.wrap(not_a_model)


def test_wrapping_twice_is_refused():
    model = keras_aesam.wrap(small_net())
    with pytest.raises(ValueError, match="already sharpness-aware"):
        keras_aesam.wrap(model)


def test_fit_before_compile_is_a_clear_error():
    model = keras_aesam.wrap(small_net())
    x, y = toy_data()
    with pytest.raises(ValueError, match="compile"):
        model.fit(x, y, verbose=0)


def test_named_class_constructors_validate_too():
    inputs = keras.Input((6,))
    outputs = keras.layers.Dense(3)(inputs)
    with pytest.raises(ValueError, match="rho"):
        keras_aesam.SAMModel(inputs, outputs, rho=0)
    with pytest.raises(ValueError, match="lambda1 must be <= lambda2"):
        keras_aesam.AELookSAMModel(inputs, outputs, lambda1=3.0)


def test_policy_and_direction_objects_validate():
    with pytest.raises(ValueError, match="delta"):
        policies.Adaptive(delta=1.5)
    with pytest.raises(ValueError, match="rho"):
        directions.LookSAM(rho=0)


def test_method_and_policy_together_is_refused():
    with pytest.raises(ValueError, match="either method"):
        keras_aesam.SharpnessAwareModel(inner=small_net(), method="sam", policy=policies.Always())


def test_esam_selection_needs_per_sample_losses():
    model = keras_aesam.wrap(small_net(), method="esam")

    def scalar_loss(y_true, y_pred):
        return keras.ops.mean(keras.ops.square(y_pred))

    model.compile(optimizer="sgd", loss=scalar_loss)
    x, y = toy_data()
    with pytest.raises(ValueError, match="per-sample losses"):
        model.fit(x, y, epochs=1, verbose=0)
    # with selection off, the same loss is fine
    model = keras_aesam.wrap(small_net(), method="esam", gamma=1.0)
    model.compile(optimizer="sgd", loss=scalar_loss)
    model.fit(x, y, epochs=1, verbose=0)


def test_valid_extremes_are_accepted():
    keras_aesam.wrap(small_net(), method="ss_sam", p=1.0)
    keras_aesam.wrap(small_net(), method="esam", beta=1.0, gamma=1.0)
    keras_aesam.wrap(small_net(), method="looksam", k=1, alpha=0.0)
    keras_aesam.wrap(small_net(), method="ae_sam", lambda1=1.0, lambda2=1.0, total_steps=1)
    model = keras_aesam.wrap(small_net(), method="ae_sam", target_sam_fraction=0.3)
    assert model.policy.expected_sam_fraction() == pytest.approx(0.3, abs=1e-9)
    assert model.policy.lambda2 - model.policy.lambda1 == pytest.approx(2.0)
    assert np.isfinite(model.policy.lambda1)
