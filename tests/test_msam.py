"""Momentum-SAM (``method="msam"``): one forward-backward pass per step, at
``w + e`` with ``e`` from the optimizer's momentum, its gradient applied at ``w``.

The update itself is checked against a float64 NumPy reference in
test_reference.py; here: the usage forms, the optimizers it takes and refuses,
which point BatchNorm's statistics see, non-finite steps, mixed precision, and
that saved and exported weights are the unperturbed ``w``.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_aesam
from keras_aesam import directions
from test_conformance import FORMS, build, compile_for, network_weights
from test_model import compile_sgd, small_net, toy_data

SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def momentum(model):
    """Keras SGD's ``m`` per trainable weight (``m ← µm - lr·g``)."""
    opt = getattr(model.optimizer, "inner_optimizer", model.optimizer)
    return [opt.momentums[opt._get_variable_index(v)].numpy() for v in model.trainable_variables]


def perturbation(model, rho):
    """``e = ρ·m/‖m‖`` from Keras's ``m`` (docs/algorithms.md), in float64."""
    m = [t.astype(np.float64) for t in momentum(model)]
    norm = np.sqrt(sum(np.sum(t * t) for t in m))
    return [rho * t / norm for t in m]


def fit_once(model, epochs=1):
    x, y = toy_data(n=64)
    return model.fit(x, y, epochs=epochs, batch_size=16, shuffle=False, verbose=0).history


# --------------------------------------------------------------------------
# Every usage form, one pass per step
# --------------------------------------------------------------------------
def test_every_form_trains_the_same_weights():
    """wrap, the functional constructor and a subclass of MSAMModel, from one
    seed, train to the same weights (the same arithmetic; 1e-6 relative allows
    Grappler's regrouping of sums, measured at 1 ulp in the conformance tests)."""
    from test_conformance import arrays

    x, y, _ = arrays("single")
    runs = {}
    for form in FORMS:
        model = build(form, "single", "msam", rho=0.5)
        model.compile(**compile_for("single"))
        keras.utils.set_random_seed(3)
        history = model.fit(x, y, batch_size=16, epochs=2, verbose=0).history
        assert history["sam_fraction"] == [0.0, 0.0] and history["skipped_steps"] == [0.0, 0.0]
        runs[form] = network_weights(model)
    for form in FORMS[1:]:
        for a, b in zip(runs[form], runs["wrap"]):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7, err_msg=form)


def test_sequential_inner_and_the_named_class():
    model = compile_sgd(keras_aesam.MSAMModel(inner=small_net(), rho=0.5))
    assert model.method == "msam" and model.hyperparameters == {"rho": 0.5}
    fit_once(model)
    assert model.policy_state["step"] == 4
    assert any(np.any(m != 0) for m in momentum(model))


def test_one_forward_backward_pass_per_step():
    """The model is called once per step (the pass at w + e), like ERM."""
    calls = []

    class Counted(keras.layers.Layer):
        def call(self, x):
            calls.append(1)  # traced once per traced pass
            return x

    inner = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3), Counted()])
    model = compile_sgd(keras_aesam.wrap(inner, method="msam"), run_eagerly=True)
    fit_once(model)  # (fit's first call also builds the optimizer symbolically)
    calls.clear()
    fit_once(model)
    assert len(calls) == 4  # 4 steps, eagerly: one call each


# --------------------------------------------------------------------------
# Optimizers: momentum required, read through a LossScaleOptimizer
# --------------------------------------------------------------------------
@pytest.mark.parametrize("optimizer, named", [
    (lambda: keras.optimizers.SGD(0.05), "momentum=0.0"),
    (lambda: keras.optimizers.RMSprop(0.01), "RMSprop"),
    (lambda: keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.05)), "momentum=0.0"),
])
def test_an_optimizer_without_momentum_is_refused_before_the_first_step(optimizer, named):
    model = keras_aesam.wrap(small_net(), method="msam")
    model.compile(optimizer=optimizer(), loss=SCCE)
    weights = [w.copy() for w in model.get_weights()]
    with pytest.raises(ValueError, match=named):
        fit_once(model)
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), weights))


@pytest.mark.parametrize("optimizer", [
    lambda: keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True),
    lambda: keras.optimizers.Adam(0.01),
    lambda: keras.optimizers.AdamW(0.01, weight_decay=0.01),
])
def test_sgd_nesterov_adam_and_adamw_are_taken(optimizer):
    model = keras_aesam.wrap(small_net(), method="msam")
    model.compile(optimizer=optimizer(), loss=SCCE)
    h = fit_once(model, epochs=2)
    assert np.all(np.isfinite(h["loss"])) and h["loss"][-1] < h["loss"][0]


