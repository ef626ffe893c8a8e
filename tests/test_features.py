"""Gradient accumulation, perturbation filters and sharpness, against float64 NumPy.

The reference extends the one of ``test_reference.py`` (a linear model with the
mean squared error, plain SGD, unshuffled mini-batches) with the semantics the
README defines:

- accumulation over ``n`` micro-batches: each micro-batch is one policy step
  (its own ``‖g‖²``, EMA update, decision, ``e`` and direction ``d`` at the
  weights of its window; ``t`` and ``T`` count micro-batches); the weights move
  by the mean ``d`` every ``n`` micro-batches, the window running on across
  epochs;
- a perturbation filter: ``e`` only on the chosen weights, normalized over them;
  the policy's ``‖g‖²`` and LookSAM's projection still use the whole ``g``;
- ``sharpness``: ``L(w+e) − L(w)`` averaged over an epoch's SAM steps (0 when
  the epoch had none).

Multi-replica runs happen in a subprocess (tests/features_worker.py), since
logical devices must be set before TensorFlow starts.
"""

import json
import math
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_aesam
from keras_aesam import directions
from test_distribute import max_rel_diff
from test_model import compile_sgd, small_net, toy_data
from test_reference import EPS, LR, assert_close, loss_grad, make_data, sq_norm


# --------------------------------------------------------------------------
# The reference
# --------------------------------------------------------------------------
def mse(params, X, Y):
    w, b = params
    return float(np.mean((X @ w + b - Y) ** 2))


def decide(method, s, t, T, state, lambda1, lambda2, delta, k):
    """The policy of each method; ``state`` holds µ and σ² (updated in place)."""
    if method in ("ae_sam", "ae_looksam"):
        state["mu"] = delta * state["mu"] + (1 - delta) * s
        state["var"] = delta * state["var"] + (1 - delta) * (s - state["mu"]) ** 2
        frac = min(t / T, 1.0)
        c = frac * lambda1 + (1 - frac) * lambda2
        return s >= state["mu"] + c * math.sqrt(state["var"])
    if method == "looksam":
        return t % k == 0
    return method == "sam"


def reference(X, Y, params, method, epochs, batch, accumulation=1, mask=(True, True),
              rho=0.05, lambda1=-1.0, lambda2=1.0, delta=0.9, k=5, alpha=0.7, max_age=None):
    """Returns the final weights, and per epoch the SAM fraction and mean sharpness.

    ``max_age``: LookSAM reuses ``g_v`` on the ``max_age`` micro-batches after
    its SAM step only (``None``: until the next one)."""
    params = [p.astype(np.float64).copy() for p in params]
    X, Y = X.astype(np.float64), Y.astype(np.float64)
    state = {"mu": 0.0, "var": math.exp(-10.0)}
    t = 0
    T = epochs * math.ceil(len(X) / batch)
    g_v = [np.zeros_like(p) for p in params]
    age = 0
    total = [np.zeros_like(p) for p in params]
    pending = 0
    looks = method in ("looksam", "ae_looksam")
    fractions, sharpness = [], []
    for _ in range(epochs):
        decisions, rises = [], []
        for start in range(0, len(X), batch):
            xb, yb = X[start:start + batch], Y[start:start + batch]
            g = loss_grad(params, xb, yb)
            s = sq_norm(g)
            use_sam = decide(method, s, t, T, state, lambda1, lambda2, delta, k)
            if use_sam:
                chosen_norm = math.sqrt(sq_norm([gi for gi, m in zip(g, mask) if m]))
                e = [rho * gi / (chosen_norm + EPS) if m else 0.0 * gi for gi, m in zip(g, mask)]
                moved = [p + ei for p, ei in zip(params, e)]
                g_hat = loss_grad(moved, xb, yb)
                rises.append(mse(moved, xb, yb) - mse(params, xb, yb))
                if looks:
                    coef = sum(np.sum(a * b) for a, b in zip(g_hat, g)) / (s + EPS)
                    g_v = [a - coef * b for a, b in zip(g_hat, g)]
                    age = 0
                d = g_hat
            elif looks:
                age += 1
                weight = alpha if max_age is None or age <= max_age else 0.0
                scale = weight * math.sqrt(s) / (math.sqrt(sq_norm(g_v)) + EPS)
                d = [gi + scale * v for gi, v in zip(g, g_v)]
            else:
                d = g
            decisions.append(use_sam)
            total = [a + di for a, di in zip(total, d)]
            pending += 1
            if pending == accumulation:
                params = [p - LR * a / accumulation for p, a in zip(params, total)]
                total = [np.zeros_like(p) for p in params]
                pending = 0
            t += 1
        fractions.append(float(np.mean(decisions)))
        sharpness.append(float(np.mean(rises)) if rises else 0.0)
    return params, fractions, sharpness


