"""Delete only what we wrote: every removing or overwriting operation leaves foreign files alone.

Each test puts files of a user next to ours, runs the operation, and checks
that the user's files are still there, unchanged (and named in the warning
where the operation removes things).
"""

import contextlib
import io
import json
from pathlib import Path

import pytest

from keras_aesam import bench, cli
from keras_aesam.cli import safety

FOREIGN = "a user's file, not ours"


def _put(path, text=FOREIGN):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _intact(*paths):
    return all(Path(p).read_text() == FOREIGN for p in paths)


# ----------------------------------------------------------------- the module


def test_remove_written_deletes_the_listed_files_and_keeps_the_rest(tmp_path):
    folder = tmp_path / "out"
    for name in ("report.md", "runs/a.json", "runs/b.json"):
        _put(folder / name, "ours")
    safety.record(folder, folder / "report.md", folder / "runs/a.json", folder / "runs/b.json", folder / "runs")
    mine = _put(folder / "runs" / "my_training_run.txt")
    notes = _put(folder / "notes.txt")
    left = safety.remove_written(folder)
    assert left == ["notes.txt", "runs/my_training_run.txt"]
    assert _intact(mine, notes)
    assert not (folder / "report.md").exists() and not (folder / "runs/a.json").exists()
    assert safety.written(folder) == ["runs/"]  # kept: the folder could not go (not empty)


def test_remove_written_removes_the_folder_when_only_ours_was_there(tmp_path):
    folder = tmp_path / "out"
    _put(folder / "sub" / "x.csv", "ours")
    safety.record(folder, folder / "sub", folder / "sub" / "x.csv")
    assert safety.remove_written(folder) == []
    assert not folder.exists()


def test_manifest_entries_outside_the_folder_and_links_are_never_followed(tmp_path):
    folder = tmp_path / "out"
    outside = _put(tmp_path / "precious.txt")
    target_dir = tmp_path / "elsewhere"
    inside_target = _put(target_dir / "data.txt")
    folder.mkdir()
    (folder / "link").symlink_to(target_dir)
    # A manifest edited by hand (or by a bug) cannot point outside the folder.
    (folder / safety.MANIFEST).write_text(f"../precious.txt\n{outside}\nlink/data.txt\nlink/\n")
    safety.remove_written(folder)
    assert _intact(outside, inside_target)
    assert (folder / "link").is_symlink()


def test_claim_refuses_to_overwrite_a_file_we_did_not_write(tmp_path):
    theirs = _put(tmp_path / "accuracy.png")
    with pytest.raises(safety.NotOurs, match="refusing to overwrite .*accuracy.png.*keras-aesam did not write it"):
        safety.claim(theirs)
    assert _intact(theirs)
    ours = safety.claim(tmp_path / "new.png")  # not there yet: recorded, then written
    ours.write_text("v1")
    assert safety.claim(ours) == ours  # ours: may be replaced


def test_check_ours_refuses_a_non_empty_folder_without_a_manifest(tmp_path):
    _put(tmp_path / "work" / "thesis.tex")
    with pytest.raises(safety.NotOurs, match=r"--fresh refuses to delete anything in .*work.*no \.keras-aesam-files"):
        safety.check_ours(tmp_path / "work", "--fresh")
    safety.check_ours(tmp_path / "missing", "--fresh")  # nothing there: nothing to refuse
    (tmp_path / "empty").mkdir()
    safety.check_ours(tmp_path / "empty", "--fresh")


def test_discard_deletes_one_file_of_ours_and_its_emptied_folder(tmp_path):
    ours = _put(tmp_path / "backup" / "state.npz", "ours")
    safety.record(tmp_path, tmp_path / "backup", ours)
    theirs = _put(tmp_path / "backup2" / "state.npz")
    assert not safety.discard(theirs, tmp_path) and _intact(theirs)
    assert safety.discard(ours, tmp_path)
    assert not (tmp_path / "backup").exists()


def test_truncate_written_only_cuts_our_files(tmp_path):
    theirs = _put(tmp_path / "steps.csv")
    with pytest.raises(safety.NotOurs, match="refusing to truncate"):
        safety.truncate_written(theirs, 3)
    assert _intact(theirs)
    ours = safety.claim(tmp_path / "history.csv")
    ours.write_text("header\nrow1\nrow2\n")
    safety.truncate_written(ours, len("header\nrow1\n"))
    assert ours.read_text() == "header\nrow1\n"


# ---------------------------------------------------------------------- bench


def _bench_plan(out, extra=()):
    args = bench.build_parser().parse_args(
        ["--methods", "erm,sam", "--seeds", "1", "--no-peer", "--isolation", "none", "--output", str(out), *extra])
    return bench.resolve(args)


def _fake_run(spec, out):
    return {"test_accuracy": 0.5, "sam_fraction": 0.0, "steps": 8, "sam_steps": 0, "grad_evals": 8,
            "pass_equivalents": 8, "step_ms": 100.0, "epoch_seconds_after_first": 1.0,
            "first_epoch_seconds": 3.0, "timed_steps": 8}


