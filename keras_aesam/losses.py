"""Per-sample losses from a model's compiled loss, for ESAM's data selection.

ESAM's sharpness-sensitive data selection (SDS; Du et al., 2022a) keeps the
``⌈γ·B⌉`` samples whose loss rose most under the perturbation, so it needs one
loss value per sample where Keras's ``compute_loss`` has already reduced to a
scalar. These functions rebuild ``(y, y_pred) -> per-sample losses`` from what
``compile`` was given: one loss (an object, a name or a function), or one loss
per output summed with its ``loss_weights``, resolved the way ``compile``
resolved them.
"""

import keras
from keras import ops


def per_sample_values(values):
    """A loss function's output reduced to one value per sample."""
    values = ops.convert_to_tensor(values)
    if values.shape.rank == 0:
        raise ValueError(
            "ESAM's data selection (gamma < 1) needs per-sample losses, "
            "but the compiled loss returns a scalar. Use a loss with "
            "per-sample output, or gamma=1.0."
        )
    if values.shape.rank > 1:
        values = ops.mean(values, axis=tuple(range(1, values.shape.rank)))
    return values


def per_sample_loss_fn(loss, flat_losses, output_names):
    """A function ``(y, y_pred) -> per-sample losses`` for ESAM's selection.

    ``loss`` is the model's compiled loss (``model.loss``). With one loss per
    output it is the ``loss_weights``-weighted sum of the outputs' per-sample
    losses: ``flat_losses()`` returns compile's ``(path, loss, weight, name)``
    per output and whether they are keyed by output name (read when the step is
    traced, once compile has resolved them), ``output_names`` the model's.
    """
    if keras.tree.is_nested(loss):
        return per_sample_multi_output_loss_fn(flat_losses, output_names)
    compiled = loss
    if isinstance(loss, str):
        loss = keras.losses.get(loss)
    fn = None
    if isinstance(loss, keras.losses.Loss):
        fn = loss.call
    elif callable(loss):
        fn = loss
    if fn is None:
        raise ValueError(
            "ESAM's data selection (gamma < 1) needs per-sample losses: compile "
            "with a keras.losses.Loss, a loss name or a function returning "
            f"per-sample values (one, or one per output), got loss={compiled!r}. "
            "Use gamma=1.0 to turn selection off."
        )
    return lambda y, y_pred: per_sample_values(fn(y, y_pred))


def per_sample_multi_output_loss_fn(flat_losses, output_names):
    """The ``loss_weights``-weighted sum of each output's per-sample loss (see :func:`per_sample_loss_fn`)."""

    def per_sample(y, y_pred):
        losses, keyed_by_name = flat_losses()
        names = output_names
        if isinstance(y, dict) and not isinstance(y_pred, dict) and names:
            y = [y[name] for name in names]
        if keyed_by_name and not isinstance(y_pred, dict):
            # compile keyed the losses by output name
            y_pred = dict(zip(names, keras.tree.flatten(y_pred)))
            y = dict(zip(names, keras.tree.flatten(y)))
        total = 0.0
        for path, loss_fn, weight, _ in losses:
            y_t, y_p = y, y_pred
            for key in path:
                y_t, y_p = y_t[key], y_p[key]
            values = per_sample_values(loss_fn.call(y_t, y_p))
            total = total + (values if weight is None else values * weight)
        return total

    return per_sample
