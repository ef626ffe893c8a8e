"""tf.distribute, mixed precision, XLA and clipping.

Multi-replica runs happen in subprocesses (tests/distributed_worker.py): logical
devices and TF_CONFIG must be set before TensorFlow starts. Each subprocess
trains several models (one TensorFlow start-up for all), is bounded in time,
and a hang fails the test with a message.
"""

import json
import os
import socket
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

import distributed_worker as dw
import keras_aesam
from test_model import compile_sgd, small_net, toy_data

WORKER = os.path.join(os.path.dirname(__file__), "distributed_worker.py")
TIMEOUT = 420
ALL_METHODS = sorted(keras_aesam.METHODS)
# ESAM's sample selection ranks each replica's shard on its own (documented),
# so only ESAM is not expected to match one device on the global batch.
SYNCED_METHODS = [m for m in ALL_METHODS if m != "esam"]
STEPS = dw.EPOCHS * dw.STEPS_PER_EPOCH

# Tolerance of "the 2-replica run equals the one-device run" (float64 runs).
# The two runs evaluate the same real-number function and differ only in the
# order of additions: one device sums 32 per-sample gradients, each replica
# sums 16 and the all-reduce adds the two halves. Two summation orders of n
# terms differ by at most 2·γ(n-1)·Σ|terms|, γ(k) = k·u/(1-k·u), u = 2^-53
# (float64): 2·31·2^-53 ≈ 6.9e-15 of the per-sample gradients' scale G per
# step. SGD (lr 0.1, momentum 0.9) moves the weights by lr/(1-0.9) = 1× a
# gradient error, summed over the 12 steps: ≤ 12 · 6.9e-15 · G ≈ 8.3e-14·G,
# G = O(1) here (cross-entropy, unit-scale inputs and weights). Feedback through
# later steps and LookSAM's orthogonal part ĝ - (⟨ĝ,g⟩/‖g‖²)·g (a difference of
# near-equal vectors) amplify it; a 10^3 allowance for both gives 1e-10 (10^5
# above the ≈1e-15 measured). A wrong step (a missing 1/replicas, a per-replica
# perturbation or g_v) is O(lr·g) ≈ 1e-2 off: eight orders of magnitude apart.
SYNCED_RTOL = 1e-10


def worker_command(*args):
    return [sys.executable, WORKER, *args]


def worker_env(**extra):
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **extra}


def start_worker(*args, **env):
    return subprocess.Popen(
        worker_command(*args), env=worker_env(**env),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def communicate_all(procs, timeout, hang):
    """``[(returncode, stdout, stderr)]`` of processes running side by side, all ended within
    ``timeout`` seconds; otherwise every one is killed and the test fails with ``hang``."""
    deadline = time.monotonic() + timeout
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=max(deadline - time.monotonic(), 1.0)))
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        pytest.fail(hang)
    return [(proc.returncode, out, err) for proc, (out, err) in zip(procs, outputs)]


def finish_workers(procs, timeout=TIMEOUT):
    """Wait for every process (bounded: a hang fails the test); their JSON results."""
    outputs = communicate_all(procs, timeout, f"distributed workers did not finish within {timeout} s (hang?)")
    results = []
    for returncode, stdout, stderr in outputs:
        assert returncode == 0, stderr[-3000:]
        results.append(json.loads(stdout.strip().splitlines()[-1]) if stdout.strip() else None)
    return results


def run_worker(*args, **env):
    return finish_workers([start_worker(*args, **env)])[0]


def max_rel_diff(a, b):
    """Largest |a - b| of each tensor relative to that tensor's largest |b|."""
    return max(
        float(np.max(np.abs(np.array(x) - np.array(y))) / max(np.max(np.abs(np.array(y))), 1e-12))
        for x, y in zip(a, b)
    )


# --------------------------------------------------------------------------
# MirroredStrategy on 2 logical CPU devices (one process for all methods)
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synced_runs():
    return run_worker("mirrored", "1", *SYNCED_METHODS, **{dw.FLOATX_ENV: "float64"})


@pytest.mark.parametrize("method", SYNCED_METHODS)
def test_synced_perturbation_matches_one_device(synced_runs, method):
    """sync_perturbation=True on 2 replicas trains like one device on the global batch."""
    result = synced_runs[method]
    assert result["replicas"] == 2
    assert result["fractions"] == result["one_device_fractions"]
    assert max_rel_diff(result["weights"], result["one_device_weights"]) < SYNCED_RTOL


@pytest.fixture(scope="module")
def unsynced_runs():
    return run_worker("mirrored", "0", *ALL_METHODS, **{dw.BN_ENV: "1"})