def keras_fit(X, Y, w0, b0, method, epochs, batch, accumulation=None, **hp):
    inner = keras.Sequential([keras.Input((X.shape[1],)), keras.layers.Dense(1)])
    inner.set_weights([w0, b0])
    model = keras_aesam.wrap(inner, method=method, **hp)
    model.compile(
        optimizer=keras.optimizers.SGD(LR, gradient_accumulation_steps=accumulation),
        loss="mse",
    )
    history = model.fit(X, Y, batch_size=batch, epochs=epochs, shuffle=False, verbose=0)
    return inner.get_weights(), history.history, model


# Sharpness is a difference of two float32 losses of about 1-5 here; each is a
# 16-term mean of squares of 5-term dot products, so its rounding is a few
# float32 ulps relative (≲ 1e-6 · 5), i.e. ≲ 1e-5 for the difference; the
# weights agree to rtol 1e-5 (asserted), moving each loss by ≲ ‖∇L‖·‖Δw‖,
# which cancels to first order between L(w+e) and L(w). Hence 2e-5 absolute.
SHARPNESS_ATOL = 2e-5
AE_LOOKSAM = {"lambda1": 0.0, "lambda2": 2.0, "max_age": directions.DEFAULT_MAX_AGE}


# --------------------------------------------------------------------------
# Gradient accumulation
# --------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["sam", "ae_sam", "looksam", "ae_looksam"])
@pytest.mark.parametrize("accumulation", [2, 4])
def test_accumulation_matches_numpy_reference(method, accumulation):
    """6 micro-batches an epoch: windows of 4 run across epoch boundaries."""
    X, Y, w0, b0 = make_data()
    hp = AE_LOOKSAM if method == "ae_looksam" else {}
    weights, history, model = keras_fit(X, Y, w0, b0, method, 4, 16, accumulation, **hp)
    ref_weights, ref_fractions, ref_sharpness = reference(
        X, Y, [w0, b0], method, 4, 16, accumulation, **hp
    )
    assert_close(weights, ref_weights)
    assert history["sam_fraction"] == pytest.approx(ref_fractions, abs=1e-6)
    assert history["sharpness"] == pytest.approx(ref_sharpness, abs=SHARPNESS_ATOL)
    assert model.policy_state["step"] == 24  # t counts micro-batches
    if method.startswith("ae"):
        assert model.policy_state["total_steps"] == 24  # and so does the inferred T
    assert int(model.optimizer.iterations.numpy()) == 24 // accumulation


@pytest.mark.parametrize("method", ["sam", "ae_sam", "looksam"])
def test_reference_accumulation_changes_the_run(method):
    """The comparison above can fail: averaging over windows is not plain SGD."""
    X, Y, w0, b0 = make_data()
    plain, _, _ = reference(X, Y, [w0, b0], method, 4, 16, 1)
    accumulated, _, _ = reference(X, Y, [w0, b0], method, 4, 16, 4)
    assert np.max(np.abs(plain[0] - accumulated[0])) > 1e-3


def test_adaptive_policy_mixes_under_accumulation():
    X, Y, w0, b0 = make_data()
    _, fractions, _ = reference(X, Y, [w0, b0], "ae_sam", 4, 16, 2)
    assert 0.0 < np.mean(fractions) < 1.0


def test_a_skipped_micro_batch_adds_nothing_to_its_window():
    """Micro-batches 1, (non-finite) 2, 3 with n = 2: the window is 1 and 3."""
    X, Y, w0, b0 = make_data(n=48)
    bad = X.copy()
    bad[16, 0] = np.nan
    weights, history, model = keras_fit(bad, Y, w0, b0, "sam", 1, 16, 2)
    keep = np.r_[0:16, 32:48]
    clean, _, _ = keras_fit(X[keep], Y[keep], w0, b0, "sam", 1, 16, 2)
    assert history["skipped_steps"] == [1.0]
    assert int(model.optimizer.iterations.numpy()) == 1
    for a, b in zip(weights, clean):
        np.testing.assert_array_equal(a, b)


