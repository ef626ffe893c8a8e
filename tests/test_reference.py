"""The model against an independent NumPy (float64) implementation of Algorithm 1.

The reference below is written from ``docs/algorithms.md`` and calls nothing from the
package: a linear model ``ŷ = Xw + b`` with the mean squared error (plus an
optional L2 penalty and per-sample weights, as Keras defines them), trained with
plain SGD over several epochs of unshuffled mini-batches.
"""

import math

import keras
import numpy as np
import pytest

import keras_aesam
from keras_aesam import directions

EPS = 1e-12
LR = 0.05


# --------------------------------------------------------------------------
# The reference
# --------------------------------------------------------------------------
def loss_grad(params, X, Y, sw=None, l2=0.0):
    """Gradient of ``Σ_i sw_i (x_i·w + b - y_i)² / B + l2·‖w‖²`` (Keras's reduction)."""
    w, b = params
    sw = np.ones(len(X)) if sw is None else sw
    r = (X @ w + b - Y) * sw[:, None]
    gw = 2.0 * X.T @ r / len(X) + 2.0 * l2 * w
    gb = 2.0 * r.sum(axis=0) / len(X)
    return [gw, gb]


def sq_norm(ts):
    return float(sum(np.sum(t * t) for t in ts))


def reference_run(X, Y, params, method, epochs, batch, rho=0.05, lambda1=-1.0,
                  lambda2=1.0, delta=0.9, total_steps=None, k=5, alpha=0.7,
                  sw=None, l2=0.0, max_age=None):
    """Algorithm 1 (AE-SAM / AE-LookSAM) and its special cases, step by step.

    ``max_age``: ``g_v`` is reused on the ``max_age`` steps after the SAM step
    that formed it, then ERM steps (``None``: reused without bound).
    """
    params = [p.astype(np.float64).copy() for p in params]
    X, Y = X.astype(np.float64), Y.astype(np.float64)
    mu, var, t = 0.0, math.exp(-10.0), 0
    g_v = [np.zeros_like(p) for p in params]
    age = 0
    fractions = []
    steps_per_epoch = math.ceil(len(X) / batch)
    T = total_steps or epochs * steps_per_epoch
    for _ in range(epochs):
        sam_steps = 0
        for start in range(0, len(X), batch):
            sl = slice(start, start + batch)
            swb = None if sw is None else sw[sl]
            g = loss_grad(params, X[sl], Y[sl], swb, l2)
            s = sq_norm(g)
            if method in ("ae_sam", "ae_looksam"):
                mu = delta * mu + (1 - delta) * s
                var = delta * var + (1 - delta) * (s - mu) ** 2
                frac = min(t / T, 1.0)
                c = frac * lambda1 + (1 - frac) * lambda2
                use_sam = s >= mu + c * math.sqrt(var)
            elif method == "sam":
                use_sam = True
            elif method == "looksam":
                use_sam = t % k == 0
            else:
                use_sam = False
            looks = method in ("looksam", "ae_looksam")
            if use_sam:
                norm = math.sqrt(s)
                perturbed = [p + rho * gi / (norm + EPS) for p, gi in zip(params, g)]
                g_hat = loss_grad(perturbed, X[sl], Y[sl], swb, l2)
                if looks:
                    coef = sum(np.sum(a * b) for a, b in zip(g_hat, g)) / (s + EPS)
                    g_v = [a - coef * b for a, b in zip(g_hat, g)]
                    age = 0
                d = g_hat
                sam_steps += 1
            elif looks:
                age += 1
                weight = alpha if max_age is None or age <= max_age else 0.0
                scale = weight * math.sqrt(s) / (math.sqrt(sq_norm(g_v)) + EPS)
                d = [gi + scale * v for gi, v in zip(g, g_v)]
            else:
                d = g
            params = [p - LR * di for p, di in zip(params, d)]
            t += 1
        fractions.append(sam_steps / steps_per_epoch)
    return params, fractions


# --------------------------------------------------------------------------
# The same run through Keras
# --------------------------------------------------------------------------
def make_data(n=96, d=5, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)).astype("float32")
    w_true = rng.normal(size=(d, 1))
    Y = (X @ w_true + 0.5 * rng.normal(size=(n, 1))).astype("float32")
    w0 = (0.1 * rng.normal(size=(d, 1))).astype("float32")
    b0 = np.zeros((1,), "float32")
    return X, Y, w0, b0


def keras_run(X, Y, w0, b0, method, epochs, batch, sw=None, l2=0.0, **hp):
    reg = keras.regularizers.L2(l2) if l2 else None
    inner = keras.Sequential(
        [keras.Input((X.shape[1],)), keras.layers.Dense(1, kernel_regularizer=reg)]
    )
    inner.set_weights([w0, b0])
    model = keras_aesam.wrap(inner, method=method, **hp)
    model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
    history = model.fit(
        X, Y, sample_weight=sw, batch_size=batch, epochs=epochs, shuffle=False, verbose=0
    )
    return inner.get_weights(), history.history["sam_fraction"], model


