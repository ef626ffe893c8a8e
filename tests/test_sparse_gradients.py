"""Sparse gradients: an ``Embedding`` model trains as its dense twin, for every method.

An embedding lookup's gradient is a ``tf.IndexedSlices`` whose repeated indices
add up. The twin computes the same function with a dense one-hot product
(``one_hot(tokens) @ E``), whose gradient is the dense tensor: both models start
from the same weights and train on batches where tokens repeat, so any rule that
read the slices' rows as if they were the dense tensor (a norm, a projection, a
scaling) would make them part.
"""

import contextlib
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_aesam

VOCAB, DIM, LENGTH, CLASSES, BATCH, STEPS = 11, 4, 6, 3, 8, 8
LR = 0.1

# Tolerance of "the Embedding model trains as its one-hot twin" (float64 runs).
# The two gradients are equal as real numbers; in float64 they differ only in
# the order of additions (the one-hot matmul's sums against the slices' scatter),
# ≈2^-53 relative. What is computed in float32 is ‖g‖² (ops.global_sq_norm
# casts to float32): the two models sum the same float32 squares in different
# orders (a tree over the dense table against one over the merged rows), so
# ‖g‖ differs by at most n·2^-24 relative for n ≤ VOCAB·DIM + 20 = 64 terms,
# i.e. ≤ 4e-6 (worst case; a few ulps, 1e-7, in practice). e = ρ·g/‖g‖ inherits
# that relative error: |Δe| ≤ ρ·4e-6 = 2e-7 (ρ = 0.05). The second gradient is
# Lipschitz in e with a constant L = O(1) for this softmax model on unit-scale
# embeddings (the logits' Hessian is bounded by 1/2 times the squared input
# scale), so each step moves the weights by ≤ lr·L·|Δe| ≈ 2e-8 apart, and 8
# steps of plain SGD add these up: 1.6e-7. Rounding the policy's float32
# statistics the same way cannot flip a decision except on a tie. ERM agrees to
# 1e-17. The rules this guards against are four orders of magnitude further:
# counting a repeated token's rows as a² + b² moves e by O(ρ) of its length
# and the weights by ≈1e-5 after 8 steps; a LookSAM projection on the wrong
# norm, by O(lr·α·|g|) ≈ 1e-2.
ATOL = 1.6e-7

METHOD_CASES = [(m, {}) for m in sorted(keras_aesam.METHODS)] + [
    ("sam", {"adaptive": True}),
    ("looksam", {"per_tensor": True}),
]


@keras.saving.register_keras_serializable(package="keras_aesam_tests")
class OneHotLookup(keras.layers.Layer):
    """``one_hot(tokens) @ E``: an Embedding with a dense gradient."""

    def __init__(self, input_dim, output_dim, **kwargs):
        super().__init__(**kwargs)
        self.input_dim, self.output_dim = input_dim, output_dim

    def build(self, input_shape):
        self.embeddings = self.add_weight(
            name="embeddings", shape=(self.input_dim, self.output_dim),
            initializer="uniform",
        )

    def call(self, tokens):
        one_hot = keras.ops.one_hot(keras.ops.cast(tokens, "int32"), self.input_dim,
                                    dtype=self.compute_dtype)
        return keras.ops.matmul(one_hot, keras.ops.cast(self.embeddings, self.compute_dtype))

    def get_config(self):
        return {**super().get_config(), "input_dim": self.input_dim, "output_dim": self.output_dim}


def text_net(lookup):
    """tokens → lookup → mean over the sequence → softmax classifier."""
    tokens = keras.Input((LENGTH,), dtype="int32")
    layer = (
        keras.layers.Embedding(VOCAB, DIM, name="lookup") if lookup == "embedding"
        else OneHotLookup(VOCAB, DIM, name="lookup")
    )
    h = keras.layers.GlobalAveragePooling1D()(layer(tokens))
    h = keras.layers.Dense(5, activation="tanh")(h)
    out = keras.layers.Dense(CLASSES, activation="softmax")(h)
    return keras.Model(tokens, out)