@pytest.mark.parametrize("method", ALL_METHODS)
def test_every_replica_takes_the_same_branch(unsynced_runs, method):
    """With sync_perturbation=False and per-replica BatchNorm the replicas'
    gradients differ; the branch each replica actually ran (recorded where the
    SAM branch forms its perturbation) is still the same at every step."""
    result = unsynced_runs[method]
    branches = result["sam_branches"]
    for step, replicas in branches.items():
        assert replicas == [0, 1], f"at step {step} only replicas {replicas} took the SAM branch"
    model = keras_aesam.wrap(dw.net(), method=method)
    policy = model.policy
    # MSAM forms its e (from the momentum) before every step's only pass
    perturbed = STEPS if model.direction.perturbs_before_pass else round(
        sum(result["fractions"]) * dw.STEPS_PER_EPOCH)
    assert len(branches) == perturbed
    if not (policy.always_sam or policy.never_sam) and policy.name in ("adaptive", "bernoulli", "periodic"):
        assert 0 < len(branches) < STEPS  # both kinds of step: a disagreement could show


# --------------------------------------------------------------------------
# Several models in one process
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sequences():
    """Every method one after another in one process, in two orders (in
    parallel), each round under one shared strategy and under a fresh one per model."""
    orders = {"forward": ALL_METHODS, "backward": ALL_METHODS[::-1]}
    results = finish_workers([start_worker("sequence", *order) for order in orders.values()])
    return dict(zip(orders, results))


@pytest.mark.parametrize("order", ["forward", "backward"])
@pytest.mark.parametrize("strategy", ["shared", "fresh"])
def test_models_train_one_after_another_in_one_process(sequences, order, strategy):
    """No model fails for what was trained before it (a plain Keras model
    before and after included), and each ends exactly as in every other round."""
    runs = sequences[order][strategy]
    errors = {name: run for name, run in runs.items() if isinstance(run, str)}
    assert not errors
    methods = ALL_METHODS if order == "forward" else ALL_METHODS[::-1]
    assert list(runs) == ["plain_first", *methods, "plain_last"]
    reference = sequences["forward"]["shared"]
    for name, weights in runs.items():
        name_ref = "plain_first" if name == "plain_last" else name
        for a, b in zip(weights, reference[name_ref]):
            np.testing.assert_array_equal(np.array(a), np.array(b), err_msg=name)


# --------------------------------------------------------------------------
# MultiWorkerMirroredStrategy: 2 processes on 127.0.0.1
# --------------------------------------------------------------------------
def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


MULTI_WORKER_METHODS = ["ae_sam", "ae_looksam"]


@pytest.fixture
def float64():
    keras.config.set_floatx("float64")
    yield
    keras.config.set_floatx("float32")


def test_two_workers_match_one_device(tmp_path, float64):
    """Two worker processes (sync_perturbation=True, float64) end like one device
    trained on the same global batches (each worker gets half of every batch)."""
    workers = [f"127.0.0.1:{p}" for p in free_ports(2)]
    procs, outs = [], []
    for index in range(2):
        out = tmp_path / f"worker{index}.json"
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        procs.append(start_worker(
            "worker", str(out), *MULTI_WORKER_METHODS,
            TF_CONFIG=json.dumps(tf_config), **{dw.FLOATX_ENV: "float64"},
        ))
        outs.append(out)
    finish_workers(procs)
    a, b = (json.loads(o.read_text()) for o in outs)
    for method in MULTI_WORKER_METHODS:
        fractions, weights, model = dw.train(tf.distribute.OneDeviceStrategy("/cpu:0"), method, True)
        for result in (a[method], b[method]):
            assert result["fractions"] == fractions, method
            assert result["state"]["step"] == STEPS
            assert result["state"] == pytest.approx(model.policy_state, rel=SYNCED_RTOL)
            assert max_rel_diff(result["weights"], weights) < SYNCED_RTOL, method


# --------------------------------------------------------------------------
# Mixed precision
# --------------------------------------------------------------------------
@pytest.fixture
def mixed_policy(request):
    keras.mixed_precision.set_global_policy(request.param)
    yield request.param
    keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("mixed_policy", ["mixed_float16", "mixed_bfloat16"], indirect=True)
@pytest.mark.parametrize("method", ["sam", "ae_sam", "ae_looksam", "esam"])
def test_mixed_precision_trains(mixed_policy, method):
    model = compile_sgd(keras_aesam.wrap(small_net(), method=method))
    if mixed_policy == "mixed_float16":
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    x, y = toy_data()
    h = model.fit(x, y, epochs=2, batch_size=16, verbose=0).history
    assert np.all(np.isfinite(h["loss"]))
    # float16's first steps may overflow while the loss scale settles: skipped, not counted
    assert model.policy_state["step"] + round(sum(h["skipped_steps"])) == 8
    assert model.policy_state["step"] >= 6