def assert_close(actual, expected, rtol=1e-5):
    for a, e in zip(actual, expected):
        scale = max(np.max(np.abs(e)), 1e-8)
        assert np.max(np.abs(a - e)) / scale < rtol, (a, e)


METHODS = ["erm", "sam", "ae_sam", "looksam", "ae_looksam"]


@pytest.mark.parametrize("method", METHODS)
def test_matches_numpy_reference_over_epochs(method):
    X, Y, w0, b0 = make_data()
    weights, fractions, _ = keras_run(X, Y, w0, b0, method, epochs=4, batch=16)
    ref_weights, ref_fractions = reference_run(
        X, Y, [w0, b0], method, epochs=4, batch=16,
        **({"lambda1": 0.0, "lambda2": 2.0, "max_age": directions.DEFAULT_MAX_AGE} if method == "ae_looksam" else {}),
    )
    assert_close(weights, ref_weights)
    assert fractions == pytest.approx(ref_fractions, abs=1e-6)
    if method.startswith("ae"):
        # the adaptive policy really mixes: neither all SAM nor all ERM
        assert 0.0 < np.mean(ref_fractions) < 1.0


@pytest.mark.parametrize(
    "method, hp",
    [("ae_looksam", {"lambda1": 0.0, "lambda2": 2.0}), ("looksam", {"k": 5})],
)
@pytest.mark.parametrize("max_age", [1, 2, None])
def test_looksam_bound_on_the_age_of_g_v_matches_the_reference(method, hp, max_age):
    """The reuse window: g_v on the max_age steps after its SAM step, then ERM steps."""
    X, Y, w0, b0 = make_data(seed=4)
    weights, fractions, model = keras_run(X, Y, w0, b0, method, epochs=4, batch=16,
                                          max_age=max_age, **hp)
    ref_weights, ref_fractions = reference_run(X, Y, [w0, b0], method, epochs=4, batch=16,
                                               max_age=max_age, **hp)
    # float32 rounding (2**-24 relative) of steps that mix every weight, over 24 steps:
    # well under 1e-5 of the largest weight; the small bias is held to that scale too
    scale = max(np.max(np.abs(w)) for w in ref_weights)
    for a, e in zip(weights, ref_weights):
        assert np.max(np.abs(a - e)) / scale < 1e-5, (a, e)
    assert fractions == pytest.approx(ref_fractions, abs=1e-6)
    assert model.direction.max_age == max_age
    if max_age is not None:
        # the bound changes the run (ages beyond max_age occur here), so this test can fail
        unbounded, _ = reference_run(X, Y, [w0, b0], method, epochs=4, batch=16, **hp)
        assert np.max(np.abs(unbounded[0] - ref_weights[0])) > 1e-4


def test_ae_sam_with_sample_weights_and_l2_regularizer():
    """sample_weight and regularization losses reach both passes."""
    X, Y, w0, b0 = make_data(seed=1)
    sw = np.random.default_rng(3).uniform(0.0, 2.0, size=len(X)).astype("float32")
    weights, fractions, _ = keras_run(X, Y, w0, b0, "ae_sam", epochs=3, batch=16, sw=sw, l2=0.01)
    ref_weights, ref_fractions = reference_run(
        X, Y, [w0, b0], "ae_sam", epochs=3, batch=16, sw=sw, l2=0.01
    )
    assert_close(weights, ref_weights)
    assert fractions == pytest.approx(ref_fractions, abs=1e-6)


def test_sam_with_sample_weights_differs_from_unweighted():
    """A check that the weighted reference above is sensitive to the weights."""
    X, Y, w0, b0 = make_data(seed=1)
    sw = np.random.default_rng(3).uniform(0.0, 2.0, size=len(X))
    weighted, _ = reference_run(X, Y, [w0, b0], "sam", epochs=2, batch=16, sw=sw)
    plain, _ = reference_run(X, Y, [w0, b0], "sam", epochs=2, batch=16)
    assert np.max(np.abs(weighted[0] - plain[0])) > 1e-3


def test_explicit_total_steps_and_training_past_it():
    """With T shorter than the run, c stays at lambda1 after step T."""
    X, Y, w0, b0 = make_data(seed=2)
    weights, fractions, model = keras_run(
        X, Y, w0, b0, "ae_sam", epochs=4, batch=16, total_steps=7
    )
    ref_weights, ref_fractions = reference_run(
        X, Y, [w0, b0], "ae_sam", epochs=4, batch=16, total_steps=7
    )
    assert_close(weights, ref_weights)
    assert fractions == pytest.approx(ref_fractions, abs=1e-6)
    assert model.policy_state["step"] == 24


# --------------------------------------------------------------------------
# Momentum-SAM (Becker et al., 2024) with SGD-momentum and Adam
# --------------------------------------------------------------------------
def msam_reference_torch_form(X, Y, params, epochs, batch, rho, lr, mu):
    """The authors' form: ``v ← µv + g(w̃)``, ``w ← w - lr·v``, ``w̃ = w - ρ·v/‖v‖``."""
    w = [p.astype(np.float64).copy() for p in params]
    v = [np.zeros_like(p) for p in w]
    for _ in range(epochs):
        for start in range(0, len(X), batch):
            sl = slice(start, start + batch)
            scale = rho / (math.sqrt(sq_norm(v)) + EPS)
            g = loss_grad([p - scale * b for p, b in zip(w, v)], X[sl], Y[sl])
            v = [mu * b + gi for b, gi in zip(v, g)]
            w = [p - lr * b for p, b in zip(w, v)]
    return w


