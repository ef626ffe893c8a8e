"""tf.distribute, mixed precision, XLA, clipping and accumulation.

Multi-replica runs happen in subprocesses (tests/distributed_worker.py): logical
devices and TF_CONFIG must be set before TensorFlow starts. Every subprocess is
bounded in time, and a hang fails the test with a message.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import keras
import keras_aesam

from test_model import compile_sgd, small_net, toy_data

WORKER = os.path.join(os.path.dirname(__file__), "distributed_worker.py")
TIMEOUT = 240


def run_worker(*args, env=None, timeout=TIMEOUT):
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}
    try:
        done = subprocess.run(
            [sys.executable, WORKER, *args], capture_output=True, text=True,
            timeout=timeout, env=full_env,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"distributed worker {args} did not finish within {timeout} s (hang?)")
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def max_rel_diff(a, b):
    return max(
        float(np.max(np.abs(np.array(x) - np.array(y))) / max(np.max(np.abs(np.array(y))), 1e-12))
        for x, y in zip(a, b)
    )


# --------------------------------------------------------------------------
# MirroredStrategy on 2 logical CPU devices
# --------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["sam", "ae_sam", "ae_looksam"])
def test_synced_perturbation_matches_one_device(method):
    result = run_worker("mirrored", method, "1")
    assert result["replicas"] == 2
    assert result["fractions"] == result["one_device_fractions"]
    assert max_rel_diff(result["weights"], result["one_device_weights"]) < 1e-5


@pytest.mark.parametrize(
    "method, sync",
    [("ss_sam", "1"), ("ae_sam", "0"), ("esam", "1")],
)
def test_every_replica_takes_the_same_branch(method, sync):
    result = run_worker("mirrored", method, sync, env={"KERAS_AESAM_TEST_BN": "1"})
    decisions = result["decisions"]
    assert len(decisions) == 12  # 3 epochs x 4 steps
    for step, per_replica in decisions.items():
        assert set(per_replica) == {"0", "1"}, step
        assert per_replica["0"] == per_replica["1"], f"replicas disagree at step {step}"


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


@pytest.mark.parametrize("method", ["ae_sam", "ae_looksam"])
def test_multi_worker_ends_identical(tmp_path, method):
    workers = [f"127.0.0.1:{p}" for p in free_ports(2)]
    procs, outs = [], []
    for index in range(2):
        out = tmp_path / f"worker{index}.json"
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        env = {**os.environ, "TF_CONFIG": json.dumps(tf_config), "TF_CPP_MIN_LOG_LEVEL": "3"}
        procs.append(subprocess.Popen(
            [sys.executable, WORKER, "worker", method, str(out)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))
        outs.append(out)
    try:
        for proc in procs:
            proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        pytest.fail(f"multi-worker training did not finish within {TIMEOUT} s (hang?)")
    for proc in procs:
        assert proc.returncode == 0, proc.stderr.read()[-3000:]
    a, b = (json.loads(o.read_text()) for o in outs)
    assert a["fractions"] == b["fractions"]
    assert a["state"] == b["state"] and a["state"]["step"] == 12
    for x, y in zip(a["weights"], b["weights"]):
        np.testing.assert_array_equal(np.array(x), np.array(y))


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
    for name, a, b in zip(names, after, weights):
        if "moving_" in name:
            continue  # the forward pass of the bad batch moves BN statistics, as in Keras
        np.testing.assert_array_equal(a, b, err_msg=name)
    assert float(model.optimizer.dynamic_scale.numpy()) == scale / 2  # the loss scale adapts
    assert model.policy_state["step"] == steps_before
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)  # and training goes on
    assert model.policy_state["step"] > steps_before


# --------------------------------------------------------------------------
# XLA, clipping, accumulation
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
    for a, r in zip(inner.get_weights(), expected):
        np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-7)


def test_sync_perturbation_is_harmless_on_one_device():
    x, y = toy_data()
    init = small_net().get_weights()
    out = []
    for sync in (True, False):
        inner = small_net()
        inner.set_weights(init)
        model = compile_sgd(keras_aesam.wrap(inner, method="ae_sam", sync_perturbation=sync))
        h = model.fit(x, y, epochs=2, batch_size=16, verbose=0, shuffle=False).history
        out.append((h["sam_fraction"], inner.get_weights()))
    assert out[0][0] == out[1][0]
    for a, b in zip(out[0][1], out[1][1]):
        np.testing.assert_array_equal(a, b)


def test_building_outside_the_strategy_scope_gives_keras_error():
    """Keras refuses a model built outside the scope it is fitted in; so do we,
    with the same error and without hanging."""
    errors = run_worker("outside_scope")
    assert errors["keras"] is not None
    assert errors["keras_aesam"] == errors["keras"]
