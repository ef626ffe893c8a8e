"""The math of every method, as small pure functions over lists of tensors.

Nothing here owns state or control flow: each function maps tensors to tensors
(written with ``keras.ops``) or Python numbers to Python numbers, so that each
rule can be checked against a NumPy reference in the tests. The notation is the
one of ``docs/algorithms.md``: ``g`` the mini-batch gradient, ``‖·‖`` the global L2
norm over all trainable weights, ``eps`` a guard against division by zero.
"""

import math

import tensorflow as tf
from keras import ops

EPS = 1e-12
SIGMA2_INIT = math.exp(-10.0)  # σ² before the first step (Algorithm 1)


# --------------------------------------------------------------------------
# Sparse gradients
# --------------------------------------------------------------------------
# An embedding lookup's gradient is a ``tf.IndexedSlices``: rows ``values[k]``
# at ``indices[k]`` of a dense tensor of shape ``dense_shape``, where a repeated
# index means the *sum* of its rows. Every function here gives what it gives
# for the dense tensor: norms merge repeated rows first, scalings and the
# weight-magnitude product act on the rows and keep the slices sparse, and
# LookSAM (whose ``g_v`` is dense state) densifies.
def is_sparse(t):
    """Whether ``t`` is a ``tf.IndexedSlices`` (an embedding's gradient)."""
    return isinstance(t, tf.IndexedSlices)


def dense(t):
    """``t`` as a dense tensor (IndexedSlices are summed into their dense shape)."""
    return tf.convert_to_tensor(t) if is_sparse(t) else t


def merge_duplicates(t):
    """The same IndexedSlices with each row index once, the rows of a repeated
    index summed (``tf.unique`` + ``unsorted_segment_sum``); dense ``t`` as is.

    Its rows' squares then sum to the dense tensor's ``‖·‖²``: a token seen
    twice in a batch counts ``(a + b)²``, not ``a² + b²``.
    """
    if not is_sparse(t):
        return t
    rows, position = tf.unique(t.indices)
    values = tf.math.unsorted_segment_sum(t.values, position, tf.shape(rows)[0])
    return tf.IndexedSlices(values, rows, t.dense_shape)


def map_values(fn, t):
    """``fn(t)`` for a dense ``t``; ``fn`` on the rows of an IndexedSlices.

    Exact for maps that act elementwise and keep 0 at 0 and are additive, such
    as scaling by a number: those commute with summing repeated rows.
    """
    if is_sparse(t):
        return tf.IndexedSlices(fn(t.values), t.indices, t.dense_shape)
    return fn(t)


# --------------------------------------------------------------------------
# Norms and the SAM perturbation
# --------------------------------------------------------------------------
def _sq_sum(t):
    values = merge_duplicates(t).values if is_sparse(t) else t
    return 2.0 * tf.nn.l2_loss(ops.cast(values, "float32"))


def global_sq_norm(tensors):
    """``Σ_i ‖t_i‖²`` in float32: the squared global norm (the AE statistic).

    An IndexedSlices counts as its dense tensor (repeated rows merged first).
    Each ``‖t_i‖²`` is one fused pass over ``t_i`` (``tf.nn.l2_loss``, which
    returns half of it; doubling is exact), not a squared copy of ``t_i``
    summed afterwards: over a step's gradient this norm is the policy's only
    work that grows with the model, and the copy made it cost twice as much.
    """
    return ops.sum(ops.stack([_sq_sum(t) for t in tensors]))


def global_sum(tensors):
    """``Σ`` of every entry of every tensor, in float32: the finiteness check of
    a step whose policy needs no norm.

    Finite exactly when every entry is (a NaN or an infinity stays non-finite
    in a sum), unless finite entries sum past float32's 3.4e38, which skips the
    step as a ``‖g‖²`` past it would, far later. One read per tensor and the
    cheapest reduction there is: under XLA on a CPU a sum is vectorised and a
    sum of squares is not (several times slower on the MLP's gradient).
    An IndexedSlices sums its rows (repeated rows need no merging for a sum).
    """
    return ops.sum(ops.stack([
        ops.sum(ops.cast(t.values if is_sparse(t) else t, "float32")) for t in tensors
    ]))


def global_norm(tensors):
    """The global L2 norm ``‖[t_1, …, t_n]‖``."""
    return ops.sqrt(global_sq_norm(tensors))


def _scaled(tensors, scale):
    return [map_values(lambda v: ops.cast(scale, v.dtype) * v, t) for t in tensors]


def sam_perturbation(grads, rho, eps=EPS, sq_norm=None):
    """``e = ρ · g / (‖g‖ + eps)``: the first-order worst case in a ρ-ball (eq. 2).

    ``sq_norm``: ``‖g‖²`` (float32) when the caller has it already, as the step
    does from the policy's statistic; ``e`` then takes no pass over ``g`` for it.
    """
    norm = global_norm(grads) if sq_norm is None else ops.sqrt(sq_norm)
    return _scaled(grads, rho / (norm + eps))


