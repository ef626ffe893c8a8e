"""keras_aesam.cli.run_directory: a run's folder is checked before training and written only through RunDirectory."""

import json
import os

import numpy as np
import pytest

from keras_aesam.callbacks import read_training_state
from keras_aesam.cli import safety
from keras_aesam.cli.flags import BadInput
from keras_aesam.cli.run_directory import BACKUP_FILE, BACKUP_FILES, CSV_FILES, RUN_FILES, RunDirectory
from keras_aesam.cli.run_lock import LOCK_FILE


def _files(folder):
    """Every file under ``folder`` (relative, POSIX), the manifest and the lock left out."""
    found = set()
    for root, _, names in os.walk(folder):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
            if rel not in (safety.MANIFEST, LOCK_FILE):
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
    run_dir.close()
    assert not (run_dir.path / LOCK_FILE).exists()


def test_only_the_files_of_a_run_directory_have_a_path():
    with pytest.raises(ValueError, match="'notes.txt' is not a file of a run directory"):
        RunDirectory("somewhere").file("notes.txt")


def test_an_existing_run_needs_overwrite_and_overwriting_keeps_the_users_files(tmp_path):
    first = RunDirectory.choose(tmp_path / "run", tmp_path / "saved", name="x")
    first.prepare(fresh=True)
    first.write_config({"command": "keras-aesam train", "epochs": 2, "steps_per_epoch": 4})
    (first.path / "notes.txt").write_text("mine")
    first.close()  # as the process ends: its lock is freed
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
    assert worker.read_from / BACKUP_FILE == tmp_path / "run" / BACKUP_FILE
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


# ------------------------------------------------------------ relative paths


@pytest.mark.parametrize("where", ["same directory", "another directory", "absolute"])
def test_resume_overwrite_and_export_read_the_manifest_wherever_they_run(tmp_path, monkeypatch, where):
    """A run written as ``runs/e`` (relative) is the same run for every later command."""
    (tmp_path / "project").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "project")
    first = RunDirectory.choose("runs/e", "saved", name="x")
    first.prepare(fresh=True)
    first.write_config({"command": "keras-aesam train", "epochs": 2, "steps_per_epoch": 4})
    for name in CSV_FILES:
        first.file(name).write_text("step\n")
    first.backup_file.write_bytes(b"state")
    first.export(_tiny_model())
    first.close()
    (tmp_path / "project/runs/e/notes.txt").write_text("mine")
    output, export_dir = {"same directory": ("runs/e", "saved"),
                          "another directory": ("../project/runs/e", "../project/saved"),
                          "absolute": (tmp_path / "project/runs/e", tmp_path / "project/saved")}[where]
    if where == "another directory":
        monkeypatch.chdir(tmp_path / "elsewhere")
    RunDirectory.choose(output, export_dir, name="x", resume=True).close()  # no file refused
    again = RunDirectory.choose(output, export_dir, name="x", overwrite=True)
    again.prepare(fresh=True)
    assert _files(again.path) == {"notes.txt"} and not again.export_path.exists()
    again.close()


# ------------------------------------------------------------ the backups


def _state_model():
    import keras

    model = _tiny_model()
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="mse")
    model.optimizer.build(model.trainable_variables)
    return model


def test_backup_files_are_the_generations_save_training_state_keeps():
    from keras_aesam.callbacks import BACKUP_GENERATIONS, backup_generations

    assert tuple(backup_generations(BACKUP_FILE)) == BACKUP_FILES and len(BACKUP_FILES) == BACKUP_GENERATIONS


def test_a_backup_is_written_whole_then_rotated_keeping_the_previous_generation(tmp_path):
    from keras_aesam.callbacks import save_training_state

    run_dir = RunDirectory.choose(tmp_path / "run", None, name="x")
    run_dir.prepare(fresh=True)
    model = _state_model()
    for step in (3, 6, 8):
        save_training_state(model, run_dir.backup_file, {"step": step})
    assert [read_training_state(run_dir.path / n)[0]["step"] for n in BACKUP_FILES] == [8, 6]
    assert sorted(p.name for p in (run_dir.path / "backup").iterdir()) == ["state.1.npz", "state.npz"]
    assert set(BACKUP_FILES) <= set(safety.written(run_dir.path))  # both may be replaced and removed
    run_dir.complete()
    assert not (run_dir.path / "backup").exists()
    run_dir.close()


def test_a_failed_backup_write_names_its_file_and_leaves_the_backups_intact(tmp_path, monkeypatch):
    import errno

    from keras_aesam import callbacks

    path = tmp_path / "backup" / "state.npz"
    path.parent.mkdir()
    model = _state_model()
    for step in (3, 6):
        callbacks.save_training_state(model, path, {"step": step})

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(callbacks.os, "fsync", full)
    with pytest.raises(OSError) as info:
        callbacks.save_training_state(model, path, {"step": 9})
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path) + ".tmp"
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.1.npz", "state.npz"]
    assert [read_training_state(path.parent / n)[0]["step"] for n in ("state.npz", "state.1.npz")] == [6, 3]


def test_a_damaged_backup_falls_back_to_the_previous_generation_saying_which(tmp_path):
    import io

    from keras_aesam.callbacks import DamagedBackup, save_training_state

    run_dir = RunDirectory.choose(tmp_path / "run", None, name="x")
    run_dir.prepare(fresh=True)
    model = _state_model()
    for step in (3, 6):
        save_training_state(model, run_dir.backup_file, {"step": step, "steps_per_epoch": 4})
    data = run_dir.backup_file.read_bytes()
    run_dir.backup_file.write_bytes(data[: len(data) // 2])
    said = io.StringIO()
    assert run_dir.load_backup(_state_model(), stream=said)["step"] == 3
    assert said.getvalue() == (f"keras-aesam: backup {str(run_dir.backup_file)!r} is damaged (File is not a zip "
                               f"file): resuming from the previous backup {run_dir.path / BACKUP_FILES[1]} "
                               "(step 3)\n")
    from keras_aesam.cli.run_directory import backup_meta

    assert backup_meta(run_dir.path)["step"] == 3
    older = run_dir.path / BACKUP_FILES[1]
    raw = bytearray(older.read_bytes())
    raw[len(raw) // 3] ^= 0xFF  # one flipped byte inside an array: the CRC check finds it
    older.write_bytes(bytes(raw))
    with pytest.raises(DamagedBackup, match=r"no intact backup in .*state.npz' is damaged \(File is not a zip "
                                            r"file\); backup .*state.1.npz' is damaged .*start the run again "
                                            "with --overwrite"):
        run_dir.load_backup(_state_model())
    assert backup_meta(run_dir.path) is None
    run_dir.close()
