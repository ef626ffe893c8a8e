"""keras_aesam.cli.train_spec: a ``keras-aesam train`` run's settings, checked when the spec is made."""

import dataclasses

import pytest

from keras_aesam import cli
from keras_aesam.cli.flags import BadInput
from keras_aesam.cli.train_spec import PAPER_LR, SMALL_CNN_LR, TrainSpec


def _from_flags(*argv):
    return TrainSpec.from_args(cli.build_parser().parse_args(["train", *argv]))


def test_names_are_looked_up_in_the_registries():
    spec = TrainSpec(dataset="Fashion-MNIST", network="Small-CNN", method="AE-SAM")
    assert (spec.dataset, spec.network, spec.method) == ("fashion_mnist", "small_cnn", "ae_sam")


def test_a_spec_cannot_be_changed_after_it_was_checked():
    spec = TrainSpec()
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.epochs = 0
    with pytest.raises(TypeError):
        spec.hyperparameters["rho"] = 0.0


@pytest.mark.parametrize("field, value, message", [
    ("dataset", "mnist", r"unknown dataset 'mnist'; valid datasets: cifar10, cifar100, fashion_mnist"),
    ("network", "resnet1000", r"unknown network 'resnet1000'; valid networks: .*mlp"),
    ("method", "adam", r"unknown method 'adam'; valid methods: .*ae_sam"),
    ("epochs", 0, r"--epochs must be >= 1, got 0"),
    ("batch_size", 0, r"--batch-size must be >= 1, got 0"),
    ("train_size", 0, r"--train-size must be >= 1 or 'all', got 0"),
    ("label_noise", 1.0, r"--label-noise must be in \[0, 1\), got 1"),
    ("seed", -1, r"--seed must be >= 0, got -1"),
    ("validation_fraction", 1.0, r"--validation-fraction must be in \[0, 1\), got 1"),
    ("lr", 0.0, r"--lr must be > 0, got 0"),
    ("lr", float("inf"), r"--lr must be > 0, got inf"),
    ("momentum", 1.0, r"--momentum must be in \[0, 1\), got 1"),
    ("weight_decay", -1e-4, r"--weight-decay must be >= 0, got -0.0001"),
    ("weight_decay_mode", "adamw", r"--weight-decay-mode must be one of l2, decoupled, got 'adamw'"),
    ("schedule", "step", r"--schedule must be one of cosine, constant, got 'step'"),
    ("steps_per_execution", 0, r"--steps-per-execution must be >= 1, got 0"),
    ("total_steps", 0, r"--total-steps must be >= 1, got 0"),
    ("eval_batches", 0, r"--eval-batches must be >= 1, got 0"),
    ("grad_norm_batches", 0, r"--grad-norm-batches must be >= 1, got 0"),
    ("grad_norm_epochs", (0, 11), r"--grad-norm-epochs must be in \[0, 10\] \(completed epochs\), got \[11\]"),
    ("num_classes", 0, r"--num-classes must be >= 1, got 0"),
    ("manual_dir", "/x", r"--manual-dir is for imagenet2012 only, not fashion_mnist"),
])
def test_a_value_out_of_range_names_the_flag_and_the_accepted_range(field, value, message):
    with pytest.raises(BadInput, match=message):
        TrainSpec(**{field: value})


def test_the_method_must_take_every_hyperparameter_given():
    refused = r"method 'sam' does not take --lambda1 \(taken by ae_sam, ae_looksam\); it takes --rho, .*--total-steps"
    with pytest.raises(BadInput, match=refused):
        TrainSpec(method="sam", hyperparameters={"lambda1": 0.0})
    with pytest.raises(BadInput, match=r"invalid hyperparameter for ae_sam: lambda1 must be <= lambda2"):
        TrainSpec(method="ae_sam", hyperparameters={"lambda1": 2.0, "lambda2": 1.0})


def test_a_method_drawing_random_numbers_gets_the_runs_seed():
    assert TrainSpec(method="ss_sam", seed=7).hyperparameters["seed"] == 7
    assert "seed" not in TrainSpec(method="sam", seed=7).hyperparameters


def test_from_flags_the_defaults_and_the_learning_rate_of_the_network():
    spec = _from_flags()
    assert (spec.dataset, spec.network, spec.method, spec.epochs) == ("fashion_mnist", "mlp", "ae_sam", 10)
    assert spec.lr == PAPER_LR and spec.train_size is None and spec.label_noise == 0.0
    assert spec.grad_norm_epochs == (1, 5, 10)  # 'auto': the first, middle and last epoch
    assert _from_flags("--network", "small_cnn").lr == SMALL_CNN_LR
    assert _from_flags("--network", "small_cnn", "--lr", "0.05").lr == 0.05


def test_from_flags_carries_the_flags_into_the_recipe_and_the_data():
    spec = _from_flags("--label-noise", "0.4", "--train-size", "256", "--weight-decay-mode", "decoupled",
                       "--momentum", "0.5", "--method", "looksam", "--k", "2", "--grad-norm-epochs", "none")
    recipe = spec.recipe()
    assert (recipe.lr, recipe.momentum, recipe.weight_decay_mode) == (PAPER_LR, 0.5, "decoupled")
    data = spec.dataset_kwargs()
    assert data == dict(batch_size=128, seed=0, label_noise=0.4, train_size=256, validation_fraction=0.1)
    assert dict(spec.hyperparameters) == {"k": 2} and spec.grad_norm_epochs == ()


def test_a_custom_network_keeps_its_label():
    spec = TrainSpec.from_args(cli.build_parser().parse_args(["train", "--network", "my_resnet"]),
                               custom_network=True)
    assert spec.network == "my_resnet"