def asam_perturbation(grads, weights, rho, eps=EPS):
    """Adaptive SAM (Kwon et al., 2021): ``e = ρ·(|w|²⊙g) / (‖|w|⊙g‖ + eps)``.

    The ball is scaled by the weights' magnitudes, so the perturbation is
    invariant to rescalings of a layer that leave the network function fixed.
    """
    abs_w = [ops.abs(ops.cast(w, g.dtype)) for w, g in zip(weights, grads)]
    scaled = [_times(a, g) for a, g in zip(abs_w, grads)]
    scale = rho / (global_norm(scaled) + eps)
    return [_times(ops.cast(scale, a.dtype) * a, s) for a, s in zip(abs_w, scaled)]


def _times(a, g):
    """``a ⊙ g`` for a dense ``a``; on an IndexedSlices ``g``, each row times ``a``'s
    row at its index (exact with repeated indices: the product is linear in g)."""
    if is_sparse(g):
        return tf.IndexedSlices(g.values * tf.gather(a, g.indices), g.indices, g.dense_shape)
    return a * g


def momentum_perturbation(velocity, rho, eps=EPS):
    """Momentum-SAM's ``e = -ρ · v / (‖v‖ + eps)`` (Becker et al., 2024).

    ``v`` is the optimizer's momentum in gradient units (PyTorch's buffer
    ``v ← µv + g``, Adam's first moment): ``e`` is a step of length ρ along the
    optimizer's own descent direction, known before the step's only pass.
    ``e = 0`` while ``v = 0`` (before the first update).
    """
    return _scaled(velocity, -rho / (global_norm(velocity) + eps))


def add_lists(a, b):
    """Elementwise ``a + b`` over two lists of tensors (``w + e``).

    ``a`` is dense; an IndexedSlices in ``b`` is scattered into it (repeated
    rows add up), which gives the dense sum without forming the dense ``b``.
    """
    return [_add(x, y) for x, y in zip(a, b)]


def subtract_lists(a, b):
    """Elementwise ``a - b`` over two lists of dense tensors (``w - e``: MSAM's
    ``w + e`` when its ``e`` was formed from SGD's slot ``-v``; negation is exact,
    so ``w - e(-v)`` is ``w + e(v)`` bit for bit)."""
    return [x - ops.cast(y, x.dtype) for x, y in zip(a, b)]


def _add(x, y):
    if is_sparse(y):
        return tf.tensor_scatter_nd_add(
            x, ops.expand_dims(y.indices, -1), ops.cast(y.values, x.dtype)
        )
    return x + ops.cast(y, x.dtype)


def select(tensors, mask):
    """The tensors whose ``mask`` entry is true, in order (the perturbed subset)."""
    return [t for t, keep in zip(tensors, mask) if keep]


def scatter_selected(selected, mask, like):
    """Inverse of ``select``: ``selected`` where ``mask`` is true, zeros like ``like`` elsewhere.

    With a perturbation filter, ``e`` is formed over the chosen weights only
    (its norm too) and the other weights get ``e = 0``, i.e. stay at ``w``.
    """
    parts = iter(selected)
    return [next(parts) if keep else ops.zeros_like(t) for t, keep in zip(like, mask)]


def group_bounds(batch_size, group_size):
    """``[(start, stop), …]`` splitting ``batch_size`` samples into consecutive
    groups of ``group_size`` (the last one may be smaller): m-sharpness' groups.
    ``group_size=None`` is one group."""
    if group_size is None or group_size >= batch_size:
        return [(0, batch_size)]
    return [(s, min(s + group_size, batch_size)) for s in range(0, batch_size, group_size)]


# --------------------------------------------------------------------------
# The adaptive policy (Algorithm 1)
# --------------------------------------------------------------------------
def ema_moments(mean, var, stat, delta):
    """One EMA step of the mean and variance of ``‖g‖²`` (eqs. 4 and 5).

    The variance update uses the *new* mean, as in Algorithm 1.
    """
    new_mean = delta * mean + (1.0 - delta) * stat
    new_var = delta * var + (1.0 - delta) * ops.square(stat - new_mean)
    return new_mean, new_var


def linear_schedule(step, total_steps, start, end):
    """``(1 - t/T)·start + (t/T)·end``: linear from ``start`` at t=0 to ``end`` at t=T.

    Steps beyond ``T`` keep ``end``. Every scheduled quantity (AE-SAM's ``c_t``,
    the scheduled coin's ``p_t``, the quantile policy's ``f_t``) follows it.
    """
    frac = ops.minimum(
        ops.cast(step, "float32") / ops.maximum(ops.cast(total_steps, "float32"), 1.0),
        1.0,
    )
    return frac * end + (1.0 - frac) * start


