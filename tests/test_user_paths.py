"""Set-ups users reach for with a SAM policy: clipping, ASAM, a SAM budget, synchronized BatchNorm.

Comparisons with plain Keras under a never-SAM policy, optimizers, schedules and
callbacks are in tests/test_conformance.py; this file checks what only a SAM
step can show.
"""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from scipy import integrate, stats

import keras_aesam

LR = 0.1


def linear_net(d=5, units=2, seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((d,)), keras.layers.Dense(4), keras.layers.Dense(units)])


def regression_data(n=32, d=5, units=2, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype("float32")
    y = (x @ rng.normal(size=(d, units))).astype("float32")
    return x, y


def one_sam_step(clipnorm=None):
    """Weights before and after one SAM step of plain SGD on one batch."""
    x, y = regression_data()
    inner = linear_net()
    before = [w.copy() for w in inner.get_weights()]
    model = keras_aesam.wrap(inner, "sam", rho=0.5)
    model.compile(optimizer=keras.optimizers.SGD(LR, clipnorm=clipnorm), loss="mse")
    model.fit(x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0)
    return before, inner.get_weights()


def test_clipnorm_clips_each_variable_of_the_sam_direction():
    """Keras's clipnorm scales each variable's update to norm ≤ clipnorm
    separately; on a SAM step it applies to the final direction d = ∇L(w+e)."""
    w0, w_free = one_sam_step()
    d = [(a - b) / LR for a, b in zip(w0, w_free)]  # the unclipped direction, per variable
    norms = [float(np.linalg.norm(v)) for v in d]
    clip = float(np.median(norms))
    assert min(norms) < clip < max(norms)  # some variables clipped, some not
    w0_again, w_clipped = one_sam_step(clipnorm=clip)
    for a, b in zip(w0, w0_again):
        np.testing.assert_array_equal(a, b)
    # Each update is rounded to the float32 grid of w (|w| < 2 here: error
    # ≤ 2^-24·2 per weight) and recovered as a difference of two rounded
    # weights, for both runs: ≤ 4 such errors, 4.8e-7; atol 1e-6 holds that
    # with margin while a clipped update moves by ≥ 1e-3 less than a free one.
    atol = 1e-6
    assert max(float(np.max(np.abs(w))) for w in w0) < 2.0
    for w, free, clipped, norm in zip(w0, w_free, w_clipped, norms):
        expected = (free - w) * min(1.0, clip / norm)
        np.testing.assert_allclose(clipped - w, expected, rtol=0, atol=atol)
        if norm > clip:
            assert np.max(np.abs((clipped - w) - (free - w))) > 1e3 * atol


# --------------------------------------------------------------------------
# ASAM against NumPy
# --------------------------------------------------------------------------
def mse_grads(params, x, y):
    """Gradient of mean((x·W1 + b1)·W2 + b2 - y)² over all outputs, in float64."""
    w1, b1, w2, b2 = params
    h = x @ w1 + b1
    r = 2.0 * (h @ w2 + b2 - y) / y.size
    dh = r @ w2.T
    return [x.T @ dh, dh.sum(0), h.T @ r, r.sum(0)]


def asam_reference(params, x, y, rho, batch, epochs):
    """ASAM steps: e = ρ·|w|²⊙g / ‖|w|⊙g‖ over all weights, d = ∇L(w+e), w ← w - lr·d."""
    params = [p.astype(np.float64) for p in params]
    x, y = x.astype(np.float64), y.astype(np.float64)
    for _ in range(epochs):
        for start in range(0, len(x), batch):
            xb, yb = x[start:start + batch], y[start:start + batch]
            g = mse_grads(params, xb, yb)
            scaled_norm = np.sqrt(sum(np.sum((np.abs(p) * gi) ** 2) for p, gi in zip(params, g)))
            e = [rho * p * p * gi / scaled_norm for p, gi in zip(params, g)]
            d = mse_grads([p + ei for p, ei in zip(params, e)], xb, yb)
            params = [p - LR * di for p, di in zip(params, d)]
    return params


def test_asam_steps_match_a_numpy_reference():
    x, y = regression_data()
    inner = linear_net()
    # non-zero biases, so that |w| scales every variable's perturbation
    inner.set_weights([w + 0.1 for w in inner.get_weights()])
    start = inner.get_weights()
    model = keras_aesam.wrap(inner, "sam", rho=0.5, adaptive=True)
    model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    expected = asam_reference(start, x, y, rho=0.5, batch=8, epochs=2)
    # float32 against float64 over 8 steps: each gradient entry is a sum of ≤ 8
    # products per layer (relative rounding ≲ 8·6e-8 = 5e-7 per step), and
    # errors add over the 8 steps: ≲ 4e-6 of the weights' scale; 2e-5 leaves a
    # margin of 5 while the SAM-vs-ASAM difference checked below is ~1e-2.
    tol = 2e-5
    for got, want in zip(inner.get_weights(), expected):
        assert np.max(np.abs(got - want)) <= tol * np.max(np.abs(want)), (got, want)
    # plain SAM from the same start lands elsewhere: the check tells them apart
    inner_sam = linear_net()
    inner_sam.set_weights(start)
    sam = keras_aesam.wrap(inner_sam, "sam", rho=0.5)
    sam.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
    sam.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    assert max(np.max(np.abs(a - b)) for a, b in zip(inner_sam.get_weights(), expected)) > 100 * tol


# --------------------------------------------------------------------------
# A SAM budget through fit
# --------------------------------------------------------------------------
def classification_data(n=256, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype("float32")
    return x, np.abs(x[:, :3]).argmax(axis=1).astype("int32")


def fit_ae_sam(**hp):
    keras.utils.set_random_seed(0)
    inner = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu"),
                              keras.layers.Dense(3)])
    model = keras_aesam.wrap(inner, "ae_sam", **hp)
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = classification_data()
    history = model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)
    return model, inner.get_weights(), history.history


