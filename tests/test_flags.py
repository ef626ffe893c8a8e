"""keras_aesam.cli.flags: one flag vocabulary for ``keras-aesam train`` and ``keras-aesam bench``."""

import json

import numpy as np
import pytest

from keras_aesam import METHODS, bench, cli, method_parameters
from keras_aesam.cli import flags
from keras_aesam.cli.train_spec import TrainSpec


def _train_args(*argv):
    return cli.build_parser().parse_args(["train", *argv])


def _bench_args(*argv):
    return bench.build_parser().parse_args(list(argv))


def _value_for(hp):
    """A value of the right type for each hyperparameter flag (switches take none)."""
    if hp.type is None:
        return []
    return [{int: "3", flags.int_or_none: "3", float: "0.25", str: "constant"}[hp.type]]


def test_train_and_bench_share_one_hyperparameter_table_and_one_bad_input():
    assert cli.HYPERPARAMETER_FLAGS is flags.HYPERPARAMETER_FLAGS
    assert bench.HYPERPARAMETER_FLAGS is flags.HYPERPARAMETER_FLAGS
    assert cli.BadInput is flags.BadInput and bench.BadInput is flags.BadInput


def test_every_hyperparameter_flag_parses_to_the_same_value_in_train_and_bench():
    argv = [arg for hp in flags.HYPERPARAMETER_FLAGS for arg in (hp.flag, *_value_for(hp))]
    from_train = flags.given_hyperparameters(_train_args(*argv))
    from_bench = flags.given_hyperparameters(_bench_args(*argv))
    assert from_train == from_bench
    assert set(from_train) == {hp.name for hp in flags.HYPERPARAMETER_FLAGS}
    assert from_train["k"] == 3 and from_train["rho"] == 0.25 and from_train["per_tensor"] is True
    assert from_train["schedule"] == "constant"  # --coin-schedule: --schedule is the learning rate's


def test_no_hyperparameter_flag_given_means_none():
    assert flags.given_hyperparameters(_train_args()) == {}
    assert flags.given_hyperparameters(_bench_args()) == {}


def test_the_table_unpacks_as_name_flag_type_help():
    for name, flag, kind, text in flags.HYPERPARAMETER_FLAGS:
        assert flag.startswith("--") and text
        assert kind in (None, int, float, str, flags.int_or_none), name


@pytest.mark.parametrize("old", ["--model", "--noise", "--hist-epochs", "--hist-batches"])
def test_the_replaced_spellings_are_not_flags(old, capsys):
    with pytest.raises(SystemExit) as train_exit:
        _train_args(old, "1")
    assert train_exit.value.code == 2 and f"unrecognized arguments: {old}" in capsys.readouterr().err
    if old in ("--model", "--noise"):  # the bench's spellings of --network and --label-noise
        with pytest.raises(SystemExit):
            _bench_args(old, "1")
        assert f"unrecognized arguments: {old}" in capsys.readouterr().err


def test_help_shows_the_chosen_names_only(capsys):
    train_help = cli.build_parser().subcommands["train"].format_help()
    bench_help = bench.build_parser().format_help()
    for text in (train_help, bench_help):
        assert "--network" in text and "--label-noise" in text
        assert "--model" not in text and "--noise " not in text
    assert "--grad-norm-epochs" in train_help and "--hist-" not in train_help


def test_errors_name_the_flag(capsys, tmp_path):
    with pytest.raises(SystemExit):
        bench.main(["--label-noise", "2", "--output", str(tmp_path / "out")])
    assert "--label-noise rates must be in [0, 1)" in capsys.readouterr().err


@pytest.mark.parametrize("value, expected", [("all", None), ("ALL", None), ("full", None), ("12", 12)])
def test_train_size(value, expected):
    assert flags.parse_train_size(value) == expected


@pytest.mark.parametrize("value, message", [
    ("x", "--train-size must be an integer >= 1 or 'all', got 'x'"),
    ("0", "--train-size must be >= 1 or 'all', got 0"),
])
def test_bad_train_size(value, message):
    with pytest.raises(flags.BadInput, match=message):
        flags.parse_train_size(value)