def test_accumulation_with_loss_scaling_trains():
    """mixed_float16 wraps the accumulating optimizer in a LossScaleOptimizer."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = keras_aesam.wrap(small_net(), method="ae_sam")
        model.compile(
            optimizer=keras.optimizers.SGD(0.05, gradient_accumulation_steps=2),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        x, y = toy_data()
        h = model.fit(x, y, epochs=2, batch_size=16, verbose=0).history
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert np.all(np.isfinite(h["loss"]))
    applied = model.policy_state["step"]
    assert applied + round(sum(h["skipped_steps"])) == 8
    assert int(model.optimizer.inner_optimizer.iterations.numpy()) == applied // 2


# --------------------------------------------------------------------------
# Perturbation filters
# --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "method, pattern, mask",
    [
        ("sam", "bias", (False, True)),
        ("sam", ["kernel$"], (True, False)),
        ("looksam", "/kernel", (True, False)),
        ("ae_sam", ["nomatch|bias", "kernel"], (True, True)),
    ],
)
def test_perturb_filter_matches_numpy_reference(method, pattern, mask):
    X, Y, w0, b0 = make_data(seed=3)
    weights, history, _ = keras_fit(X, Y, w0, b0, method, 3, 16, perturb_filter=pattern)
    ref_weights, ref_fractions, ref_sharpness = reference(X, Y, [w0, b0], method, 3, 16, mask=mask)
    assert_close(weights, ref_weights)
    assert history["sam_fraction"] == pytest.approx(ref_fractions, abs=1e-6)
    assert history["sharpness"] == pytest.approx(ref_sharpness, abs=SHARPNESS_ATOL)


def test_perturb_filter_with_accumulation_matches_numpy_reference():
    X, Y, w0, b0 = make_data(seed=4)
    weights, history, _ = keras_fit(
        X, Y, w0, b0, "ae_looksam", 4, 16, 3, perturb_filter="bias", **AE_LOOKSAM
    )
    ref_weights, ref_fractions, ref_sharpness = reference(
        X, Y, [w0, b0], "ae_looksam", 4, 16, 3, mask=(False, True), **AE_LOOKSAM
    )
    # With e on the bias only, ĝ − g is small and LookSAM's g_v = ĝ − proj_g ĝ
    # comes from a float32 cancellation, whose rounding (≈ 6e-8·‖ĝ‖) is then
    # rescaled to ‖g‖: errors are relative to the gradients' scale, the same
    # for every tensor, not to the small bias itself (≈ 0.04). So the 1e-5 is
    # relative to the largest weight of all tensors.
    scale = max(float(np.max(np.abs(r))) for r in ref_weights)
    for got, ref in zip(weights, ref_weights):
        assert np.max(np.abs(got - ref)) / scale < 1e-5
    assert history["sam_fraction"] == pytest.approx(ref_fractions, abs=1e-6)
    assert history["sharpness"] == pytest.approx(ref_sharpness, abs=SHARPNESS_ATOL)


def test_reference_filter_changes_the_run():
    X, Y, w0, b0 = make_data(seed=3)
    full, _, _ = reference(X, Y, [w0, b0], "sam", 3, 16)
    bias_only, _, _ = reference(X, Y, [w0, b0], "sam", 3, 16, mask=(False, True))
    assert np.max(np.abs(full[0] - bias_only[0])) > 1e-4


@pytest.mark.parametrize("method", sorted(keras_aesam.METHODS))
def test_every_method_and_wrap_take_a_filter_and_serialize_it(method):
    model = keras_aesam.wrap(small_net(), method=method, perturb_filter=["batch_normalization"])
    config = model.get_config()
    assert config["perturb_filter"] == ["batch_normalization"]
    again = keras_aesam.SharpnessAwareModel.from_config(config)
    assert again.perturb_filter == ["batch_normalization"]
    assert keras_aesam.wrap(small_net(), method=method).get_config()["perturb_filter"] is None


def test_filter_survives_save_and_load(tmp_path):
    model = compile_sgd(keras_aesam.wrap(small_net(), method="sam", perturb_filter="dense_1"))
    x, y = toy_data()
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert loaded.perturb_filter == "dense_1"
    loaded.fit(x, y, epochs=1, batch_size=16, verbose=0)


def test_normalization_only_sam_moves_only_normalization_weights_in_the_second_pass():
    """With only BatchNorm's gamma/beta perturbed, e is zero on every Dense weight."""
    model = keras_aesam.wrap(small_net(), method="sam", perturb_filter="batch_normalization")
    variables = model.trainable_variables
    mask = model._resolve_perturb_mask()
    assert [("batch_normalization" in v.path) for v in variables] == mask
    grads = [np.ones(v.shape, "float32") for v in variables]
    e = model._perturbation(grads, variables, 0)
    chosen = sum(float(np.sum(np.square(t))) for t, m in zip(e, mask) if m)
    assert chosen == pytest.approx(0.05**2, rel=1e-5)  # ‖e‖ = ρ over the chosen weights
    assert all(not np.any(np.asarray(t)) for t, m in zip(e, mask) if not m)


