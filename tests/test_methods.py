"""The seven methods: the pure update rules against NumPy, SS-SAM's coin, ESAM's
selection and weight perturbation, and any policy with any direction."""

import math

import numpy as np
import pytest
import tensorflow as tf

import keras
import keras_aesam
from keras_aesam import directions, ops as sam_ops, policies

from test_model import compile_sgd, small_net, toy_data

RNG = np.random.default_rng(0)


def tensors(*shapes):
    return [RNG.normal(size=s).astype("float32") for s in shapes]


def np_list(ts):
    return [np.asarray(t, dtype=np.float64) for t in ts]


# --------------------------------------------------------------------------
# Pure rules vs NumPy
# --------------------------------------------------------------------------
def test_sam_perturbation_has_norm_rho_along_g():
    g = tensors((3, 4), (4,))
    e = np_list(sam_ops.sam_perturbation(g, 0.05))
    norm = math.sqrt(sum(np.sum(t**2) for t in np_list(g)))
    for ei, gi in zip(e, np_list(g)):
        np.testing.assert_allclose(ei, 0.05 * gi / norm, rtol=1e-5)


def test_asam_perturbation_matches_formula():
    g, w = tensors((3, 4), (4,)), tensors((3, 4), (4,))
    e = np_list(sam_ops.asam_perturbation(g, w, 0.5))
    gn, wn = np_list(g), np_list(w)
    denom = math.sqrt(sum(np.sum((np.abs(a) * b) ** 2) for a, b in zip(wn, gn)))
    for ei, a, b in zip(e, wn, gn):
        np.testing.assert_allclose(ei, 0.5 * a**2 * b / denom, rtol=1e-5)