def test_bench_fresh_refuses_a_folder_that_holds_no_bench(tmp_path, capsys):
    out = tmp_path / "project"
    mine = [_put(out / "runs" / "my_training_run.txt"), _put(out / "logs" / "notes.txt")]
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--methods", "erm", "--seeds", "1", "--epochs", "1", "--train-size", "256", "--label-noise", "0",
                    "--no-peer", "--output", str(out), "--fresh"])
    assert exit_.value.code == 2
    assert "--fresh refuses to delete anything in" in capsys.readouterr().err
    assert _intact(*mine)


def test_bench_fresh_deletes_its_own_results_and_names_what_it_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "_run_method", _fake_run)
    out = tmp_path / "out"
    assert bench.run_bench(_bench_plan(out), stream=io.StringIO()) == 0
    ours = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert {"bench.json", "report.md", "results.csv", "runs/clean_s0_erm.json"} <= set(ours)
    mine = [_put(out / "runs" / "my_training_run.txt"), _put(out / "logs" / "notes.txt"), _put(out / "README")]
    stream = io.StringIO()
    assert bench.run_bench(_bench_plan(out), fresh=True, stream=stream) == 0
    assert _intact(*mine)
    assert "--fresh kept 3 file(s)" in stream.getvalue()
    assert "README, logs/notes.txt, runs/my_training_run.txt" in stream.getvalue()
    assert "[2/2]" in stream.getvalue()  # both runs ran again: their results were deleted
    assert json.loads((out / "bench.json").read_text())["sessions"][0]["skipped_finished_runs"] == 0


def test_bench_fresh_on_a_bench_written_before_manifests(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "_run_method", _fake_run)
    out = tmp_path / "out"
    assert bench.run_bench(_bench_plan(out), stream=io.StringIO()) == 0
    (out / safety.MANIFEST).unlink()  # as an older keras-aesam left it
    mine = [_put(out / "runs" / "notes.json"), _put(out / "init" / "readme.txt")]
    stream = io.StringIO()
    assert bench.run_bench(_bench_plan(out), fresh=True, stream=stream) == 0
    assert _intact(*mine)  # runs/*.json of a run id bench.json does not list is not ours
    assert "runs/notes.json" in stream.getvalue()


# -------------------------------------------------- train, export and plots


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from test_cli import _fashion_mnist_available

    if not _fashion_mnist_available():
        pytest.skip("Fashion-MNIST files not available offline")
    root = tmp_path_factory.mktemp("safety")
    run_dir, export_root = root / "run", root / "saved"
    argv = ["train", "--train-size", "256", "--epochs", "1", "--eval-batches", "1", "--grad-norm-epochs", "none",
            "--quiet", "--output", str(run_dir), "--export-dir", str(export_root)]
    with contextlib.redirect_stdout(io.StringIO()):
        cli.run(argv)
    return {"argv": argv, "run_dir": run_dir, "export": export_root / "run"}


def test_train_overwrite_replaces_our_run_and_export_and_keeps_the_users_files(trained, capsys):
    run_dir, export = trained["run_dir"], trained["export"]
    assert (export / "saved_model.pb").is_file() and safety.is_ours(export)
    mine = [_put(run_dir / "my_notes.txt"), _put(run_dir / "backup" / "keep.txt"), _put(export / "README")]
    old_config = (run_dir / "config.json").read_text()
    code = cli.main([*trained["argv"], "--overwrite"])
    assert code == 0
    assert _intact(*mine)
    err = capsys.readouterr().err
    assert f"kept 2 file(s) in {run_dir} that keras-aesam did not write: backup/keep.txt, my_notes.txt" in err
    assert f"kept 1 file(s) in {export} that keras-aesam did not write: README" in err
    assert (run_dir / "config.json").read_text() != old_config  # a new run was written
    assert (export / "saved_model.pb").is_file()


def test_train_overwrite_refuses_a_users_file_under_a_name_the_run_writes(capsys, tmp_path):
    run_dir = tmp_path / "run"
    safety.record(run_dir, run_dir / "config.json")
    _put(run_dir / "config.json", "{}")
    theirs = _put(run_dir / "history.csv")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--output", str(run_dir), "--overwrite"])
    assert exit_.value.code == 2
    assert f"--overwrite refuses to replace {theirs}: keras-aesam did not write it" in capsys.readouterr().err
    assert _intact(theirs)


def test_plot_regeneration_never_overwrites_a_picture_we_did_not_draw(trained, tmp_path, capsys):
    from keras_aesam.cli.plots import PLOT_FILES

    run_dir = trained["run_dir"]
    code = cli.main(["plot", str(run_dir)])  # our own PNGs: drawn again
    assert code == 0
    elsewhere = tmp_path / "figures"
    theirs = _put(elsewhere / PLOT_FILES["accuracy"])
    with pytest.raises(SystemExit) as exit_:
        cli.main(["plot", str(run_dir), "--output-dir", str(elsewhere)])
    assert exit_.value.code == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert _intact(theirs)


