"""keras_aesam.cli.run_directory: a run's folder is checked before training and written only through RunDirectory."""

import json
import os

import numpy as np
import pytest

from keras_aesam.cli import safety
from keras_aesam.cli.flags import BadInput
from keras_aesam.cli.run_directory import BACKUP_FILE, CSV_FILES, RUN_FILES, RunDirectory


def _files(folder):
    """Every file under ``folder`` (relative, POSIX), the manifest left out."""
    found = set()
    for root, _, names in os.walk(folder):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
            if rel != safety.MANIFEST:
                found.add(rel)
    return found


def _tiny_model():
    import keras

    inputs = keras.Input((3,))
    return keras.Model(inputs, keras.layers.Dense(2)(inputs))


def test_a_run_writes_only_the_files_it_lists(tmp_path):
    run_dir = RunDirectory.choose(tmp_path / "run", tmp_path / "saved", name="x")
    run_dir.prepare(fresh=True)
    run_dir.write_config({"command": "keras-aesam train"})
    for name in CSV_FILES:
        run_dir.file(name).write_text("step\n0\n")
    run_dir.backup_file.write_bytes(b"state")
    run_dir.save_model(_tiny_model())
    run_dir.export(_tiny_model())
    written = _files(run_dir.path)
    assert written == {"config.json", *CSV_FILES, "model.keras", BACKUP_FILE}
    assert written <= set(RUN_FILES) and written <= set(safety.written(run_dir.path))
    exported = _files(run_dir.export_path)
    assert "saved_model.pb" in exported and exported <= set(safety.written(run_dir.export_path))
    run_dir.complete()  # the backup goes once the run is finished; its folder with it
    assert not (run_dir.path / "backup").exists() and "model.keras" in _files(run_dir.path)


def test_only_the_files_of_a_run_directory_have_a_path():
    with pytest.raises(ValueError, match="'notes.txt' is not a file of a run directory"):
        RunDirectory("somewhere").file("notes.txt")


def test_an_existing_run_needs_overwrite_and_overwriting_keeps_the_users_files(tmp_path):
    first = RunDirectory.choose(tmp_path / "run", tmp_path / "saved", name="x")
    first.prepare(fresh=True)
    first.write_config({"command": "keras-aesam train", "epochs": 2, "steps_per_epoch": 4})
    (first.path / "notes.txt").write_text("mine")
    with pytest.raises(BadInput, match=r"holds an unfinished run \(last backup at step 0 of 8\); pass --resume"):
        RunDirectory.choose(tmp_path / "run", tmp_path / "saved", name="x")
    first.write_config({"command": "keras-aesam train", "results": {"test_accuracy": 0.9}})
    with pytest.raises(BadInput, match="exists; pass --overwrite"):
        RunDirectory.choose(tmp_path / "run", tmp_path / "saved", name="x")
    again = RunDirectory.choose(tmp_path / "run", tmp_path / "saved", name="x", overwrite=True)
    again.prepare(fresh=True)
    assert _files(again.path) == {"notes.txt"}
    assert (again.path / "notes.txt").read_text() == "mine"


def test_a_folder_keras_aesam_did_not_write_is_refused(tmp_path):
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "thesis.tex").write_text("x")
    with pytest.raises(BadInput, match="refuses to delete"):
        RunDirectory.choose(tmp_path / "theirs", tmp_path / "saved", name="x", overwrite=True)


def test_a_resumed_run_cuts_its_logs_back_to_the_backup(tmp_path):
    run_dir = RunDirectory.choose(tmp_path / "run", tmp_path / "saved", name="x")
    run_dir.prepare(fresh=True)
    run_dir.file("steps.csv").write_text("step\n0\n1\n2\n")
    sizes = {"steps.csv": len("step\n0\n")}
    RunDirectory(run_dir.path, run_dir.export_path).prepare(fresh=False, csv_sizes=sizes)
    assert run_dir.file("steps.csv").read_text() == "step\n0\n"
    assert run_dir.csv_sizes() == {"history.csv": 0, "steps.csv": 7, "grad_norms.csv": 0}


def test_another_worker_writes_to_a_temporary_folder_and_reads_the_chiefs_backup(tmp_path):
    worker = RunDirectory.choose(tmp_path / "run", tmp_path / "saved", name="x", chief=False)
    assert worker.path != tmp_path / "run" and worker.export_path is None
    assert worker.resume_file == tmp_path / "run" / BACKUP_FILE
    worker.prepare(fresh=True)
    worker.write_config({"command": "keras-aesam train"})
    assert worker.export(_tiny_model()) is None
    worker.close()
    assert not worker.path.exists() and not (tmp_path / "run").exists()


def test_config_json_is_written_whole(tmp_path):
    run_dir = RunDirectory.choose(tmp_path / "run", None, name="x")
    run_dir.prepare(fresh=True)
    run_dir.write_config({"lr": np.float32(0.25), "run_dir": run_dir.path})
    assert json.loads(run_dir.file("config.json").read_text()) == {"lr": 0.25, "run_dir": str(run_dir.path)}
    assert run_dir.read_config()["lr"] == 0.25


def test_the_default_name_has_the_time_it_was_made(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_dir = RunDirectory.choose(None, tmp_path / "saved",
                                  name=RunDirectory.default_name("fashion_mnist", "Small-CNN", "ae_sam"))
    assert run_dir.path.parent.name == "runs"
    assert run_dir.path.name.startswith("fashion_mnist_smallcnn_ae_sam_")
    assert run_dir.export_path == tmp_path / "saved" / run_dir.path.name