def msam_reference_keras_form(X, Y, params, epochs, batch, rho, lrs, mu=0.9,
                              optimizer="sgd", beta2=0.999, adam_eps=1e-7):
    """Keras's SGD (``m ← µm - lr_t·g``, ``e = +ρ·m/‖m‖``) or Adam (first moment
    ``m ← β1·m + (1-β1)·g``, ``e = -ρ·m/‖m‖``), the gradient taken at ``w + e``."""
    w = [p.astype(np.float64).copy() for p in params]
    m = [np.zeros_like(p) for p in w]
    s = [np.zeros_like(p) for p in w]
    t = 0
    for _ in range(epochs):
        for start in range(0, len(X), batch):
            sl = slice(start, start + batch)
            sign = 1.0 if optimizer == "sgd" else -1.0
            scale = sign * rho / (math.sqrt(sq_norm(m)) + EPS)
            g = loss_grad([p + scale * b for p, b in zip(w, m)], X[sl], Y[sl])
            lr = lrs(t)
            t += 1
            if optimizer == "sgd":
                m = [mu * b - lr * gi for b, gi in zip(m, g)]
                w = [p + b for p, b in zip(w, m)]
            else:
                m = [b + (gi - b) * (1 - mu) for b, gi in zip(m, g)]
                s = [c + (gi * gi - c) * (1 - beta2) for c, gi in zip(s, g)]
                alpha = lr * math.sqrt(1 - beta2**t) / (1 - mu**t)
                w = [p - alpha * b / (np.sqrt(c) + adam_eps) for p, b, c in zip(w, m, s)]
    return w


def test_msam_keras_form_is_the_authors_form_at_a_constant_learning_rate():
    """docs/algorithms.md's mapping: with ``m = -lr·v``, ``w - ρ·v/‖v‖ = w + ρ·m/‖m‖``."""
    X, Y, w0, b0 = make_data(seed=4)
    torch_form = msam_reference_torch_form(X, Y, [w0, b0], 3, 16, rho=0.3, lr=LR, mu=0.9)
    keras_form = msam_reference_keras_form(X, Y, [w0, b0], 3, 16, rho=0.3, lrs=lambda t: LR)
    # the same arithmetic in another order: float64 round-off (2e-16 a rounding,
    # amplified over 18 steps) stays orders of magnitude below 1e-10
    assert_close(keras_form, torch_form, rtol=1e-10)
    plain = msam_reference_torch_form(X, Y, [w0, b0], 3, 16, rho=1e-9, lr=LR, mu=0.9)
    assert np.max(np.abs(torch_form[0] - plain[0])) > 1e-3  # ρ matters at this scale


def _msam_keras_run(X, Y, w0, b0, optimizer, epochs, batch, rho):
    inner = keras.Sequential([keras.Input((X.shape[1],)), keras.layers.Dense(1)])
    inner.set_weights([w0, b0])
    model = keras_aesam.wrap(inner, method="msam", rho=rho)
    model.compile(optimizer=optimizer, loss="mse")
    model.fit(X, Y, batch_size=batch, epochs=epochs, shuffle=False, verbose=0)
    return inner.get_weights()


@pytest.mark.parametrize("kind", ["sgd", "sgd_schedule", "adam"])
def test_msam_matches_numpy_reference(kind):
    """Four epochs of 6 steps; the float32 run stays within 1e-5 (relative) of the
    float64 reference, as every other method's does."""
    X, Y, w0, b0 = make_data(seed=5)
    if kind == "adam":
        lrs, optimizer = (lambda t: 0.01), keras.optimizers.Adam(0.01)
    elif kind == "sgd_schedule":
        schedule = keras.optimizers.schedules.CosineDecay(LR, 24)
        lrs = lambda t: 0.5 * LR * (1 + math.cos(math.pi * min(t, 24) / 24))
        optimizer = keras.optimizers.SGD(schedule, momentum=0.9)
    else:
        lrs, optimizer = (lambda t: LR), keras.optimizers.SGD(LR, momentum=0.9)
    weights = _msam_keras_run(X, Y, w0, b0, optimizer, 4, 16, rho=0.3)
    ref = msam_reference_keras_form(
        X, Y, [w0, b0], 4, 16, rho=0.3, lrs=lrs, optimizer="adam" if kind == "adam" else "sgd"
    )
    assert_close(weights, ref)
    # and it is not plain momentum SGD/Adam: the perturbation moved the trajectory
    plain = msam_reference_keras_form(
        X, Y, [w0, b0], 4, 16, rho=1e-12, lrs=lrs, optimizer="adam" if kind == "adam" else "sgd"
    )
    assert np.max(np.abs(ref[0] - plain[0])) / np.max(np.abs(ref[0])) > 1e-3
