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


def test_sam_perturbation_from_a_known_squared_norm_is_the_same_bits():
    """The step hands e the policy's ‖g‖² instead of a second pass over g: nothing changes."""
    g = [tf.constant(t) for t in tensors((3, 4), (4,))]
    direct = sam_ops.sam_perturbation(g, 0.05)
    reused = sam_ops.sam_perturbation(g, 0.05, sq_norm=sam_ops.global_sq_norm(g))
    for a, b in zip(direct, reused):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_momentum_perturbation_has_norm_rho_against_the_momentum():
    """MSAM: ``e = -ρ·v/‖v‖`` over all tensors (one global norm)."""
    v = tensors((3, 4), (4,))
    e = np_list(sam_ops.momentum_perturbation(v, 3.0))
    vn = np_list(v)
    norm = math.sqrt(sum(np.sum(t**2) for t in vn))
    for ei, vi in zip(e, vn):
        np.testing.assert_allclose(ei, -3.0 * vi / norm, rtol=1e-5)
    assert math.sqrt(sum(np.sum(t**2) for t in e)) == pytest.approx(3.0, rel=1e-5)


def test_w_minus_e_of_sgds_slot_is_w_plus_e_of_v_bit_for_bit():
    """SGD keeps ``m = -v``: the step forms ``w - e(m)`` rather than negating
    ``m`` first, and gets the same bits as ``w + e(v)``."""
    w, m = tensors((64, 32), (32,)), tensors((64, 32), (32,))
    v = [-t for t in m]
    folded = sam_ops.subtract_lists(w, sam_ops.momentum_perturbation(m, 0.7))
    direct = sam_ops.add_lists(w, sam_ops.momentum_perturbation(v, 0.7))
    for a, b in zip(folded, direct):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, None], ids=["nan", "inf", "-inf", "inf and -inf"])
def test_global_sum_is_finite_exactly_when_every_entry_is(bad):
    """ERM's finiteness check: one non-finite entry anywhere makes the sum
    non-finite (+inf and -inf together make a NaN), finite entries keep it finite."""
    g = tensors((64, 32), (32,))
    assert np.isfinite(float(sam_ops.global_sum(g)))
    assert float(sam_ops.global_sum(g)) == pytest.approx(sum(float(np.sum(t, dtype=np.float64)) for t in g),
                                                         rel=1e-4, abs=1e-3)
    broken = [t.copy() for t in g]
    if bad is None:
        broken[0][3, 5], broken[1][7] = np.inf, -np.inf
    else:
        broken[1][7] = bad
    assert not np.isfinite(float(sam_ops.global_sum(broken)))


def test_global_sum_reads_sparse_rows_and_half_precision_in_float32():
    g = tf.IndexedSlices(tf.constant([[1.0, 2.0], [1.0, 0.0]]), tf.constant([3, 3]), tf.constant([5, 2]))
    assert float(sam_ops.global_sum([g])) == 4.0  # repeated rows add up, as in the dense tensor
    half = [tf.fill([100], tf.constant(60000.0, tf.float16))]  # its float16 sum would overflow
    assert float(sam_ops.global_sum(half)) == pytest.approx(6.0e6, rel=1e-3)


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



# --------------------------------------------------------------------------
# Sparse gradients: an IndexedSlices counts as its dense tensor
# --------------------------------------------------------------------------
def test_global_sq_norm_of_repeated_rows_is_the_dense_tensors():
    g = tf.IndexedSlices(tf.constant([[1.0, 0.0], [1.0, 0.0]]), tf.constant([3, 3]),
                         tf.constant([5, 2]))
    assert float(sam_ops.global_sq_norm([g])) == 4.0  # (1 + 1)², not 1² + 1²
    assert float(sam_ops.global_sq_norm([tf.convert_to_tensor(g)])) == 4.0


def sparse_and_dense(rows=6, cols=3, indices=(4, 1, 4, 0, 4, 1), seed=1):
    """An IndexedSlices with repeated indices, its dense tensor as NumPy, and a
    dense companion tensor (a second weight)."""
    rng = np.random.default_rng(seed)
    values = rng.normal(size=(len(indices), cols))
    sparse = tf.IndexedSlices(
        tf.constant(values, tf.float32), tf.constant(indices, tf.int64),
        tf.constant([rows, cols], tf.int64),
    )
    dense = np.zeros((rows, cols))
    np.add.at(dense, list(indices), values)
    other = rng.normal(size=(cols,))
    return sparse, dense, other


def as_numpy(t):
    return np.asarray(tf.convert_to_tensor(t), dtype=np.float64)