def token_batches(seed=0, steps=STEPS):
    """Tokens from a small vocabulary: every batch repeats tokens, within a
    sequence and across sequences."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, VOCAB // 2 + 1, size=(BATCH * steps, LENGTH)).astype("int32")
    y = rng.integers(0, CLASSES, size=(BATCH * steps,))
    return x, y


def twins(method, hyperparameters, strategy=None, jit_compile=False, optimizer=None):
    """The Embedding model and its one-hot twin, same weights, compiled alike
    (SGD at ``LR`` with the ``optimizer`` keyword arguments)."""
    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    with scope:
        keras.utils.set_random_seed(0)
        nets = {kind: text_net(kind) for kind in ("embedding", "one_hot")}
        nets["one_hot"].set_weights(nets["embedding"].get_weights())
        models = {}
        for kind, net in nets.items():
            model = keras_aesam.wrap(net, method=method, total_steps=STEPS, **hyperparameters)
            model.compile(
                optimizer=keras.optimizers.SGD(LR, **(optimizer or {})),
                loss="sparse_categorical_crossentropy",
                jit_compile=jit_compile,
            )
            models[kind] = model
    return models


def train_twins(method, hyperparameters, **kwargs):
    """Both twins after ``STEPS`` steps, and their common initial weights."""
    x, y = token_batches()
    models = twins(method, hyperparameters, **kwargs)
    initial = models["embedding"].inner.get_weights()
    for model in models.values():
        model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    return models, initial


def max_gap(a, b):
    return max(float(np.max(np.abs(u - v))) for u, v in zip(a, b))


@pytest.fixture
def float64():
    keras.config.set_floatx("float64")
    yield
    keras.config.set_floatx("float32")


#: Optimizer options a method needs (Momentum-SAM perturbs along the momentum).
OPTIMIZER_FOR = {"msam": {"momentum": 0.9}}


@pytest.mark.parametrize(("method", "hyperparameters"), METHOD_CASES)
def test_embedding_model_trains_as_its_dense_twin(float64, method, hyperparameters):
    models, initial = train_twins(method, hyperparameters, optimizer=OPTIMIZER_FOR.get(method))
    sparse, dense = models["embedding"], models["one_hot"]
    assert sparse.inner.get_layer("lookup").embeddings.dtype == "float64"
    assert max_gap(sparse.inner.get_weights(), initial) > 1e-3  # they did train
    gap = max_gap(sparse.inner.get_weights(), dense.inner.get_weights())
    print(f"{method} {hyperparameters}: {gap:.3g}")
    assert gap < ATOL
    # the policy saw the same ‖g‖² (AE-SAM's moments, the quantile …)
    s_state, d_state = sparse.policy_state, dense.policy_state
    assert s_state.keys() == d_state.keys()
    for key in s_state:
        assert s_state[key] == pytest.approx(d_state[key], rel=1e-5, abs=1e-12), key


@pytest.mark.parametrize(
    ("method", "optimizer"),
    [
        # Keras clips an IndexedSlices by the norm of its rows; d reaches the
        # optimizer with each row once, so that is the dense norm (with the
        # rows as the tape gives them both clips end 7e-4 from the dense twin)
        ("sam", {"global_clipnorm": 0.05}),
        ("ss_sam", {"clipnorm": 0.01}),
        ("ae_sam", {"gradient_accumulation_steps": 2}),
        ("esam", {"momentum": 0.9}),
    ],
)
def test_optimizer_options_see_the_dense_gradient(float64, method, optimizer):
    models, initial = train_twins(method, {}, optimizer=optimizer)
    sparse, dense = models["embedding"], models["one_hot"]
    assert max_gap(sparse.inner.get_weights(), initial) > 1e-4
    assert max_gap(sparse.inner.get_weights(), dense.inner.get_weights()) < ATOL


def test_jit_compiled_passes_return_sparse_gradients(float64):
    models, initial = train_twins("looksam", {}, jit_compile=True)
    sparse, dense = models["embedding"], models["one_hot"]
    assert max_gap(sparse.inner.get_weights(), initial) > 1e-3
    assert max_gap(sparse.inner.get_weights(), dense.inner.get_weights()) < ATOL


@pytest.mark.parametrize("adaptive", [False, True])
def test_measured_sharpness_of_an_embedding_model_is_its_dense_twins(float64, adaptive):
    """keras_aesam.measure_sharpness perturbs along the sparse gradient too.
    No training, one float32 norm: equal to float32's rounding of e (2^-24)."""
    x, y = token_batches(steps=2)
    models = twins("sam", {})
    values = [
        keras_aesam.measure_sharpness(models[kind], x, y, rho=0.5, adaptive=adaptive,
                                      batch_size=BATCH)
        for kind in ("embedding", "one_hot")
    ]
    assert values[0] > 1e-4
    assert values[0] == pytest.approx(values[1], rel=1e-6)


