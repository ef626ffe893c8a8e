"""The traced training step, counted: what one step executes, by construction.

``train_step`` is traced once with ``tf.function``; each ``tf.cond`` in it is an
``If``/``StatelessIf`` op whose two branches are functions of the graph, and a
step runs the top-level ops plus one branch of each cond. Given which branch
each cond takes (``branches``, in the order the conds were traced), this
counts, over the ops a step executes:

- ``ops``: the ops that do work (``Const``, ``NoOp``, ``Placeholder`` and
  ``Identity`` left out; Grappler may prune a few more before running);
- ``squared``: the elements that square-and-sum reductions (``Square``,
  ``L2Loss``) read, over the number of trainable parameters: the passes over
  the gradient that norms cost, the only policy work that grows with the model
  (scalars left out);
- ``summed_elements``: the elements that plain ``Sum`` reductions of tensors of
  rank ≥ 1 read: a step whose policy needs no norm checks that ``g`` is finite
  by its sum (``ops.global_sum``); the loss's and the metrics' sums over the
  batch are counted too, so compared with plain ``fit``'s count;
- ``elementwise_elements``: the elements that elementwise arithmetic
  (``Neg``, ``Mul``, ``AddV2``, ``Sub``, ``RealDiv``) writes in tensors of rank
  ≥ 1: passes over the weights (forming ``e``, ``w + e``) and over activations
  alike, so compared between two steps whose passes are the same;
- ``predicates``: the distinct tensors the taken conds branch on. Each is a
  device-to-host copy on a GPU (a ``Switch`` reads its predicate in host
  memory), which the host waits for before it can issue the branch's kernels.

Calls of other functions (``StatefulPartitionedCall``, e.g. a pass compiled
with XLA) are counted through. Used by ``step_time.py --graph`` and the tests.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

NOT_WORK = frozenset({"Const", "NoOp", "Placeholder", "Identity"})
SQUARE_REDUCTIONS = frozenset({"Square", "L2Loss"})
SUM = "Sum"
ELEMENTWISE = frozenset({"Neg", "Mul", "AddV2", "Sub", "RealDiv"})
CONDS = frozenset({"If", "StatelessIf"})
CALLS = frozenset({"StatefulPartitionedCall", "PartitionedCall"})


@dataclasses.dataclass
class StepCount:
    ops: int = 0
    squared_elements: int = 0
    summed_elements: int = 0
    elementwise_elements: int = 0
    predicates: int = 0
    conds: int = 0


def step_graph(model, batch):
    """The graph of ``model.train_step`` traced on ``batch``'s shapes (compiled model)."""
    spec = tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape, t.dtype), batch)
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    return tf.function(model.train_step).get_concrete_function(spec).graph


def count(graph, branches=(), default="then") -> StepCount:
    """What a step executes when its top-level conds take ``branches``
    (``"then"``/``"else"`` each, in trace order; conds nested in a branch, and
    top-level ones past the list, take ``default``)."""
    library = {}
    total = StepCount()
    taken = list(branches)

    def visit(g, top_level, predicates):
        library.update(g._functions)
        for op in g.get_operations():
            if op.type in CONDS:
                choice = taken.pop(0) if top_level and taken else default
                predicates.add(op.inputs[0].name if top_level else (id(g), op.inputs[0].name))
                total.conds += 1
                visit(library[op.get_attr(f"{choice}_branch").name].graph, False, predicates)
            elif op.type in CALLS:
                visit(library[op.get_attr("f").name].graph, False, predicates)
            elif op.type not in NOT_WORK:
                total.ops += 1
                shape = op.inputs[0].shape if op.inputs else None
                if op.type in SQUARE_REDUCTIONS and shape.rank:  # scalars are no pass
                    total.squared_elements += int(np.prod(shape)) if shape.is_fully_defined() else 0
                if (op.type == SUM and shape.rank and shape.is_fully_defined()
                        and op.inputs[0].op.type != "Pack"):  # a stack of per-tensor scalars is no pass
                    total.summed_elements += int(np.prod(shape))
                out = op.outputs[0].shape if op.outputs else None
                if op.type in ELEMENTWISE and out.rank and out.is_fully_defined():
                    total.elementwise_elements += int(np.prod(out))

    predicates = set()
    visit(graph, True, predicates)
    total.predicates = len(predicates)
    return total


def count_step(graph, sam_step: bool) -> StepCount:
    """``count`` for a SAM step or a step without SAM, of a step built as
    ``train_step`` builds it: its last top-level cond is the finiteness guard
    around ``optimizer.apply`` (taken), every one before it branches on
    ``use_sam`` (the SAM branch, LookSAM's direction). Plain ``fit`` has none."""
    conds = sum(op.type in CONDS for op in graph.get_operations())
    first = "then" if sam_step else "else"
    return count(graph, [first] * max(conds - 1, 0) + ["then"] * min(conds, 1))