def test_a_pattern_matching_no_trainable_variable_is_an_error_naming_it():
    with pytest.raises(ValueError, match="'moving_mean'"):
        # BatchNorm's moving_mean exists but is not trainable
        keras_aesam.wrap(small_net(), method="sam", perturb_filter=["bias", "moving_mean"])
    with pytest.raises(ValueError, match="'typo'"):
        inputs = keras.Input((3,))
        keras_aesam.SAMModel(inputs, keras.layers.Dense(2)(inputs), perturb_filter="typo")


@pytest.mark.parametrize("bad", ["", [], ["("], 3, [None], ("bias", 1)])
def test_invalid_filters_are_refused_naming_the_parameter(bad):
    with pytest.raises(ValueError, match="perturb_filter"):
        keras_aesam.wrap(small_net(), method="sam", perturb_filter=bad)


def test_unbuilt_subclass_checks_its_filter_when_fit_starts():
    class Net(keras_aesam.SAMModel):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.body = keras.layers.Dense(3)

        def call(self, x, training=False):
            return self.body(x)

    model = compile_sgd(Net(perturb_filter="no_such_layer"))
    x, y = toy_data()
    with pytest.raises(ValueError, match="'no_such_layer'"):
        model.fit(x, y, epochs=1, batch_size=16, verbose=0)


# --------------------------------------------------------------------------
# The sharpness metric
# --------------------------------------------------------------------------
def test_sharpness_is_a_training_metric_only_for_methods_with_sam_steps():
    x, y = toy_data()
    sam = compile_sgd(keras_aesam.wrap(small_net(), method="ae_sam"))
    h = sam.fit(x, y, epochs=2, batch_size=16, verbose=0, validation_data=(x, y)).history
    assert len(h["sharpness"]) == 2 and "val_sharpness" not in h
    assert "sharpness" not in sam.evaluate(x, y, verbose=0, return_dict=True)
    never = compile_sgd(keras_aesam.wrap(small_net(), method="ae_sam", lambda1=1e9, lambda2=1e9))
    assert never.fit(x, y, epochs=1, batch_size=16, verbose=0).history["sharpness"] == [0.0]
    erm = compile_sgd(keras_aesam.wrap(small_net(), method="erm"))
    assert "sharpness" not in erm.fit(x, y, epochs=1, batch_size=16, verbose=0).history


def test_esam_sharpness_is_the_whole_batchs_loss_rise():
    """ESAM's second pass sees a subset; its sharpness is the full batch's mean
    per-sample rise, which for an unweighted MSE is L(w+e) − L(w) of SAM."""
    X, Y, w0, b0 = make_data(n=16)
    _, history, _ = keras_fit(X, Y, w0, b0, "esam", 1, 16, beta=1.0, gamma=0.5)
    _, _, ref_sharpness = reference(X, Y, [w0, b0], "sam", 1, 16)
    assert history["sharpness"] == pytest.approx(ref_sharpness, abs=SHARPNESS_ATOL)


# --------------------------------------------------------------------------
# measure_sharpness
# --------------------------------------------------------------------------
def reference_sharpness(params, X, Y, rho, group_size=None, mask=(True, True), batch=None):
    """Sample-weighted mean over groups of L(w + ρ g/‖g‖) − L(w)."""
    params = [p.astype(np.float64) for p in params]
    X, Y = X.astype(np.float64), Y.astype(np.float64)
    batch = batch or len(X)
    total = 0.0
    for b in range(0, len(X), batch):
        stop_b = min(b + batch, len(X))
        m = group_size or (stop_b - b)
        for start in range(b, stop_b, m):
            xs, ys = X[start:min(start + m, stop_b)], Y[start:min(start + m, stop_b)]
            g = loss_grad(params, xs, ys)
            norm = math.sqrt(sq_norm([gi for gi, keep in zip(g, mask) if keep]))
            moved = [p + (rho * gi / (norm + EPS) if keep else 0.0)
                     for p, gi, keep in zip(params, g, mask)]
            total += (mse(moved, xs, ys) - mse(params, xs, ys)) * len(xs)
    return total / len(X)


