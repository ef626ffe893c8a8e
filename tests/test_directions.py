"""keras_aesam.directions: ESAM's weight perturbation and selection against NumPy,
LookSAM's bound on the age of ``g_v``, and which weights a perturbation filter reaches."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_aesam
from keras_aesam import directions, ops as sam_ops, policies
from test_ops import np_list, tensors


def test_swp_keeps_a_beta_share_of_tensors_scaled_by_one_over_beta():
    esam = directions.ESAM(beta=0.6, seed=3)
    mask_at = tf.function(lambda t: tf.stack(esam.swp_mask(10, t)))
    masks = np.array([mask_at(tf.constant(t, tf.int64)).numpy() for t in range(400)])
    share, se = masks.mean(), math.sqrt(0.6 * 0.4 / masks.size)
    assert abs(share - 0.6) < 3 * se
    # deterministic in (seed, step), different across steps
    assert [bool(m) for m in esam.swp_mask(10, 7)] == list(masks[7])
    assert len({tuple(r) for r in masks}) > 100
    e = tensors((2, 2), (3,))
    out = np_list(sam_ops.swp_perturbation(e, [tf.constant(True), tf.constant(False)], 0.6))
    np.testing.assert_allclose(out[0], e[0] / 0.6, rtol=1e-6)
    np.testing.assert_array_equal(out[1], 0.0)


def test_esam_step_matches_numpy_given_the_same_masks():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(8, 3)).astype("float32")
    Y = rng.normal(size=(8, 1)).astype("float32")
    w0 = rng.normal(size=(3, 1)).astype("float32")
    b0 = np.array([0.3], "float32")
    rho, beta, gamma, lr = 0.5, 0.5, 0.5, 0.1
    esam = directions.ESAM(rho=rho, beta=beta, gamma=gamma, seed=11)
    masks = [bool(m) for m in esam.swp_mask(2, 0)]

    inner = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    inner.set_weights([w0, b0])
    model = keras_aesam.SharpnessAwareModel(inner=inner, policy=policies.Always(), direction=esam)
    model.compile(optimizer=keras.optimizers.SGD(lr), loss=keras.losses.MeanSquaredError())
    model.fit(X, Y, batch_size=8, epochs=1, shuffle=False, verbose=0)

    Xd, Yd = X.astype(float), Y.astype(float)

    def per_sample(w, b):
        return ((Xd @ w + b - Yd) ** 2)[:, 0]

    def grad(w, b, idx):
        r = Xd[idx] @ w + b - Yd[idx]
        return [2 * Xd[idx].T @ r / len(idx), 2 * r.sum(0) / len(idx)]

    w, b = w0.astype(float), b0.astype(float)
    g = grad(w, b, np.arange(8))
    norm = math.sqrt(sum(np.sum(t**2) for t in g))
    e = [rho * t / norm / beta if m else np.zeros_like(t) for t, m in zip(g, masks)]
    rise = per_sample(w + e[0], b + e[1]) - per_sample(w, b)
    keep = np.argsort(-rise)[: math.ceil(gamma * 8)]
    g_hat = grad(w + e[0], b + e[1], keep)
    expected = [w - lr * g_hat[0], b - lr * g_hat[1]]
    for a, r in zip(inner.get_weights(), expected):
        np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-6)
    # and it differs from plain SAM on the full batch: selection did something
    g_full = grad(w + e[0], b + e[1], np.arange(8))
    assert np.max(np.abs(g_full[0] - g_hat[0])) > 1e-3



def test_perturb_mask_searches_each_path():
    paths = ["net/dense/kernel", "net/dense/bias", "net/bn/gamma"]
    assert directions.perturb_mask(None, paths) == [True, True, True]
    assert directions.perturb_mask("bias", paths) == [False, True, False]
    assert directions.perturb_mask(["^net/bn", "kernel$"], paths) == [True, False, True]



# --------------------------------------------------------------------------
# LookSAM: the age of g_v
# --------------------------------------------------------------------------
def test_looksam_reuses_g_v_for_max_age_steps_then_takes_erm_steps():
    look = directions.LookSAM(alpha=0.5, max_age=2)
    g, g_hat = tensors((3, 2), (2,)), tensors((3, 2), (2,))
    state = [np.zeros((3, 2), "float32"), np.zeros((2,), "float32"), np.float32(7.0)]
    d, state = look.on_sam_step(g, g_hat, state)
    for out, ref in zip(np_list(d), np_list(g_hat)):
        np.testing.assert_array_equal(out, ref)
    g_v = np_list(state[:-1])
    assert float(state[-1]) == 0.0
    for age in (1, 2, 3, 4):
        g_now = tensors((3, 2), (2,))
        d, state = look.on_erm_step(g_now, state)
        assert float(state[-1]) == age
        gn = np_list(g_now)
        norm_g = math.sqrt(sum(np.sum(t * t) for t in gn))
        norm_v = math.sqrt(sum(np.sum(t * t) for t in g_v))
        weight = 0.5 if age <= 2 else 0.0
        expected = [a + weight * norm_g / (norm_v + sam_ops.EPS) * v for a, v in zip(gn, g_v)]
        for out, ref in zip(np_list(d), expected):
            np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(np_list(state[:-1])[0], g_v[0])  # g_v itself is kept


def test_looksam_without_a_bound_reuses_g_v_at_any_age():
    look = directions.LookSAM(alpha=0.5, max_age=None)
    g_v = tensors((4,))
    g = tensors((4,))
    d, state = look.on_erm_step(g, [g_v[0], np.float32(1e6)])
    assert float(state[-1]) == 1e6 + 1
    assert np.max(np.abs(np.asarray(d[0]) - g[0])) > 1e-3


def test_the_age_saturates_instead_of_losing_count():
    assert float(sam_ops.looksam_age(np.float32(sam_ops.AGE_CAP))) == sam_ops.AGE_CAP
    assert float(sam_ops.looksam_alpha(0.7, sam_ops.AGE_CAP, 5)) == 0.0


@pytest.mark.parametrize("value", [0, -1, 2.5, "5", True])
def test_max_age_is_a_positive_integer_or_none(value):
    with pytest.raises(ValueError, match=r"max_age must be an integer >= 1"):
        directions.LookSAM(max_age=value)


def test_max_age_defaults_per_method_and_round_trips_through_the_config():
    from keras_aesam.methods import build_method

    assert directions.LookSAM().max_age == directions.DEFAULT_MAX_AGE
    assert build_method("ae_looksam")[1].max_age == directions.DEFAULT_MAX_AGE
    assert build_method("looksam")[1].max_age is None  # Periodic(k) bounds the age at k - 1
    assert build_method("ae_looksam", max_age=None)[1].max_age is None
    for look in (directions.LookSAM(max_age=3), directions.LookSAM(max_age=None)):
        again = directions.LookSAM(**look.get_config())
        assert again.get_config() == look.get_config()


def _looksam_model(seed=0):
    keras.utils.set_random_seed(seed)
    inner = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="tanh"),
                              keras.layers.Dense(1)])
    model = keras_aesam.SharpnessAwareModel(
        inner=inner, policy=policies.Periodic(k=6), direction=directions.LookSAM(rho=0.1, max_age=2))
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    return model


def test_the_age_of_g_v_is_model_state_and_resumes_exactly(tmp_path):
    rng = np.random.default_rng(2)
    X = rng.normal(size=(64, 3)).astype("float32")
    Y = rng.normal(size=(64, 1)).astype("float32")
    straight = _looksam_model()
    straight.fit(X, Y, batch_size=8, epochs=2, shuffle=False, verbose=0)

    first = _looksam_model()
    first.fit(X[:32], Y[:32], batch_size=8, epochs=1, shuffle=False, verbose=0)  # 4 steps: age 3
    ages = [v for v in first.non_trainable_variables if v.path.endswith("direction_age")]
    assert len(ages) == 1 and float(ages[0].numpy()) == 3.0
    path = tmp_path / "half.weights.h5"
    first.save_weights(path)
    resumed = _looksam_model(seed=1)
    resumed.load_weights(path)
    resumed.fit(X[32:], Y[32:], batch_size=8, epochs=1, shuffle=False, verbose=0)
    resumed.fit(X, Y, batch_size=8, epochs=1, shuffle=False, verbose=0)

    # the same 16 steps as the straight run: 4 + 4 + 8
    again = _looksam_model()
    again.fit(X[:32], Y[:32], batch_size=8, epochs=1, shuffle=False, verbose=0)
    again.fit(X[32:], Y[32:], batch_size=8, epochs=1, shuffle=False, verbose=0)
    again.fit(X, Y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(resumed.get_weights(), again.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert straight.policy_state["step"] == resumed.policy_state["step"] == 16