def test_merge_duplicates_keeps_the_dense_tensor_with_each_row_once():
    sparse, dense, _ = sparse_and_dense()
    merged = sam_ops.merge_duplicates(sparse)
    assert sorted(np.asarray(merged.indices).tolist()) == [0, 1, 4]
    np.testing.assert_allclose(as_numpy(merged), dense, rtol=1e-6)
    t = tf.constant(dense)
    assert sam_ops.merge_duplicates(t) is t  # a dense tensor passes through


def test_sam_perturbation_of_sparse_gradient_is_the_dense_one_and_stays_sparse():
    sparse, dense, other = sparse_and_dense()
    e = sam_ops.sam_perturbation([sparse, tf.constant(other, tf.float32)], 0.05)
    assert isinstance(e[0], tf.IndexedSlices)
    norm = math.sqrt(np.sum(dense**2) + np.sum(other**2))
    np.testing.assert_allclose(as_numpy(e[0]), 0.05 * dense / norm, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(as_numpy(e[1]), 0.05 * other / norm, rtol=1e-5)


def test_asam_perturbation_of_sparse_gradient_is_the_dense_one():
    sparse, dense, other = sparse_and_dense()
    rng = np.random.default_rng(5)
    w = [rng.normal(size=dense.shape), rng.normal(size=other.shape)]
    e = sam_ops.asam_perturbation(
        [sparse, tf.constant(other, tf.float32)], [tf.constant(t, tf.float32) for t in w], 0.5
    )
    assert isinstance(e[0], tf.IndexedSlices)
    denom = math.sqrt(np.sum((np.abs(w[0]) * dense) ** 2) + np.sum((np.abs(w[1]) * other) ** 2))
    np.testing.assert_allclose(as_numpy(e[0]), 0.5 * w[0] ** 2 * dense / denom, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(as_numpy(e[1]), 0.5 * w[1] ** 2 * other / denom, rtol=1e-5)


def test_adding_a_sparse_perturbation_scatters_its_rows_into_the_weights():
    sparse, dense, _ = sparse_and_dense()
    w = np.random.default_rng(2).normal(size=dense.shape)
    (moved,) = sam_ops.add_lists([tf.constant(w, tf.float32)], [sparse])
    np.testing.assert_allclose(np.asarray(moved), w + dense, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("per_tensor", [False, True])
def test_looksam_on_sparse_gradients_gives_the_dense_result(per_tensor):
    g, g_dense, other = sparse_and_dense(seed=3)
    g_hat, g_hat_dense, other_hat = sparse_and_dense(indices=(4, 2, 2, 0), seed=4)
    to_tf = lambda t: tf.constant(t, tf.float32)
    g_v = sam_ops.looksam_orthogonal([g_hat, to_tf(other_hat)], [g, to_tf(other)], per_tensor=per_tensor)
    ref_v = sam_ops.looksam_orthogonal(
        [to_tf(g_hat_dense), to_tf(other_hat)], [to_tf(g_dense), to_tf(other)], per_tensor=per_tensor
    )
    d = sam_ops.looksam_reuse([g, to_tf(other)], g_v, 0.7, per_tensor=per_tensor)
    ref_d = sam_ops.looksam_reuse([to_tf(g_dense), to_tf(other)], ref_v, 0.7, per_tensor=per_tensor)
    for got, ref in zip([*g_v, *d], [*ref_v, *ref_d]):
        assert not isinstance(got, tf.IndexedSlices)  # g_v is dense state, d is dense
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-6)


def test_swp_keeps_or_zeroes_the_rows_of_a_sparse_perturbation():
    sparse, dense, other = sparse_and_dense()
    e = [sparse, tf.constant(other, tf.float32)]
    for mask in ([True, False], [False, True]):
        out = sam_ops.swp_perturbation(e, [tf.constant(m) for m in mask], 0.6)
        assert isinstance(out[0], tf.IndexedSlices)
        np.testing.assert_allclose(as_numpy(out[0]), dense / 0.6 if mask[0] else 0 * dense, rtol=1e-6)
        np.testing.assert_allclose(as_numpy(out[1]), other / 0.6 if mask[1] else 0 * other, rtol=1e-6)


def test_map_values_scales_the_rows_of_a_sparse_tensor():
    sparse, dense, _ = sparse_and_dense()
    out = sam_ops.map_values(lambda v: v * 3.0, sparse)
    assert isinstance(out, tf.IndexedSlices)
    np.testing.assert_allclose(as_numpy(out), 3.0 * dense, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(sam_ops.map_values(lambda v: v * 3.0, tf.ones(2))), [3.0, 3.0])