def linear_model(w0, b0):
    model = keras.Sequential([keras.Input((w0.shape[0],)), keras.layers.Dense(1)])
    model.set_weights([w0, b0])
    return model


@pytest.mark.parametrize(
    "kwargs, ref_kwargs",
    [
        ({}, {}),
        ({"group_size": 5}, {"group_size": 5}),  # 96 = 3 batches of 32: groups 5,5,…,2
        ({"group_size": 1}, {"group_size": 1}),
        ({"perturb_filter": "bias"}, {"mask": (False, True)}),
    ],
)
def test_measure_sharpness_matches_numpy(kwargs, ref_kwargs):
    X, Y, w0, b0 = make_data()
    model = linear_model(w0, b0)
    got = keras_aesam.measure_sharpness(model, X, Y, loss="mse", rho=0.1, batch_size=32, **kwargs)
    expected = reference_sharpness([w0, b0], X, Y, 0.1, batch=32, **ref_kwargs)
    assert got == pytest.approx(expected, abs=SHARPNESS_ATOL)
    assert got > 0.0


def test_m_sharpness_grows_as_groups_shrink():
    X, Y, w0, b0 = make_data()
    model = linear_model(w0, b0)
    by_group = [
        keras_aesam.measure_sharpness(model, X, Y, loss="mse", batch_size=32, group_size=m)
        for m in (1, 4, 32)
    ]
    assert by_group[0] > by_group[1] > by_group[2]


def test_measure_sharpness_moves_nothing_and_reads_a_dataset():
    import tensorflow as tf

    model = compile_sgd(keras_aesam.wrap(small_net(), method="ae_sam"))
    x, y = toy_data()
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    before = [w.copy() for w in model.get_weights()]  # weights, BN statistics, policy state
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    from_ds = keras_aesam.measure_sharpness(model, ds, training=True)
    from_arrays = keras_aesam.measure_sharpness(model, x, y, batch_size=16, training=True)
    for a, b in zip(model.get_weights(), before):
        np.testing.assert_array_equal(a, b)
    assert from_ds == pytest.approx(from_arrays, rel=1e-6)
    assert keras_aesam.measure_sharpness(model.inner, x, y, loss=model.loss, steps=1) > 0.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rho": 0.0}, "rho"),
        ({"group_size": 0}, "group_size"),
        ({"batch_size": 0}, "batch_size"),
        ({"perturb_filter": "nowhere"}, "'nowhere'"),
    ],
)
def test_measure_sharpness_bad_input(kwargs, match):
    X, Y, w0, b0 = make_data()
    with pytest.raises(ValueError, match=match):
        keras_aesam.measure_sharpness(linear_model(w0, b0), X, Y, loss="mse", **kwargs)


def test_measure_sharpness_needs_a_loss():
    X, Y, w0, b0 = make_data()
    with pytest.raises(ValueError, match="loss"):
        keras_aesam.measure_sharpness(linear_model(w0, b0), X, Y)


# --------------------------------------------------------------------------
# MirroredStrategy on 2 logical CPU devices
# --------------------------------------------------------------------------
WORKER = os.path.join(os.path.dirname(__file__), "features_worker.py")
TIMEOUT = 240


def run_worker(*args):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    try:
        done = subprocess.run([sys.executable, WORKER, *args], capture_output=True,
                              text=True, timeout=TIMEOUT, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"features worker {args} did not finish within {TIMEOUT} s (hang?)")
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "method, perturb_filter", [("sam", ""), ("ae_sam", "head"), ("ae_looksam", "")]
)
def test_accumulation_on_two_replicas_matches_one_device(method, perturb_filter):
    """2 micro-batches per update, each of 32 samples split over 2 replicas."""
    result = run_worker(method, perturb_filter)
    assert result["replicas"] == 2
    assert result["fractions"] == result["one_device_fractions"]
    assert result["iterations"] == result["one_device_iterations"] == 6
    # as in test_distribute.py: a float32 all-reduce sums in another order than
    # one device's batch reduction; over 12 steps of SGD with momentum that
    # stays well inside 1e-5 relative.
    assert max_rel_diff(result["weights"], result["one_device_weights"]) < 1e-5
    # the replicas' mean of shard sharpness is the global batch's (same e)
    np.testing.assert_allclose(result["sharpness"], result["one_device_sharpness"], atol=1e-5)


def test_accumulation_with_loss_scaling_on_two_replicas_is_refused_clearly():
    error = run_worker("loss_scaling")["error"]
    assert error is not None
    assert "gradient_accumulation_steps" in error and "mixed_float16" in error
