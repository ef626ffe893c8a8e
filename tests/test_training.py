"""``keras-aesam train``'s ending: a run at chance level does not pass silently."""

import contextlib
import io
import math

import pytest

from keras_aesam import cli
from keras_aesam.bench.progress import is_degenerate
from keras_aesam.cli import training
from test_cli import needs_data


@pytest.mark.parametrize(
    "accuracy, loss, expected",
    [(0.10, 2.30, True), (0.12, 2.30, True), (0.125, 2.30, False), (0.85, 0.4, False),
     (0.85, math.nan, True), (0.85, math.inf, True)],
)
def test_chance_level_is_the_bench_rule(accuracy, loss, expected):
    results = {"test_accuracy": accuracy, "test_loss": loss}
    assert training.at_chance_level(results, 10) is expected
    assert is_degenerate({**results, "num_classes": 10}) is expected


def test_chance_level_depends_on_the_number_of_classes():
    assert training.at_chance_level({"test_accuracy": 0.5, "test_loss": 0.69}, 2)
    assert not training.at_chance_level({"test_accuracy": 0.5, "test_loss": 0.69}, 10)


@needs_data
def test_train_ends_with_a_warning_when_the_model_learned_nothing(tmp_path, capsys):
    # a learning rate this large sends the weights to non-finite outputs on the first step
    argv = ["train", "--train-size", "256", "--epochs", "1", "--lr", "1e12", "--no-plots",
            "--eval-batches", "4", "--quiet",
            "--output", str(tmp_path / "run"), "--export-dir", str(tmp_path / "saved")]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        results = cli.run(argv)
    err = capsys.readouterr().err
    assert results["chance_level"] is True
    assert "WARNING" in err and "chance level" in err
    assert out.getvalue().strip().splitlines()[-1].startswith("test accuracy ")


@needs_data
def test_a_run_that_learned_has_no_warning(tmp_path, capsys):
    argv = ["train", "--train-size", "512", "--epochs", "2", "--method", "erm", "--no-plots",
            "--eval-batches", "8", "--quiet",
            "--output", str(tmp_path / "run"), "--export-dir", str(tmp_path / "saved")]
    with contextlib.redirect_stdout(io.StringIO()):
        results = cli.run(argv)
    assert results["chance_level"] is False
    assert "chance level" not in capsys.readouterr().err