@pytest.mark.parametrize("target", [0.25, 0.75])
def test_target_sam_fraction_sets_the_lambdas_used_in_fit(target):
    model, weights, history = fit_ae_sam(target_sam_fraction=target)
    lambda1, lambda2 = model.policy.lambda1, model.policy.lambda2
    assert lambda2 - lambda1 == pytest.approx(2.0)
    # The expected SAM share under a normal ‖g‖², integrated independently:
    # the mean of 1 - Φ(c) as c runs over [λ1, λ2] (quad's error ~1e-14).
    mean_tail, _ = integrate.quad(lambda c: stats.norm.sf(c), lambda1, lambda2)
    assert mean_tail / (lambda2 - lambda1) == pytest.approx(target, abs=1e-9)
    assert model.get_config()["target_sam_fraction"] == target
    # fit decides with exactly those lambdas
    _, weights_explicit, history_explicit = fit_ae_sam(lambda1=lambda1, lambda2=lambda2)
    for a, b in zip(weights, weights_explicit):
        np.testing.assert_array_equal(a, b)
    assert history["sam_fraction"] == history_explicit["sam_fraction"]


def test_a_larger_target_takes_more_sam_steps_in_fit():
    low = fit_ae_sam(target_sam_fraction=0.1)[2]["sam_fraction"]
    high = fit_ae_sam(target_sam_fraction=0.9)[2]["sam_fraction"]
    assert sum(high) > sum(low)


# --------------------------------------------------------------------------
# BatchNormalization(synchronized=True) under several replicas
# --------------------------------------------------------------------------
_SYNC_BN_SCRIPT = textwrap.dedent("""
    import json, os
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras, keras_aesam

    x = np.random.default_rng(0).normal(size=(64, 6)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    out = {}
    cases = [("ae_sam", True, True), ("sam", True, True), ("erm", True, True),
             ("ae_sam", False, True), ("ae_sam", True, False)]
    for method, synchronized, fit_in_scope in cases:
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        with strategy.scope():
            inner = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8),
                                      keras.layers.BatchNormalization(synchronized=synchronized,
                                                                      name="bn"),
                                      keras.layers.Dense(2)])
            model = keras_aesam.wrap(inner, method)
            model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(
                from_logits=True))
        key = f"{method}/{synchronized}/{'in' if fit_in_scope else 'out of'} scope"
        try:
            if fit_in_scope:
                with strategy.scope():
                    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
            else:
                model.fit(x, y, batch_size=16, epochs=1, verbose=0)
            out[key] = "trained"
        except ValueError as error:
            out[key] = "refused: " + str(error)
        except Exception as error:
            out[key] = f"failed: {type(error).__name__}"
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def sync_bn_runs():
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, "-c", _SYNC_BN_SCRIPT], capture_output=True,
                          text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_synchronized_batchnorm_is_refused_under_several_replicas(sync_bn_runs):
    """Its cross-replica all-reduce cannot run inside the SAM branch's tf.cond;
    a policy that never takes SAM (erm) and per-replica BatchNorm train."""
    out = sync_bn_runs
    for key in ("ae_sam/True/in scope", "sam/True/in scope"):
        assert out[key].startswith("refused: "), out
        assert "synchronized=True" in out[key] and "'bn'" in out[key], out[key]
    assert out["erm/True/in scope"] == "trained", out
    assert out["ae_sam/False/in scope"] == "trained", out


def test_synchronized_batchnorm_is_refused_when_fit_runs_outside_the_scope(sync_bn_runs):
    assert sync_bn_runs["ae_sam/True/out of scope"].startswith("refused: "), sync_bn_runs