def test_example_tables_are_not_written_over_a_users_file(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "examples"))
    import _common

    rows = [{"a": 1}]
    with contextlib.redirect_stdout(io.StringIO()):
        _common.write_table(rows, ["a"], tmp_path / "summary")
        _common.write_table(rows, ["a"], tmp_path / "summary")  # ours: rewritten
        theirs = _put(tmp_path / "table.md")
        with pytest.raises(safety.NotOurs):
            _common.write_table(rows, ["a"], tmp_path / "table")
    assert _intact(theirs) and not (tmp_path / "table.csv").exists()


def test_examples_resume_an_interrupted_run_and_rerun_only_with_overwrite(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "examples"))
    import _common

    calls = []
    monkeypatch.setattr(cli, "run", lambda argv, **kwargs: calls.append(argv) or {})
    run_dir = tmp_path / "run"
    _put(run_dir / "config.json", json.dumps({"command": "keras-aesam train", "results": {"interrupted": True}}))
    argv = ["train", "--epochs", "2", "--output", str(run_dir), "--overwrite"]
    with contextlib.redirect_stdout(io.StringIO()):
        _common.run_or_reuse(argv, run_dir)
        _common.run_or_reuse(argv, run_dir, rerun=True)
    assert calls == [["train", "--resume", "--epochs", "2", "--output", str(run_dir)], argv]


def test_a_resumed_run_cuts_only_csv_files_it_wrote(tmp_path, capsys):
    """The step recorder's CSVs are cut back to the backup's point on resume; a foreign one is refused."""
    run_dir = tmp_path / "run"
    config = {"command": "keras-aesam train", "argv": ["train", "--train-size", "256", "--epochs", "1"],
              "epochs": 1, "steps_per_epoch": 2}
    _put(run_dir / "config.json", json.dumps(config))
    safety.record(run_dir, run_dir / "config.json")
    theirs = _put(run_dir / "steps.csv")  # not in the manifest
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--resume", "--output", str(run_dir)])
    assert exit_.value.code == 2
    assert f"--resume refuses to replace {theirs}: keras-aesam did not write it" in capsys.readouterr().err
    assert _intact(theirs)


# ------------------------------------------------------- the manifest's form


def test_manifest_entries_are_relative_to_their_folder_whatever_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "project").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "project")
    safety.claim("runs/e/config.json", "runs/e")  # first claimed, then written
    _put("runs/e/config.json", "ours")
    Path("runs/e/backup").mkdir()
    safety.record("runs/e", "runs/e/backup")
    assert (tmp_path / "project/runs/e" / safety.MANIFEST).read_text() == "./config.json\n./backup/\n"
    for cwd, folder in ((tmp_path / "elsewhere", "../project/runs/e"), (tmp_path, tmp_path / "project/runs/e")):
        monkeypatch.chdir(cwd)
        assert safety.written(folder) == ["config.json", "backup/"]
        assert safety.claim(Path(folder) / "config.json", folder)  # ours: may be replaced from here too


def test_a_manifest_of_an_earlier_version_is_read_from_any_working_directory(tmp_path, monkeypatch):
    """Earlier manifests held paths relative to the writer's working directory (runs/e/config.json)."""
    run = tmp_path / "project" / "runs" / "e"
    for name in ("config.json", "backup/state.npz"):
        _put(run / name, "ours")
    (run / safety.MANIFEST).write_text("runs/e/config.json\nruns/e/backup/\nruns/e/backup/state.npz\n")
    notes = _put(run / "notes.txt")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert safety.written("../project/runs/e") == ["config.json", "backup/", "backup/state.npz"]
    assert safety.remove_written("../project/runs/e") == ["notes.txt"]
    assert _intact(notes) and not (run / "config.json").exists() and not (run / "backup").exists()


def test_an_earlier_entry_that_names_a_file_of_the_folder_is_taken_as_it_stands(tmp_path):
    """A bench folder named ``runs`` given by its absolute path held ``runs/a.json``: its own file."""
    out = tmp_path / "runs"
    _put(out / "runs" / "a.json", "ours")
    (out / safety.MANIFEST).write_text("runs/a.json\n")
    assert safety.written(out) == ["runs/a.json"]


def test_example_tables_given_relative_are_ours_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "examples"))
    import _common

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with contextlib.redirect_stdout(io.StringIO()):
        monkeypatch.chdir(tmp_path / "a")
        _common.write_table([{"a": 1}], ["a"], "out/summary")
        monkeypatch.chdir(tmp_path / "b")
        _common.write_table([{"a": 2}], ["a"], "../a/out/summary")  # the rerun: ours, rewritten
    assert (tmp_path / "a/out/summary.csv").read_text().splitlines() == ["a", "2"]
    assert safety.written(tmp_path / "a/out") == ["summary.md", "summary.csv"]