def test_write_json_writes_numpy_values_as_numbers_and_creates_the_folder(tmp_path):
    path = flags.write_json(tmp_path / "a" / "b.json", {"x": np.float32(0.5), "n": np.int64(3),
                                                         "v": np.arange(2), "p": tmp_path})
    assert json.loads(path.read_text()) == {"x": 0.5, "n": 3, "v": [0, 1], "p": str(tmp_path)}
    assert [p.name for p in path.parent.iterdir()] == ["b.json"]  # no .tmp left


def test_write_json_leaves_the_old_file_whole_when_writing_fails(tmp_path):
    path = flags.write_json(tmp_path / "c.json", {"ok": 1})
    circular = {}
    circular["self"] = circular
    with pytest.raises(ValueError):
        flags.write_json(path, circular)
    assert json.loads(path.read_text()) == {"ok": 1}


# ------------------------------------------- flags a method does not take


def _pairs(taken):
    """(method, hyperparameter flag) pairs where the method takes the flag (``taken``) or not."""
    return [pytest.param(method, hp, id=f"{method}{hp.flag}") for method in METHODS
            for hp in flags.HYPERPARAMETER_FLAGS if (hp.name in flags.method_takes(method)) == taken]


def test_a_method_takes_its_parameters_except_those_of_a_direction_it_never_uses():
    for method in METHODS:
        expected = [] if method == "erm" else [p for p in method_parameters(method) if p != "seed"]
        assert flags.method_takes(method) == expected, method
    assert "erm" not in flags.methods_taking("rho")
    assert flags.methods_taking("k") == ["looksam"]


@pytest.mark.parametrize("method, hp", _pairs(taken=False))
def test_train_refuses_every_flag_the_method_does_not_take(method, hp):
    takers = ", ".join(flags.methods_taking(hp.name))
    args = _train_args("--method", method, hp.flag, *_value_for(hp))
    with pytest.raises(flags.BadInput, match=rf"method '{method}' does not take {hp.flag} \(taken by {takers}\)"):
        TrainSpec.from_args(args)


@pytest.mark.parametrize("method, hp", _pairs(taken=True))
def test_train_accepts_every_flag_the_method_takes(method, hp):
    args = _train_args("--method", method, hp.flag, *_value_for(hp))
    try:
        spec = TrainSpec.from_args(args)
    except flags.BadInput as err:  # a value the method refuses alone (--p-start without --p-end)
        assert str(err).startswith(f"invalid hyperparameter for {method}: "), err
    else:
        assert hp.name in spec.hyperparameters


def test_a_flag_given_at_its_default_value_still_counts_and_defaults_never_do():
    with pytest.raises(flags.BadInput, match=r"method 'erm' does not take --rho"):
        TrainSpec.from_args(_train_args("--method", "erm", "--rho", "0.05"))
    for method in METHODS:
        assert dict(TrainSpec.from_args(_train_args("--method", method)).hyperparameters).keys() <= {"seed"}


@pytest.mark.parametrize("method, hp", _pairs(taken=False))
def test_bench_refuses_every_flag_none_of_its_methods_takes(method, hp, tmp_path):
    takers = ", ".join(flags.methods_taking(hp.name))
    args = _bench_args("--methods", method, "--no-peer", "--output", str(tmp_path), hp.flag, *_value_for(hp))
    with pytest.raises(flags.BadInput, match=rf"none of the methods {method} takes {hp.flag} \({takers} take it\)"):
        bench.resolve(args)


def test_bench_gives_a_flag_to_the_methods_taking_it_only():
    args = _bench_args("--methods", "erm,looksam", "--no-peer", "--k", "3")
    runs = {run["method"]: run["hyperparameters"] for run in bench.resolve(args)["runs"]}
    assert runs["looksam"]["k"] == 3 and "k" not in runs["erm"]