@pytest.fixture
def mixed_float16():
    keras.mixed_precision.set_global_policy("mixed_float16")
    yield
    keras.mixed_precision.set_global_policy("float32")


def test_mixed_float16_unscales_sparse_gradients(mixed_float16):
    """Under loss scaling the sparse rows are unscaled like the dense gradient.

    The twins' float16 forward passes round differently (a gather against a
    one-hot product), by a few units of float16's u = 2^-11 per step relative
    to the step, so after 8 steps they are ≤ 10·u of the weights' movement
    apart (measured 0.4·u) and AE-SAM's EMA of ‖g‖² within 10·u too. An
    unscaling mistake is a factor of the loss scale (2^15) off.
    """
    models, initial = train_twins("ae_sam", {})
    sparse, dense = models["embedding"], models["one_hot"]
    assert isinstance(sparse.optimizer, keras.optimizers.LossScaleOptimizer)
    u = 2.0**-11
    moved = max_gap(sparse.inner.get_weights(), initial)
    assert moved > 1e-3
    assert max_gap(sparse.inner.get_weights(), dense.inner.get_weights()) < 10 * u * moved
    s_mean, d_mean = sparse.policy_state["ema_mean"], dense.policy_state["ema_mean"]
    assert s_mean == pytest.approx(d_mean, rel=10 * u)
    assert int(sparse.applied_steps.numpy()) == STEPS  # no step skipped for overflow


# --------------------------------------------------------------------------
# MirroredStrategy on 2 logical CPUs: the all-reduce of sparse gradients
# --------------------------------------------------------------------------
MIRRORED_CASES = {  # name: (method, hyperparameters, optimizer options)
    "sam": ("sam", {}, {}),
    "looksam": ("looksam", {}, {}),
    # e from each replica's own gradient, and accumulation per replica into
    # dense accumulators (distribution.apply_each_replica)
    "sam_per_replica_accumulated": (
        "sam", {"sync_perturbation": False}, {"gradient_accumulation_steps": 2}
    ),
}


def mirrored_worker(cases):
    """Each case's twins on 2 logical CPUs; the weight gaps as one JSON line
    (run as a subprocess: logical devices must be set before TensorFlow starts)."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
    )
    keras.config.set_floatx("float64")
    out = {}
    for case in cases:
        method, hyperparameters, optimizer = MIRRORED_CASES[case]
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        models, initial = train_twins(method, hyperparameters, strategy=strategy, optimizer=optimizer)
        weights = models["embedding"].inner.get_weights()
        out[case] = {
            "replicas": strategy.num_replicas_in_sync,
            "moved": max_gap(weights, initial),
            "to_one_hot": max_gap(weights, models["one_hot"].inner.get_weights()),
        }
    print(json.dumps(out))


@pytest.fixture(scope="module")
def mirrored_runs():
    from test_distribute import TIMEOUT, communicate_all

    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.Popen(
        [sys.executable, __file__, "mirrored", *MIRRORED_CASES], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    ((code, stdout, stderr),) = communicate_all([proc], TIMEOUT, "the mirrored worker hung")
    assert code == 0, stderr[-3000:]
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", sorted(MIRRORED_CASES))
def test_embedding_model_on_two_replicas_trains_as_its_dense_twin(mirrored_runs, case):
    """The replicas' sparse gradients are all-gathered (an index may then repeat
    across replicas); the step still equals the dense twin's under the same
    strategy (whose all-reduce is dense; that it matches one device is
    tests/test_distribute.py's). Same derivation as ATOL: the replicas add
    float64 summation-order differences (≈1e-16) and, per replica, the float32
    rounding of ‖g‖ (measured 8.5e-11 with per-replica e)."""
    result = mirrored_runs[case]
    assert result["replicas"] == 2
    assert result["moved"] > 1e-3
    assert result["to_one_hot"] < ATOL


if __name__ == "__main__" and sys.argv[1:2] == ["mirrored"]:
    mirrored_worker(sys.argv[2:])