def threshold_coefficient(step, total_steps, lambda1, lambda2):
    """``c_t = (t/T)·λ1 + (1 - t/T)·λ2``, linear from λ2 at t=0 to λ1 at t=T.

    Steps beyond ``T`` keep ``c = λ1``.
    """
    return linear_schedule(step, total_steps, lambda2, lambda1)


def normal_upper_tail(c):
    """``1 - Φ(c)`` for a tensor ``c``: the share of a normal above ``µ + c·σ``."""
    c = ops.cast(c, "float32")
    return 0.5 * (1.0 - ops.erf(c / math.sqrt(2.0)))


# --------------------------------------------------------------------------
# Budgeted rivals of the adaptive policy
# --------------------------------------------------------------------------
def late_start(total_steps, fraction):
    """First SAM step of ``late_sam``: ``T - round(f·T)``, so exactly ``round(f·T)``
    of the ``T`` steps are SAM steps (the last ones)."""
    total = ops.cast(total_steps, "float32")
    return total - ops.round(fraction * total)


def coin_endpoints(target, shape):
    """``(p_start, p_end)`` of a coin schedule whose mean over ``[0, T]`` is ``target``.

    ``"constant"``: ``(f, f)``. ``"linear"``: the steepest rising ramp inside
    ``[0, 1]`` with mean ``f``: ``(0, 2f)`` for ``f ≤ 1/2``, ``(2f - 1, 1)`` above.
    """
    if shape == "constant":
        return target, target
    return max(0.0, 2.0 * target - 1.0), min(1.0, 2.0 * target)


def paced_fraction(fraction, surplus, step, total_steps):
    """``f'_t = clip(f_t - S_t / max(T - t, 1), 0, 1)``: the share to aim for now.

    ``S_t = Σ_{s<t} (1[SAM at s] - f_s)`` is the surplus of SAM steps so far;
    spreading it over the steps left makes the run end on its budget.
    """
    left = ops.maximum(ops.cast(total_steps, "float32") - ops.cast(step, "float32"), 1.0)
    return ops.clip(fraction - surplus / left, 0.0, 1.0)


def quantile_update(quantile, above, target, step_size):
    """One stochastic-approximation step towards the ``(1 - f)`` quantile.

    ``q ← q + η·(1[z ≥ q] - f)``: ``q`` rises while more than a share ``f`` of
    the observations lie above it and falls otherwise, so the long-run share
    above ``q`` is ``f`` whatever the distribution (Robbins–Monro).
    """
    return quantile + step_size * (ops.cast(above, "float32") - target)


# --------------------------------------------------------------------------
# LookSAM (Liu et al., 2022)
# --------------------------------------------------------------------------
def _dot(a, b):
    return ops.sum(
        ops.stack(
            [
                ops.sum(ops.cast(x, "float32") * ops.cast(y, "float32"))
                for x, y in zip(a, b)
            ]
        )
    )


def looksam_orthogonal(g_hat, g, per_tensor=False, eps=EPS):
    """``g_v = ĝ - (⟨ĝ, g⟩ / (‖g‖² + eps))·g``: the part of ĝ orthogonal to g.

    Global projection by default; ``per_tensor=True`` projects each weight
    tensor on its own, as public LookSAM ports do. Sparse gradients are
    densified: ``g_v`` is dense (it is kept as dense state between steps).
    """
    g_hat, g = [dense(t) for t in g_hat], [dense(t) for t in g]
    if per_tensor:
        return [
            gh - ops.cast(_dot([gh], [gg]) / (global_sq_norm([gg]) + eps), gg.dtype) * gg
            for gh, gg in zip(g_hat, g)
        ]
    coef = _dot(g_hat, g) / (global_sq_norm(g) + eps)
    return [gh - ops.cast(coef, gg.dtype) * gg for gh, gg in zip(g_hat, g)]


#: The age of ``g_v`` stops counting here (float32 counts every integer below 2**24).
AGE_CAP = float(2**24)


def looksam_age(age):
    """The age of ``g_v`` one step later (saturating at ``AGE_CAP``)."""
    return ops.minimum(age + 1.0, AGE_CAP)


def looksam_alpha(alpha, age, max_age):
    """The reuse weight on a step where ``g_v`` is ``age`` steps old: ``α`` up to
    ``max_age`` steps after the SAM step that formed it, 0 after (``None``: always ``α``)."""
    if max_age is None:
        return alpha
    # float32 like the norms it multiplies (Python numbers would take floatx)
    return ops.cast(ops.where(ops.cast(age, "float32") <= float(max_age), alpha, 0.0), "float32")