class FirstStepLogs(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if batch == 0:
            self.logs = {k: float(v) for k, v in logs.items()}


def first_step_statistics(policy_name):
    """``‖g‖²``, µ and σ after AE-SAM's first step, from fixed initial weights."""
    keras.mixed_precision.set_global_policy(policy_name)
    try:
        inner = small_net(batchnorm=False)
        inner.set_weights(small_net(batchnorm=False, seed=0).get_weights())
        rng = np.random.default_rng(0)
        inner.set_weights([rng.normal(0.0, 0.5, size=w.shape).astype("float32") for w in inner.get_weights()])
        model = compile_sgd(keras_aesam.wrap(inner, method="ae_sam"))
        record = FirstStepLogs()
        x, y = toy_data(n=16)
        model.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[record])
        return {k: record.logs[k] for k in ("grad_norm_sq", "ema_mean", "ema_std", "skipped_steps")}
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_mixed_float16_statistics_come_from_unscaled_gradients():
    """Under loss scaling (2^15 at the start) a scaled ‖g‖² would be 2^30 times
    too large; the float16 run's first-step ‖g‖², µ and σ match float32's.

    Tolerance: float16 has u = 2^-11 ≈ 4.9e-4. A gradient entry here is a sum
    over the batch of 16 of products through dot products of at most 8 terms:
    ≤ 16 + 8 = 24 float16 roundings, so ≤ 24·u ≈ 1.2e-2 relative; ‖g‖² at most
    twice that, and µ = 0.1·‖g‖², σ ≈ 0.27·‖g‖² at the first step alike:
    rel = 2.5e-2 (measured: 2e-4).
    """
    full = first_step_statistics("float32")
    half = first_step_statistics("mixed_float16")
    assert half["skipped_steps"] == 0.0
    for key in ("grad_norm_sq", "ema_mean", "ema_std"):
        assert half[key] == pytest.approx(full[key], rel=2.5e-2), key


@pytest.mark.parametrize("mixed_policy", ["mixed_float16"], indirect=True)
@pytest.mark.parametrize("method", ["ae_sam", "ae_looksam"])
def test_overflow_step_is_skipped_entirely(mixed_policy, method):
    model = compile_sgd(keras_aesam.wrap(small_net(), method=method, total_steps=100))
    x, y = toy_data(n=64)
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    steps_before = model.policy_state["step"]
    weights = [w.copy() for w in model.get_weights()]  # weights, BN stats, µ, σ², step, g_v
    scale = float(model.optimizer.dynamic_scale.numpy())
    bad = x[:16].copy()
    bad[0, 0] = np.inf
    h = model.fit(bad, y[:16], epochs=1, batch_size=16, verbose=0).history
    assert h["skipped_steps"] == [1.0] and h["sam_fraction"] == [0.0]
    after = model.get_weights()
    names = [w.path for w in model.weights]
    assert any("moving_" in name for name in names)
    for name, a, b in zip(names, after, weights):  # BatchNorm's moving statistics included
        np.testing.assert_array_equal(a, b, err_msg=name)
    assert np.all(np.isfinite(model.predict(x, verbose=0)))
    assert float(model.optimizer.dynamic_scale.numpy()) == scale / 2  # the loss scale adapts
    assert model.policy_state["step"] == steps_before
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)  # and training goes on
    assert model.policy_state["step"] > steps_before


# --------------------------------------------------------------------------
# XLA, clipping
# --------------------------------------------------------------------------
@pytest.mark.parametrize("method", sorted(keras_aesam.METHODS))
def test_every_method_trains_with_jit_compile(method):
    model = compile_sgd(keras_aesam.wrap(small_net(), method=method), jit_compile=True)
    x, y = toy_data(n=32)
    h = model.fit(x, y, epochs=1, batch_size=16, verbose=0).history
    assert np.isfinite(h["loss"][0]) and model.policy_state["step"] == 2


def test_global_clipnorm_applies_to_the_final_direction_only():
    """SAM's e uses the unclipped g; the optimizer clips ĝ. Checked on one step."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 3)).astype("float32")
    y = (10 * rng.normal(size=(16, 1))).astype("float32")
    w0, b0 = rng.normal(size=(3, 1)).astype("float32"), np.zeros(1, "float32")
    inner = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    inner.set_weights([w0, b0])
    model = keras_aesam.wrap(inner, method="sam", rho=0.5)
    model.compile(optimizer=keras.optimizers.SGD(0.1, global_clipnorm=0.01), loss="mse")
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)

    def grad(w, b):
        r = x @ w + b - y
        return [2 * x.T @ r / 16, 2 * r.sum(0) / 16]

    g = grad(w0.astype(float), b0.astype(float))
    norm = np.sqrt(sum(np.sum(t**2) for t in g))
    e = [0.5 * t / norm for t in g]
    g_hat = grad(w0 + e[0], b0 + e[1])
    hat_norm = np.sqrt(sum(np.sum(t**2) for t in g_hat))
    expected = [w0 - 0.1 * g_hat[0] * 0.01 / hat_norm, b0 - 0.1 * g_hat[1] * 0.01 / hat_norm]
    # float32 step against float64: the weights carry their own rounding
    # (u = 2^-24 ≈ 6e-8 relative) plus the step's, lr·0.01 = 1e-3 times the
    # clipped direction's ≤ ~30u relative error (sums over 16 samples and 3
    # inputs, two norms): ≈ 6e-8 relative in all; rtol 1e-5 leaves 100×, while
    # an unclipped or wrongly clipped step is off by ≥ 1e-3.
    for a, r in zip(inner.get_weights(), expected):
        np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-7)


def test_building_outside_the_strategy_scope_gives_keras_error():
    """Keras refuses a model built outside the scope it is fitted in; so do we,
    with the same error and without hanging."""
    errors = run_worker("outside_scope")
    assert errors["keras"] is not None
    assert errors["keras_aesam"] == errors["keras"]
