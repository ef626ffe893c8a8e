"""keras_aesam.ops: each pure update rule against a NumPy reference."""

import math

import numpy as np
import pytest
import tensorflow as tf

from keras_aesam import ops as sam_ops

RNG = np.random.default_rng(0)


def tensors(*shapes):
    return [RNG.normal(size=s).astype("float32") for s in shapes]


def np_list(ts):
    return [np.asarray(t, dtype=np.float64) for t in ts]


def test_sam_perturbation_has_norm_rho_along_g():
    g = tensors((3, 4), (4,))
    e = np_list(sam_ops.sam_perturbation(g, 0.05))
    norm = math.sqrt(sum(np.sum(t**2) for t in np_list(g)))
    for ei, gi in zip(e, np_list(g)):
        np.testing.assert_allclose(ei, 0.05 * gi / norm, rtol=1e-5)


def test_momentum_perturbation_has_norm_rho_against_the_momentum():
    """MSAM: ``e = -ρ·v/‖v‖`` over all tensors (one global norm)."""
    v = tensors((3, 4), (4,))
    e = np_list(sam_ops.momentum_perturbation(v, 3.0))
    vn = np_list(v)
    norm = math.sqrt(sum(np.sum(t**2) for t in vn))
    for ei, vi in zip(e, vn):
        np.testing.assert_allclose(ei, -3.0 * vi / norm, rtol=1e-5)
    assert math.sqrt(sum(np.sum(t**2) for t in e)) == pytest.approx(3.0, rel=1e-5)


def test_momentum_perturbation_is_zero_before_the_first_update():
    zero = [tf.zeros((3, 4)), tf.zeros((4,))]
    for t in np_list(sam_ops.momentum_perturbation(zero, 3.0)):
        assert np.all(t == 0.0) and np.all(np.isfinite(t))


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



def test_select_and_scatter_selected_are_inverse():
    rng = np.random.default_rng(0)
    like = [rng.normal(size=s).astype("float32") for s in [(2, 3), (3,), (4,)]]
    mask = [True, False, True]
    chosen = sam_ops.select(like, mask)
    assert [c.shape for c in chosen] == [(2, 3), (4,)]
    back = [np.asarray(t) for t in sam_ops.scatter_selected(chosen, mask, like)]
    np.testing.assert_array_equal(back[0], like[0])
    np.testing.assert_array_equal(back[1], np.zeros(3))
    np.testing.assert_array_equal(back[2], like[2])


@pytest.mark.parametrize(
    "batch, m, expected",
    [
        (10, None, [(0, 10)]),
        (10, 4, [(0, 4), (4, 8), (8, 10)]),
        (3, 5, [(0, 3)]),
        (4, 1, [(0, 1), (1, 2), (2, 3), (3, 4)]),
    ],
)
def test_group_bounds(batch, m, expected):
    assert sam_ops.group_bounds(batch, m) == expected

