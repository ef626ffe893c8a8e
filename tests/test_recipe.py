"""The one training recipe: schedule, optimizer, weight decay, loss."""

import math

import keras
import numpy as np
import pytest

from keras_aesam import recipe


def test_cosine_schedule_runs_from_lr_to_zero_over_the_run():
    lr = recipe.learning_rate(recipe.Recipe(lr=0.1), total_steps=100)
    assert math.isclose(float(lr(0)), 0.1, rel_tol=1e-6)
    assert math.isclose(float(lr(50)), 0.05, rel_tol=1e-5)
    assert float(lr(100)) == pytest.approx(0.0, abs=1e-7)


def test_constant_schedule_is_the_learning_rate():
    assert recipe.learning_rate(recipe.Recipe(lr=0.02, schedule="constant"), total_steps=10) == 0.02


def test_l2_mode_puts_half_the_decay_in_the_loss_so_its_gradient_is_decay_times_w():
    plan = recipe.Recipe(weight_decay=1e-3)
    reg = recipe.kernel_regularizer(plan)
    w = keras.ops.convert_to_tensor(np.array([[2.0, -1.0]], np.float32))
    assert math.isclose(float(reg(w)), 1e-3 / 2 * 5.0, rel_tol=1e-6)
    assert recipe.optimizer(plan, 10).weight_decay is None


def test_decoupled_mode_hands_the_decay_to_the_optimizer():
    plan = recipe.Recipe(weight_decay=1e-3, weight_decay_mode="decoupled")
    assert recipe.kernel_regularizer(plan) is None
    assert math.isclose(recipe.optimizer(plan, 10).weight_decay, 1e-3)


def test_no_weight_decay_means_neither():
    plan = recipe.Recipe()
    assert recipe.kernel_regularizer(plan) is None and recipe.optimizer(plan, 10).weight_decay is None


@pytest.mark.parametrize(
    "kwargs, message",
    [({"lr": 0.0}, r"lr must be in \(0, inf\)"), ({"momentum": 1.0}, r"momentum must be in \[0, 1\)"),
     ({"weight_decay": -1.0}, r"weight_decay must be in \[0, inf\)"),
     ({"weight_decay_mode": "adamw"}, "weight_decay_mode must be one of"),
     ({"schedule": "step"}, "schedule must be one of")],
)
def test_bad_recipes_name_the_parameter_and_its_range(kwargs, message):
    with pytest.raises(ValueError, match=message):
        recipe.Recipe(**kwargs)


def test_compile_model_gives_logit_cross_entropy_and_accuracy():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    recipe.compile_model(model, recipe.Recipe(lr=0.05), total_steps=4)
    x, y = np.ones((4, 3), np.float32), np.array([0, 1, 0, 1])
    logs = model.fit(x, y, epochs=1, verbose=0).history
    assert set(logs) == {"loss", "accuracy"}
    assert recipe.total_steps(3, 5) == 15