def test_constructor_refuses_a_second_pass_and_a_bad_rho():
    with pytest.raises(ValueError, match="Never policy"):
        keras_aesam.SharpnessAwareModel(
            inner=small_net(), policy=keras_aesam.policies.Always(), direction=directions.MSAM()
        )
    with pytest.raises(ValueError, match="rho"):
        keras_aesam.wrap(small_net(), method="msam", rho=0.0)
    with pytest.raises(TypeError, match="does not take"):
        keras_aesam.wrap(small_net(), method="msam", k=2)


# --------------------------------------------------------------------------
# BatchNorm, non-finite steps
# --------------------------------------------------------------------------
def test_batchnorm_statistics_move_once_from_the_perturbed_pass():
    """After a first step (m ≠ 0) the next step's pass is at w + ρ·m/‖m‖, and
    BatchNorm's moving mean takes that pass's batch mean, once."""
    inner = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4),
                              keras.layers.BatchNormalization(momentum=0.9), keras.layers.Dense(3)])
    model = compile_sgd(keras_aesam.wrap(inner, method="msam", rho=0.5))
    x, y = toy_data(n=16)
    model.train_on_batch(x, y)
    bn = inner.layers[1]
    before = bn.moving_mean.numpy().astype(np.float64)
    kernel, bias = (v.numpy().astype(np.float64) for v in inner.layers[0].weights)
    e = perturbation(model, 0.5)  # trainable order: kernel, bias, gamma, beta, kernel, bias
    at = lambda dk, db: (x @ (kernel + dk) + bias + db).mean(axis=0)
    model.train_on_batch(x, y)
    expected = 0.9 * before + 0.1 * at(e[0], e[1])
    np.testing.assert_allclose(bn.moving_mean.numpy(), expected, rtol=1e-5, atol=1e-6)
    # the unperturbed point would be visibly different
    assert np.max(np.abs(0.9 * before + 0.1 * at(0, 0) - expected)) > 1e-3


def test_a_non_finite_step_moves_nothing():
    model = compile_sgd(keras_aesam.wrap(small_net(dropout=0.2), method="msam"))
    x, y = toy_data(n=16)
    model.train_on_batch(x, y)
    state = [v.numpy().copy() for v in model.variables + model.optimizer.variables]
    bad = x.copy()
    bad[0, 0] = np.nan
    logs = model.train_on_batch(bad, y, return_dict=True)
    assert logs["skipped_steps"] == 1.0
    after = [v.numpy() for v in model.variables + model.optimizer.variables]
    for a, b in zip(after, state):
        np.testing.assert_array_equal(a, b)
    model.train_on_batch(x, y)  # and training goes on
    assert model.policy_state["step"] == 2


def test_mixed_precision_perturbs_along_the_inner_optimizers_momentum():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = compile_sgd(keras_aesam.wrap(small_net(), method="msam", rho=0.5))
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        h = fit_once(model, epochs=2)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert np.all(np.isfinite(h["loss"])) and h["skipped_steps"] == [0.0, 0.0]
    slots, sign = directions.MSAM.momentum(model.optimizer, model.trainable_variables)
    assert sign == -1.0  # SGD's slot is -v
    for slot, m in zip(slots, momentum(model)):
        np.testing.assert_array_equal(slot.numpy(), m)  # read from the inner SGD
    assert any(np.any(m != 0) for m in momentum(model))


# --------------------------------------------------------------------------
# What is saved and exported: the unperturbed w
# --------------------------------------------------------------------------
def test_saved_and_exported_weights_are_the_unperturbed_w(tmp_path):
    inner = small_net()
    model = compile_sgd(keras_aesam.wrap(inner, method="msam", rho=0.5))
    fit_once(model, epochs=2)
    x, _ = toy_data(n=8, seed=1)
    at_w = inner.predict(x, verbose=0)
    e = perturbation(model, 0.5)
    values = [v.value + tf.constant(d, v.dtype) for v, d in zip(model.trainable_variables, e)]
    with keras.StatelessScope(state_mapping=list(zip(model.trainable_variables, values))):
        at_w_plus_e = model(x, training=False).numpy()
    assert np.max(np.abs(at_w_plus_e - at_w)) > 1e-3  # the two points are told apart

    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    for a, b in zip(loaded.inner.get_weights(), inner.get_weights()):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), at_w)

    model.export(str(tmp_path / "export"), verbose=False)
    exported = tf.saved_model.load(str(tmp_path / "export"))  # kept: it owns the variables
    np.testing.assert_allclose(exported.serve(x).numpy(), at_w, rtol=1e-6, atol=1e-6)
