"""keras_aesam.losses: one loss value per sample from what ``compile`` was given, for ESAM's selection."""

import keras
import numpy as np
import pytest

from keras_aesam import losses

Y = np.array([0, 2, 1], dtype="int32")
LOGITS = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0], [1.0, 1.0, 1.0]], dtype="float32")


def _no_flat_losses():
    raise AssertionError("a single loss needs no per-output resolution")


def _reference_cross_entropy():
    logits = LOGITS.astype("float64")
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return -log_p[np.arange(len(Y)), Y]


@pytest.mark.parametrize("loss", [
    keras.losses.SparseCategoricalCrossentropy(from_logits=True),  # an object: its unreduced call
    lambda y, p: keras.losses.sparse_categorical_crossentropy(y, p, from_logits=True),  # a function
])
def test_a_single_loss_gives_one_value_per_sample(loss):
    fn = losses.per_sample_loss_fn(loss, _no_flat_losses, None)
    # float32 log-softmax of values ~1: a few ulps.
    np.testing.assert_allclose(np.asarray(fn(Y, LOGITS)), _reference_cross_entropy(), rtol=1e-6)


def test_a_loss_name_resolves_like_compile():
    fn = losses.per_sample_loss_fn("mse", _no_flat_losses, None)
    target = np.zeros_like(LOGITS)
    np.testing.assert_allclose(np.asarray(fn(target, LOGITS)), np.mean(LOGITS**2, axis=1), rtol=1e-6)


def test_values_with_more_axes_are_averaged_per_sample_and_a_scalar_is_refused():
    values = np.arange(12, dtype="float32").reshape(3, 2, 2)
    np.testing.assert_allclose(np.asarray(losses.per_sample_values(values)), values.mean(axis=(1, 2)))
    with pytest.raises(ValueError, match="per-sample losses.*gamma=1.0"):
        losses.per_sample_values(np.float32(1.0))


def test_a_loss_that_is_not_callable_is_refused_with_what_was_given():
    with pytest.raises(ValueError, match="needs per-sample losses.*got loss=3"):
        losses.per_sample_loss_fn(3, _no_flat_losses, None)