@pytest.mark.parametrize("per_tensor", [False, True])
def test_looksam_projection_and_reuse(per_tensor):
    g, g_hat = tensors((5, 2), (2,)), tensors((5, 2), (2,))
    gv = np_list(sam_ops.looksam_orthogonal(g_hat, g, per_tensor=per_tensor))
    d = np_list(sam_ops.looksam_reuse(g, [tf.constant(v, tf.float32) for v in gv], 0.3, per_tensor=per_tensor))
    gn, hn = np_list(g), np_list(g_hat)
    groups = [[0], [1]] if per_tensor else [[0, 1]]
    for idx in groups:
        dot = sum(np.sum(hn[i] * gn[i]) for i in idx)
        gg = sum(np.sum(gn[i] ** 2) for i in idx)
        ref_v = {i: hn[i] - dot / gg * gn[i] for i in idx}
        # orthogonal to g over the group
        assert abs(sum(np.sum(ref_v[i] * gn[i]) for i in idx)) < 1e-9
        vv = math.sqrt(sum(np.sum(ref_v[i] ** 2) for i in idx))
        for i in idx:
            np.testing.assert_allclose(gv[i], ref_v[i], rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(d[i], gn[i] + 0.3 * math.sqrt(gg) / vv * ref_v[i], rtol=1e-4, atol=1e-6)


def test_ema_and_threshold_schedule():
    mean, var = sam_ops.ema_moments(1.0, 0.5, 3.0, 0.9)
    assert float(mean) == pytest.approx(0.9 + 0.3)
    assert float(var) == pytest.approx(0.9 * 0.5 + 0.1 * (3.0 - 1.2) ** 2)
    c = [float(sam_ops.threshold_coefficient(t, 10, -1.0, 1.0)) for t in (0, 5, 10, 15)]
    assert c == pytest.approx([1.0, 0.0, -1.0, -1.0])


def test_sds_keeps_the_samples_whose_loss_rose_most():
    before = np.array([1.0, 2.0, 0.5, 3.0, 1.0, 0.1], "float32")
    after = before + np.array([0.3, -0.2, 0.9, 0.0, 0.5, 0.7], "float32")
    keep = np.sort(np.asarray(sam_ops.sds_select(before, after, 0.5)))
    np.testing.assert_array_equal(keep, [2, 4, 5])  # increases 0.9, 0.5, 0.7
    assert len(np.asarray(sam_ops.sds_select(before, after, 0.01))) == 1  # ⌈γ·B⌉ ≥ 1
    assert len(np.asarray(sam_ops.sds_select(before, after, 0.34))) == 3  # ⌈2.04⌉


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


# --------------------------------------------------------------------------
# ESAM step against NumPy, given the same masks
# --------------------------------------------------------------------------
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


# --------------------------------------------------------------------------
# SS-SAM's coin
# --------------------------------------------------------------------------
def coin_flips(policy, steps):
    flip = tf.function(lambda t: policy.decide({}, 1.0, t, None)[0])
    return np.array([bool(flip(tf.constant(t, tf.int64))) for t in range(steps)])


def test_bernoulli_policy_fraction_within_three_standard_errors():
    policy = policies.Bernoulli(p=0.3, seed=5)
    draws = coin_flips(policy, 3000)
    se = math.sqrt(0.3 * 0.7 / draws.size)
    assert abs(draws.mean() - 0.3) < 3 * se
    again = coin_flips(policies.Bernoulli(p=0.3, seed=5), 200)
    np.testing.assert_array_equal(again, draws[:200])
    other = coin_flips(policies.Bernoulli(p=0.3, seed=6), 200)
    assert (other != draws[:200]).any()


def test_ss_sam_same_seed_same_decisions_and_weights():
    x, y = toy_data(n=128)
    init = small_net().get_weights()

    def run(seed):
        inner = small_net()
        inner.set_weights(init)
        model = compile_sgd(keras_aesam.wrap(inner, method="ss_sam", seed=seed))
        h = model.fit(x, y, epochs=3, batch_size=16, shuffle=False, verbose=0).history
        return h["sam_fraction"], inner.get_weights()

    (f1, w1), (f2, w2), (f3, _) = run(0), run(0), run(1)
    assert f1 == f2 and f1 != f3
    for a, b in zip(w1, w2):
        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------
# Every policy with every direction
# --------------------------------------------------------------------------
ALL_POLICIES = [
    policies.Never(), policies.Always(), policies.Bernoulli(0.5), policies.Periodic(3), policies.Adaptive(),
    policies.Late(1 / 3), policies.ScheduledCoin(0.5), policies.Quantile(0.5),
]
ALL_DIRECTIONS = [
    directions.Direction(rho=0.05),
    directions.Direction(rho=0.5, adaptive=True),
    directions.LookSAM(alpha=0.5),
    directions.LookSAM(per_tensor=True),
    directions.ESAM(beta=0.5, gamma=0.5),
]


@pytest.mark.parametrize("policy", ALL_POLICIES, ids=lambda p: p.name)
@pytest.mark.parametrize("direction", ALL_DIRECTIONS, ids=repr)
def test_any_policy_with_any_direction_trains(policy, direction):
    # Eager keeps 25 combinations fast; graph mode and XLA are covered per method.
    model = keras_aesam.SharpnessAwareModel(inner=small_net(), policy=policy, direction=direction)
    compile_sgd(model, run_eagerly=True)
    x, y = toy_data(n=48)
    h = model.fit(x, y, epochs=1, batch_size=16, verbose=0).history
    assert np.isfinite(h["loss"][0]) and h["skipped_steps"] == [0.0]
    expected = {"never": 0.0, "always": 1.0, "periodic": 1 / 3, "late": 1 / 3}.get(policy.name)
    if expected is not None:
        assert h["sam_fraction"][0] == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("name", sorted(keras_aesam.METHODS))
def test_every_named_method_and_class(name):
    cls = {
        "erm": keras_aesam.ERMModel, "sam": keras_aesam.SAMModel, "esam": keras_aesam.ESAMModel,
        "ss_sam": keras_aesam.SSSAMModel, "looksam": keras_aesam.LookSAMModel,
        "ae_sam": keras_aesam.AESAMModel, "ae_looksam": keras_aesam.AELookSAMModel,
        "late_sam": keras_aesam.LateSAMModel, "rst": keras_aesam.RSTModel,
        "quantile_sam": keras_aesam.QuantileSAMModel,
    }[name]
    assert cls.method == name
    wrapped = keras_aesam.wrap(small_net(), method=name)
    inputs = keras.Input((6,))
    built = cls(inputs, keras.layers.Dense(3)(inputs))
    assert wrapped.hyperparameters == built.hyperparameters


def test_paper_defaults():
    hp = lambda m: keras_aesam.wrap(small_net(), method=m).hyperparameters
    assert hp("ss_sam")["p"] == 0.5
    assert hp("looksam")["k"] == 5 and hp("looksam")["alpha"] == 0.7
    assert (hp("ae_sam")["lambda1"], hp("ae_sam")["lambda2"]) == (-1.0, 1.0)
    assert (hp("ae_looksam")["lambda1"], hp("ae_looksam")["lambda2"]) == (0.0, 2.0)
    assert hp("esam")["beta"] == 0.6 and hp("esam")["gamma"] == 0.5
    assert all(hp(m)["rho"] == 0.05 for m in keras_aesam.METHODS)
    assert hp("ae_sam")["delta"] == 0.9
