"""The training recipe shared by ``keras-aesam train``, the bench and the benchmarks.

SGD with momentum, a cosine (or constant) learning rate over the whole run,
weight decay, cross-entropy on logits and an accuracy metric: the paper's
§4.1 optimizer. It lives here once, so every tool trains the same way.

Weight decay has one default, ``"l2"``: an L2 kernel penalty of
``weight_decay / 2`` whose gradient ``weight_decay · w`` enters ``g`` before
momentum, as PyTorch's ``SGD(weight_decay=...)`` that the paper used. It is
part of the loss, so it is in the ``‖g‖²`` the adaptive policy reads and in
the SAM perturbation. ``"decoupled"`` uses Keras's ``SGD(weight_decay=...)``
instead (``w -= lr · weight_decay · w`` after the step, outside ``g``).

Every function takes the Keras module as ``K`` (``keras`` by default), so the
Keras 2 peer of the bench (``tf_keras``) follows the same recipe.
"""

from __future__ import annotations

import dataclasses

from keras_aesam.validation import check_int, check_range

WEIGHT_DECAY_MODES = ("l2", "decoupled")
SCHEDULES = ("cosine", "constant")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What an optimizer run needs besides the model and the data."""

    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    weight_decay_mode: str = "l2"
    schedule: str = "cosine"

    def __post_init__(self):
        check_range("lr", self.lr, 0.0, low_open=True)
        check_range("momentum", self.momentum, 0.0, 1.0, high_open=True)
        check_range("weight_decay", self.weight_decay, 0.0)
        if self.weight_decay_mode not in WEIGHT_DECAY_MODES:
            raise ValueError(
                f"weight_decay_mode must be one of {WEIGHT_DECAY_MODES}, got {self.weight_decay_mode!r}."
            )
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}.")


def kernel_regularizer(recipe, K=None):
    """The L2 penalty to give every kernel in ``"l2"`` mode, else None."""
    K = _keras(K)
    if recipe.weight_decay > 0 and recipe.weight_decay_mode == "l2":
        return K.regularizers.L2(recipe.weight_decay / 2.0)
    return None


def learning_rate(recipe, total_steps, K=None):
    """Cosine decay from ``lr`` to 0 over ``total_steps``, or the constant ``lr``."""
    K = _keras(K)
    if recipe.schedule == "constant":
        return recipe.lr
    total_steps = check_int("total_steps", total_steps, low=1)
    return K.optimizers.schedules.CosineDecay(recipe.lr, decay_steps=total_steps)


def optimizer(recipe, total_steps, K=None):
    """SGD with momentum, the schedule and (in ``"decoupled"`` mode) Keras's weight decay."""
    K = _keras(K)
    decoupled = recipe.weight_decay if recipe.weight_decay > 0 and recipe.weight_decay_mode == "decoupled" else None
    return K.optimizers.SGD(
        learning_rate=learning_rate(recipe, total_steps, K), momentum=recipe.momentum, weight_decay=decoupled
    )


def compile_model(model, recipe, total_steps, K=None, **compile_kwargs):
    """Compile ``model`` (logits out) with the recipe's optimizer, loss and accuracy metric."""
    K = _keras(K)
    model.compile(
        optimizer=optimizer(recipe, total_steps, K),
        loss=K.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[K.metrics.SparseCategoricalAccuracy(name="accuracy")],
        **compile_kwargs,
    )
    return model


def total_steps(epochs, steps_per_epoch):
    """``T``: the run's number of optimizer steps (the schedule's and AE-SAM's horizon)."""
    return check_int("epochs", epochs, low=1) * check_int("steps_per_epoch", steps_per_epoch, low=1)


def _keras(K):
    if K is None:
        import keras as K
    return K


__all__ = [
    "Recipe", "SCHEDULES", "WEIGHT_DECAY_MODES", "compile_model", "kernel_regularizer", "learning_rate",
    "optimizer", "total_steps",
]
