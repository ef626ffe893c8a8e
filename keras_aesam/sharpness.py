"""Sharpness of a trained model on a data set, at fixed weights.

``measure_sharpness`` reads the first-order worst case of the loss in a ρ-ball,
``max_{‖e‖≤ρ} L(w+e) − L(w)`` with ``e = ρ·g/‖g‖`` (the step SAM takes), so
that models trained with different methods can be compared on the same data.
Nothing is trained: no weight, optimizer or BatchNorm statistic moves.
"""

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from keras_aesam import directions as directions_module, ops as sam_ops
from keras_aesam.validation import check_bool, check_int, check_range


def _loss_function(model, loss):
    """``(y, y_pred, sample_weight) -> scalar``: the given loss, else the compiled one."""
    if loss is None:
        loss = getattr(model, "loss", None)
        if loss is None:
            raise ValueError(
                "measure_sharpness needs a loss: pass loss= (a keras.losses.Loss, "
                "a loss name or a function (y, y_pred) -> per-sample values), or "
                "compile the model with one loss."
            )
    if isinstance(loss, str):
        loss = keras.losses.get(loss)
    if isinstance(loss, keras.losses.Loss):
        return lambda y, y_pred, sw: loss(y, y_pred, sample_weight=sw)
    if callable(loss):
        def mean_loss(y, y_pred, sw):
            values = ops.convert_to_tensor(loss(y, y_pred))
            if sw is not None:
                values = values * ops.cast(ops.reshape(sw, (-1,) + (1,) * (values.shape.rank - 1)), values.dtype)
            return ops.mean(values)
        return mean_loss
    raise ValueError(
        "loss must be a keras.losses.Loss, a loss name or a function returning "
        f"per-sample values, got {loss!r} (one loss for one output)."
    )


def _batches(x, y, sample_weight, batch_size):
    if isinstance(x, tf.data.Dataset):
        if y is not None or sample_weight is not None:
            raise ValueError("With a tf.data.Dataset pass no y or sample_weight: the dataset yields them.")
        return x
    if y is None:
        raise ValueError("measure_sharpness needs targets: pass y= with array inputs.")
    parts = (x, y) if sample_weight is None else (x, y, sample_weight)
    return tf.data.Dataset.from_tensor_slices(parts).batch(batch_size)


def measure_sharpness(
    model,
    x,
    y=None,
    *,
    sample_weight=None,
    loss=None,
    rho=0.05,
    group_size=None,
    adaptive=False,
    perturb_filter=None,
    batch_size=128,
    steps=None,
    training=False,
):
    """First-order sharpness ``L(w + e) − L(w)`` of ``model`` on a data set.

    For each group of samples, ``g = ∇L(group; w)`` and ``e = ρ·g/‖g‖`` (ASAM's
    scaled ball with ``adaptive=True``); the result is the mean over all
    groups, each weighted by its number of samples. A group is a whole batch
    by default; ``group_size=m`` splits each batch into consecutive groups of
    ``m`` samples, each with its own ``e`` (SAM's m-sharpness, which grows as
    ``m`` shrinks). ``perturb_filter`` restricts ``e`` to some weights, as in
    training.

    Args:
        model: a built ``keras.Model`` (a ``SharpnessAwareModel`` or a plain one).
        x, y, sample_weight: arrays (batched by ``batch_size``), or ``x`` a
            ``tf.data.Dataset`` of ``(x, y)`` or ``(x, y, sample_weight)`` batches.
        loss: the loss ``L``; defaults to the model's compiled loss. Only the
            data loss counts (no regularization penalties), so models trained
            with different regularizers compare on the same ``L``.
        rho: the radius of the ball, > 0.
        steps: at most this many batches (``None``: the whole data set).
        training: run the forward passes in training mode (Dropout on,
            BatchNorm on batch statistics; nothing is updated). Default
            ``False``: the model as it predicts.

    Returns:
        The mean sharpness as a Python float (0 for a batch whose gradient is zero).
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"measure_sharpness takes a keras.Model, got {type(model).__name__}.")
    if not model.built:
        raise ValueError("measure_sharpness needs a built model (call it once or fit it first).")
    rho = check_range("rho", rho, 0.0, low_open=True)
    group_size = check_int("group_size", group_size, low=1, allow_none=True)
    batch_size = check_int("batch_size", batch_size, low=1)
    steps = check_int("steps", steps, low=1, allow_none=True)
    adaptive = check_bool("adaptive", adaptive)
    training = check_bool("training", training)
    perturb_filter = directions_module.check_perturb_filter(perturb_filter)
    loss_fn = _loss_function(model, loss)
    variables = model.trainable_variables
    if not variables:
        raise ValueError("The model has no trainable weights: its sharpness is undefined.")
    mask = directions_module.perturb_mask(perturb_filter, [v.path for v in variables])
    direction = directions_module.SAM(rho=rho, adaptive=adaptive)

    @tf.function(reduce_retracing=True)
    def group_sharpness(gx, gy, gsw):
        trainable = [v.value for v in variables]
        non_trainable = [v.value for v in model.non_trainable_variables]
        with tf.GradientTape() as tape:
            tape.watch(trainable)
            y_pred, _ = model.stateless_call(trainable, non_trainable, gx, training=training)
            before = ops.cast(loss_fn(gy, y_pred, gsw), "float32")
        grads = tape.gradient(before, trainable)
        grads = [ops.zeros_like(w) if g is None else g for g, w in zip(grads, trainable)]
        e = direction.perturbation(sam_ops.select(grads, mask), sam_ops.select(trainable, mask), 0)
        moved = sam_ops.add_lists(trainable, sam_ops.scatter_selected(e, mask, trainable))
        y_pred_after, _ = model.stateless_call(moved, non_trainable, gx, training=training)
        return ops.cast(loss_fn(gy, y_pred_after, gsw), "float32") - before

    total, count = 0.0, 0
    for index, batch in enumerate(_batches(x, y, sample_weight, batch_size)):
        if steps is not None and index >= steps:
            break
        bx, by = batch[0], batch[1]
        bsw = batch[2] if len(batch) > 2 else None
        size = int(tf.shape(tf.nest.flatten(bx)[0])[0])
        for start, stop in sam_ops.group_bounds(size, group_size):
            part = lambda t: None if t is None else tf.nest.map_structure(  # noqa: B023 - used in this iteration
                lambda a: a[start:stop], t)  # noqa: B023
            value = float(group_sharpness(part(bx), part(by), part(bsw)))
            total += value * (stop - start)
            count += stop - start
    if count == 0:
        raise ValueError("measure_sharpness got an empty data set.")
    return float(np.float64(total) / count)


__all__ = ["measure_sharpness"]
