"""Distribution and loss-scale helpers for the sharpness-aware step.

Replica context and all-reduce, the guarded optimizer apply (``apply_if``)
that works in replica or cross-replica context and with gradient
accumulation, the bookkeeping that keeps collective keys of successive
strategies apart, and the unscaling of gradients by a dynamic loss scale.
"""

import keras
import tensorflow as tf
from keras import ops

from keras_aesam import _keras_compat as compat, ops as sam_ops


def loss_scale(optimizer):
    """The dynamic loss scale of a ``LossScaleOptimizer``, else ``None``."""
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return optimizer.dynamic_scale
    return None


def gradient_units(optimizer):
    """What ``optimizer.scale_loss`` multiplies the loss by, so gradients come out
    that many times too large: a ``LossScaleOptimizer``'s dynamic scale, else the
    optimizer's ``loss_scale_factor``; ``None`` when neither is set."""
    scale = loss_scale(optimizer)
    if scale is not None:
        return scale
    return getattr(optimizer, "loss_scale_factor", None)


def replica_context():
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return None
    return ctx


def multi_worker():
    """Whether the current strategy is a MultiWorkerMirroredStrategy across workers."""
    strategy = tf.distribute.get_strategy()
    extended = getattr(strategy, "extended", None)
    in_multi_worker = getattr(extended, "_in_multi_worker_mode", None)
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and bool(
        in_multi_worker and in_multi_worker()
    )


# TensorFlow keeps, for the life of the process, the tensor shape of every
# collective instance it has run, by (group key, instance key). Every
# MirroredStrategy names its device group 1 and hands out instance keys from
# 100 on, one per all-reduce per step, so a model trained under a second
# strategy reuses the first one's keys: when the two models' all-reduces
# differ in shape or order (a plain Dense(2) model then a Dense(3) one already
# does), the step fails with "Shape mismatch in the collective instance".
# Before each fit/evaluate/predict, a sharpness-aware model moves its
# strategy's counters past every key handed out under a strategy it claimed
# before, in a range (from 2**30) that a fresh strategy's counters never reach.
_FIRST_CLAIMED_INSTANCE_KEY = 1 << 30
_claimed_key_groups = []  # {device: next instance key} of each claimed group


def collective_keys_of(strategy):
    """The ``CollectiveKeys`` a (single-worker) MirroredStrategy draws from."""
    if not isinstance(strategy, tf.distribute.MirroredStrategy):
        return []
    extended = strategy.extended
    owners = [extended, getattr(extended, "_collective_ops", None),
              getattr(extended, "_cross_device_ops", None)]
    found = []
    for owner in owners:
        keys = getattr(owner, "_collective_keys", None)
        if keys is not None and hasattr(keys, "_instance_key_table") and all(
            keys is not k for k in found
        ):
            found.append(keys)
    return found


def claim_fresh_collective_keys(strategy):
    """Make ``strategy``'s next instance keys unused in this process (see above)."""
    for keys in collective_keys_of(strategy):
        with keys._lock:
            used = [n for group in _claimed_key_groups for n in group.values()]
            for group in keys._instance_key_table.values():
                start = max([_FIRST_CLAIMED_INSTANCE_KEY, *used, *group.values()])
                for device in group:
                    group[device] = start
                if all(group is not g for g in _claimed_key_groups):
                    _claimed_key_groups.append(group)


def all_reduce_sum(tensors):
    """The replicas' sum of each tensor. An IndexedSlices is all-gathered (its
    rows concatenated, so an index may repeat across replicas): still the sum."""
    ctx = replica_context()
    if ctx is None:
        return tensors
    return ctx.all_reduce(tf.distribute.ReduceOp.SUM, tensors)


def apply_if(condition, optimizer, grads, variables):
    """``optimizer.apply(grads)`` when ``condition``; nothing (not even momentum) otherwise.

    Under a strategy that merges (MirroredStrategy) the cond must run in
    cross-replica context, since ``apply`` merges across replicas there (the
    pattern of Keras's loss scaling); collective strategies apply in place.
    """
    ctx = replica_context()
    if ctx is None or tf.__internal__.distribute.strategy_supports_no_merge_call():
        tf.cond(
            condition,
            lambda: applied(optimizer, grads, variables),
            lambda: tf.constant(False),
        )
        return

    def cross_replica(distribution, grads, condition):
        first = distribution.experimental_local_results(condition)[0]

        def apply_fn():
            apply_each_replica(distribution, optimizer, grads, variables)
            return tf.constant(True)

        tf.cond(first, apply_fn, lambda: tf.constant(False))

    ctx.merge_call(cross_replica, args=(grads, condition))


