"""What one training step executes, counted in its traced graph (no timing).

The fixed cost a policy adds to every step is ops, passes over the gradient
and conds whose predicate a GPU must copy to the host. These tests count them
(``benchmarks/_step_graph.py``) on a small MLP, so a change that adds work to
every step shows up here rather than only in a benchmark on a noisy machine.
"""

import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_aesam
from keras_aesam import policies

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import _step_graph  # noqa: E402

BATCH = (tf.zeros([16, 12]), tf.zeros([16], tf.int32))
NEVER = {"lambda1": 1e9, "lambda2": 1e9, "total_steps": 10}
ALWAYS = {"lambda1": -1e9, "lambda2": -1e9, "total_steps": 10}


def mlp():
    return keras.Sequential([
        keras.Input((12,)),
        keras.layers.Dense(16, activation="relu"),
        keras.layers.Dense(16, activation="relu"),
        keras.layers.Dense(4),
    ])


_graphs = {}


def step_graph(method=None, **hyperparameters):
    """The traced step of the MLP (wrapped with ``method``), built once per module."""
    key = (method, tuple(sorted(hyperparameters.items())))
    if key not in _graphs:
        inner = mlp()
        model = inner if method is None else keras_aesam.wrap(inner, method, **hyperparameters)
        model.compile(
            optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        _graphs[key] = (_step_graph.step_graph(model, BATCH), inner.count_params())
    return _graphs[key]


def counted(method=None, branches=(), **hyperparameters):
    graph, params = step_graph(method, **hyperparameters)
    return _step_graph.count(graph, branches), params


def traced_ops(fn):
    """Ops that do work in ``fn`` traced alone."""
    graph = tf.function(fn).get_concrete_function().graph
    return _step_graph.count(graph).ops


def test_a_step_without_sam_reads_its_gradient_once_for_norms():
    """‖g‖² is the one pass over the gradient a non-SAM step makes: its
    finiteness also vouches for d = g, which is not read again. ERM needs no
    norm: its one pass is the plain sum of g, finite exactly when g is."""
    erm, params = counted("erm", ["then"])
    never, _ = counted("ae_sam", ["else", "then"], **NEVER)
    plain, _ = counted()
    assert plain.squared_elements == 0
    assert erm.squared_elements == 0 and erm.summed_elements - plain.summed_elements == params
    assert never.squared_elements == params and never.summed_elements == plain.summed_elements


def test_a_sam_step_reads_its_gradients_twice_for_norms():
    """‖g‖² (the decision, whose root is also e = ρ·g/‖g‖'s norm) and ‖ĝ‖² (is d finite)."""
    always, params = counted("ae_sam", ["then", "then"], **ALWAYS)
    assert always.squared_elements == 2 * params


def test_msam_forms_w_plus_e_in_two_passes_over_the_weights():
    """Over ERM's step, Momentum-SAM's writes ``e = c·m`` and ``w + e`` (SGD's
    slot ``m = -v`` is not negated into a copy first: the sign goes into
    ``w - e(m)``) and reads ``m`` once more for ``‖m‖``; its one pass is ERM's."""
    erm, params = counted("erm", ["then"])
    msam, _ = counted("msam", ["then"])
    assert msam.elementwise_elements - erm.elementwise_elements == 2 * params
    assert msam.squared_elements - erm.squared_elements == params  # ‖m‖
    assert msam.summed_elements == erm.summed_elements  # g's finiteness, by its sum


@pytest.mark.parametrize("method, hyperparameters, predicates", [
    (None, {}, 0),  # plain fit: every kernel is issued without waiting
    ("erm", {}, 1),  # the finiteness guard around optimizer.apply
    ("ae_sam", NEVER, 2),  # use_sam, then the guard
    ("looksam", {}, 2),  # LookSAM's direction cond branches on use_sam too
])
def test_host_synchronisations_per_step(method, hyperparameters, predicates):
    count, _ = counted(method, [], **hyperparameters)
    assert count.predicates == predicates


def test_a_policy_that_never_fires_adds_only_its_own_work_over_erm():
    """Over ERM, an ERM step of AE-SAM executes the policy's decide, the
    commit of its state (read, select, assign per variable), the division
    that turns the summed sharpness into its mean, and ‖g‖² where ERM sums g:
    no more. The decide is traced on its own here, so the bound follows the
    TensorFlow in use."""
    erm, _ = counted("erm", ["then"])
    never, _ = counted("ae_sam", ["else", "then"], **NEVER)
    policy = policies.Adaptive(lambda1=1e9, lambda2=1e9)
    state = {k: tf.constant(v) for k, v in policy.state_spec().items()}
    decide = traced_ops(lambda: policy.decide(
        state, tf.constant(1.0), tf.constant(3, tf.int64), tf.constant(10, tf.int64)
    ))
    # ‖g‖² doubles each tensor's l2_loss where ERM's finiteness sum has no such op
    bound = decide + 3 * len(state) + 1 + len(mlp().weights)
    assert never.ops - erm.ops <= bound, (never.ops, erm.ops, decide)


def test_the_count_follows_the_branch_taken():
    """Sanity of the counter itself: a SAM step runs the second pass's ops."""
    never, _ = counted("ae_sam", ["else", "then"], **NEVER)
    sam, _ = counted("ae_sam", ["then", "then"], **NEVER)
    assert sam.ops > never.ops
    assert np.isclose(sam.conds, never.conds)
