"""keras_aesam.directions: ESAM's weight perturbation and selection against NumPy,
and which weights a perturbation filter reaches."""

import math

import keras
import numpy as np
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