def apply_each_replica(distribution, optimizer, grads, variables):
    """``optimizer.apply`` on every replica, called in cross-replica context.

    With ``gradient_accumulation_steps`` Keras's ``apply`` puts a ``cond``
    around calls that merge across replicas, which MirroredStrategy cannot run
    in replica context (plain ``keras.Model`` fails there too). So the cond
    "is this micro-batch the last of its window?" is taken here, and each
    branch runs per replica: add ``d`` to the optimizer's own accumulators, or
    apply their mean through Keras's ``apply`` with accumulation off for that
    call and reset them. Same arithmetic as Keras's, same variables.
    """
    steps = optimizer.gradient_accumulation_steps
    if not steps:
        distribution.extended.call_for_each_replica(optimizer.apply, args=(grads, variables))
        return
    is_last = tf.equal((compat.optimizer_iterations(optimizer) + 1) % steps, 0)

    def window_sum(grads):  # dense, like the accumulators (sparse rows scattered in)
        unscaled = unscaled_by_factor(optimizer, grads)
        accumulated = compat.accumulated_gradients(optimizer)
        return sam_ops.add_lists(
            [accumulated[compat.variable_index(optimizer, v)].value for v in variables], unscaled
        )

    def apply_mean(grads):
        mean = [t / steps for t in window_sum(grads)]
        if optimizer.loss_scale_factor is not None:  # apply() divides by it again
            mean = [t * optimizer.loss_scale_factor for t in mean]
        optimizer.gradient_accumulation_steps = None
        try:
            optimizer.apply(mean, variables)
        finally:
            optimizer.gradient_accumulation_steps = steps

    def accumulate(grads):
        total = window_sum(grads)
        for acc, t in zip(compat.accumulated_gradients(optimizer), reordered(optimizer, total, variables)):
            acc.assign(t)
        compat.optimizer_iterations(optimizer).assign_add(1)

    def last():
        distribution.extended.call_for_each_replica(apply_mean, args=(grads,))
        for acc in compat.accumulated_gradients(optimizer):
            distribution.extended.update(
                acc.value, lambda a: a.assign(tf.zeros_like(a)), group=False
            )
        return tf.constant(True)

    def not_last():
        distribution.extended.call_for_each_replica(accumulate, args=(grads,))
        return tf.constant(False)

    tf.cond(is_last, last, not_last)


def unscaled_by_factor(optimizer, grads):
    factor = optimizer.loss_scale_factor
    return grads if factor is None else [sam_ops.map_values(lambda v: v / factor, g) for g in grads]


def reordered(optimizer, tensors, variables):
    """``tensors`` (one per variable) in the order of the optimizer's accumulators."""
    by_index = {compat.variable_index(optimizer, v): t for t, v in zip(tensors, variables)}
    return [by_index[i] for i in range(len(compat.accumulated_gradients(optimizer)))]


def applied(optimizer, grads, variables):
    optimizer.apply(grads, variables)
    return tf.constant(True)


def unscaler(scale):
    """``grads -> grads / scale`` (identity without loss scaling); sparse stays sparse."""
    if scale is None:
        return lambda gs: gs
    return lambda gs: [sam_ops.map_values(lambda v: v / ops.cast(scale, v.dtype), g) for g in gs]


def rescaled(tensors, scale):
    """``tensors * scale``: back to the loss-scaled units ``optimizer.apply`` expects."""
    if scale is None:
        return tensors
    return [sam_ops.map_values(lambda v: v * ops.cast(scale, v.dtype), t) for t in tensors]


def all_replicas_true(ctx, flag):
    """``flag`` and'ed over replicas (``flag`` itself with one replica)."""
    if ctx is None:
        return flag
    bad = ctx.all_reduce(tf.distribute.ReduceOp.SUM, tf.cast(tf.logical_not(flag), tf.float32))
    return tf.equal(bad, 0.0)


def per_replica_outputs(results):
    """Step outputs shaped for the strategy's reduction of them.

    Keras 3.15 reduces multi-worker step outputs with ``reduce(MEAN, axis=0)``,
    which needs a leading axis; scalars fail there.
    """
    if multi_worker():
        return {k: tf.reshape(v, [1]) for k, v in results.items()}
    return results