def looksam_reuse(g, g_v, alpha, per_tensor=False, eps=EPS):
    """``d = g + α·(‖g‖ / (‖g_v‖ + eps))·g_v``: an approximate SAM direction.

    Dense: ``g_v`` is, so a sparse ``g`` is densified.
    """
    g = [dense(t) for t in g]
    if per_tensor:
        return [
            gg + ops.cast(alpha * global_norm([gg]) / (global_norm([v]) + eps), gg.dtype) * v
            for gg, v in zip(g, g_v)
        ]
    scale = alpha * global_norm(g) / (global_norm(g_v) + eps)
    return [gg + ops.cast(scale, gg.dtype) * v for gg, v in zip(g, g_v)]


# --------------------------------------------------------------------------
# ESAM (Du et al., 2022a)
# --------------------------------------------------------------------------
def swp_perturbation(e, mask, beta):
    """Stochastic weight perturbation: keep tensor ``i`` of ``e`` where ``mask[i]``,
    scaled by ``1/β`` so the expected perturbation is unchanged; 0 elsewhere.

    An IndexedSlices stays one, its rows kept or zeroed."""
    return [
        map_values(lambda v, m=m: ops.where(m, v / ops.cast(beta, v.dtype), ops.zeros_like(v)), t)
        for t, m in zip(e, mask)
    ]


def sds_count(batch_size, gamma):
    """``⌈γ·|B|⌉`` (at least one): how many samples SDS keeps."""
    keep = ops.ceil(ops.cast(batch_size, "float32") * gamma)
    return ops.maximum(ops.cast(keep, "int32"), 1)


def sds_select(loss_before, loss_after, gamma):
    """Indices of the ``⌈γ·|B|⌉`` samples whose loss rose most under ``e``."""
    increase = ops.cast(loss_after, "float32") - ops.cast(loss_before, "float32")
    k = sds_count(ops.shape(increase)[0], gamma)
    order = ops.argsort(-increase)
    return order[:k]


# --------------------------------------------------------------------------
# Counter-based randomness
# --------------------------------------------------------------------------
#: Random-stream ids: one per consumer, so no two draw the same numbers.
STREAM_COIN = 1  # SS-SAM's and the scheduled coin's SAM-or-not draw
STREAM_SWP = 2  # ESAM's choice of perturbed weight tensors


def uniform_from_counter(shape, seed, stream, step):
    """U[0,1) draws that depend only on ``(seed, stream, step)``.

    Stateless on purpose: every replica draws the same numbers, and a run
    resumed at step ``t`` draws what the uninterrupted run drew at ``t``.
    (Keras has no stateless draw with a tensor seed, hence ``tf.random``.)
    """
    key = tf.stack(
        [
            tf.constant(int(seed) * 1_000_003 + int(stream), tf.int64),
            tf.cast(step, tf.int64),
        ]
    )
    return tf.random.stateless_uniform(shape, seed=key, alg="philox")


# --------------------------------------------------------------------------
# Expected SAM fraction under a normal model of ‖g‖² (Python numbers)
# --------------------------------------------------------------------------
def _phi(c):
    return math.exp(-0.5 * c * c) / math.sqrt(2.0 * math.pi)


def _upper_tail(c):
    return 0.5 * math.erfc(c / math.sqrt(2.0))


def expected_sam_fraction(lambda1, lambda2):
    """Mean of ``1 - Φ(c)`` as ``c`` runs linearly from λ2 down to λ1.

    This is the expected share of SAM steps if ``‖g‖²`` were exactly normal
    with the EMA's mean and variance: 0.5 for (-1, 1), ≈0.195 for (0, 2).
    """
    lambda1, lambda2 = float(lambda1), float(lambda2)
    if math.isclose(lambda1, lambda2):
        return _upper_tail(lambda1)

    def antiderivative(c):  # ∫(1-Φ(c))dc = c(1-Φ(c)) - φ(c)
        return c * _upper_tail(c) - _phi(c)

    return (antiderivative(lambda2) - antiderivative(lambda1)) / (lambda2 - lambda1)


def lambdas_for_sam_fraction(target, spread):
    """``(λ1, λ2)`` with ``λ2 - λ1 = spread`` whose expected SAM fraction is ``target``.

    The fraction decreases monotonically as the pair shifts up, so a bisection
    on the centre finds it to machine precision.
    """
    if not 0.0 < target < 1.0:
        raise ValueError(f"target_sam_fraction must be in (0, 1), got {target!r}.")
    lo, hi = -40.0, 40.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if expected_sam_fraction(mid - spread / 2, mid + spread / 2) > target:
            lo = mid
        else:
            hi = mid
    centre = 0.5 * (lo + hi)
    return centre - spread / 2, centre + spread / 2
