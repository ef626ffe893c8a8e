"""What a real machine does to a run: a full disk, a damaged backup, a second process, relative paths.

End to end where a process of its own matters (``keras-aesam train`` in
subprocesses started in a chosen working directory, with ``--output`` given
relative to it): a run whose disk fills up (a small tmpfs mounted in the test's
folder, filled while the run is stopped with SIGSTOP) stops with one line and
exit code 74, its backups intact; with space freed and its newest backup cut to
half its size, ``--resume`` from another working directory continues from the
previous backup generation and ends bit-for-bit where an uninterrupted run ends.
The lock and the bench run in this process against a holder process.
"""

import errno
import io
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from keras_aesam import bench, cli
from keras_aesam.callbacks import read_training_state
from keras_aesam.cli import run_lock, safety
from keras_aesam.cli.run_directory import BACKUP_FILES, DISK_FULL_EXIT, backup_meta
from test_resume import TRAIN_FLAGS, _assert_same_run, _env, _fashion_mnist_available

TIMEOUT = 900


def _train(cwd, output, *extra, export_dir="saved"):
    """``keras-aesam train`` started in ``cwd`` (a Popen; output as given, relative to ``cwd``)."""
    argv = [sys.executable, "-m", "keras_aesam.cli", "train", *TRAIN_FLAGS, *extra, "--output", str(output)]
    argv += [] if export_dir is None else ["--export-dir", str(export_dir)]
    return subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())


def _fill(folder):
    """Writes ``folder/filler`` until the file system holding it is full."""
    fd = os.open(Path(folder) / "filler", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for size in (1 << 20, 1 << 12, 1):
            chunk = b"\0" * size
            try:
                while True:
                    os.write(fd, chunk)
            except OSError as err:
                assert err.errno == errno.ENOSPC
    finally:
        os.close(fd)


def _mount_tmpfs(folder, size):
    folder.mkdir(parents=True)
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                       check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return True


@pytest.fixture(scope="module")
def full_disk(tmp_path_factory):
    """A run on a disk that fills up in epoch 2, then resumed from another working directory.

    ``project/runs`` is a 48 MB tmpfs (a run's backups take 2 x 5.4 MB plus the
    new one being written); ``--output runs/e`` relative to ``project``.
    """
    if not _fashion_mnist_available():
        pytest.skip("Fashion-MNIST files not available offline")
    root = tmp_path_factory.mktemp("faults")
    project, elsewhere = root / "project", root / "elsewhere"
    elsewhere.mkdir()
    if not _mount_tmpfs(project / "runs", "48m"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        reference = _train(root, root / "reference", export_dir=root / "saved_reference")
        run = _train(project, "runs/e")
        run_dir = project / "runs" / "e"
        deadline = time.monotonic() + TIMEOUT
        while run.poll() is None and time.monotonic() < deadline:
            meta = backup_meta(run_dir)
            if meta is not None and meta["step"] >= 9:  # inside epoch 2 (8 steps per epoch)
                break
            time.sleep(0.01)
        run.send_signal(signal.SIGSTOP)  # nothing moves while the disk fills
        _fill(project / "runs")
        run.send_signal(signal.SIGCONT)
        out, err = run.communicate(timeout=TIMEOUT)
        failed = {"code": run.returncode, "out": out, "err": err,
                  "generations": [read_training_state(run_dir / name)[0]["step"] for name in BACKUP_FILES]}
        (project / "runs" / "filler").unlink()  # space is freed
        newest = run_dir / BACKUP_FILES[0]
        data = newest.read_bytes()
        newest.write_bytes(data[: len(data) // 2])  # and the newest backup is damaged
        resumed = _train(elsewhere, "../project/runs/e", "--resume", export_dir=None)  # the README's command
        out, err = resumed.communicate(timeout=TIMEOUT)
        ref_out, ref_err = reference.communicate(timeout=TIMEOUT)
        assert reference.returncode == 0, ref_err[-3000:]
        yield {"root": root, "project": project, "elsewhere": elsewhere, "run_dir": run_dir,
               "failed": failed, "resumed": (resumed.returncode, out, err)}
    finally:
        for proc in ("run", "reference", "resumed"):
            p = locals().get(proc)
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        subprocess.run(["umount", "-l", str(project / "runs")], capture_output=True, timeout=60)


def test_a_full_disk_stops_the_run_with_one_line_naming_the_file_and_exit_code_74(full_disk):
    failed = full_disk["failed"]
    assert failed["code"] == DISK_FULL_EXIT == 74, failed["err"][-3000:]
    assert "Traceback" not in failed["err"]
    errors = [line for line in failed["err"].splitlines() if "error:" in line]
    assert errors == [
        "keras-aesam train: error: the disk is full (writing runs/e/backup/state.npz.tmp: No space left on "
        "device); free space, then continue with: keras-aesam train --resume --output runs/e"]


def test_a_full_disk_leaves_both_backup_generations_intact(full_disk):
    newest, previous = full_disk["failed"]["generations"]
    assert 9 <= newest and previous < newest  # read back whole (every array, CRC checked)
    assert not (full_disk["run_dir"] / "backup" / "state.npz.tmp").exists()  # the partial file is gone
    assert not (full_disk["run_dir"] / run_lock.LOCK_FILE).exists()  # the lock went with the process


def test_a_damaged_backup_resumes_from_the_previous_generation_saying_so(full_disk):
    code, out, err = full_disk["resumed"]
    assert code == 0, err[-3000:]
    previous = full_disk["failed"]["generations"][1]
    assert (f"keras-aesam: backup '../project/runs/e/backup/state.npz' is damaged (File is not a zip file): "
            f"resuming from the previous backup ../project/runs/e/backup/state.1.npz (step {previous})") in err
    assert f"resuming at step {previous} of 16" in out


def test_after_space_is_freed_resume_ends_where_an_uninterrupted_run_ends(full_disk):
    _assert_same_run(full_disk["root"] / "reference", full_disk["run_dir"])
    assert not any((full_disk["run_dir"] / name).exists() for name in BACKUP_FILES)
    assert (full_disk["project"] / "saved" / "e" / "saved_model.pb").is_file()  # where the run's own export goes


def test_plot_and_overwrite_read_the_resumed_runs_manifest_from_another_directory(full_disk, monkeypatch):
    monkeypatch.chdir(full_disk["elsewhere"])
    manifest = (full_disk["run_dir"] / safety.MANIFEST).read_text().splitlines()
    assert "./config.json" in manifest and not any("runs/e" in line for line in manifest)
    plots = cli.run(["plot", "../project/runs/e"])["plots"]
    assert plots and all(Path(p).is_file() for p in plots)
    run_dir = cli.RunDirectory.choose("../project/runs/e", "../project/saved", name="x", overwrite=True)
    try:
        (full_disk["run_dir"] / "notes.txt").write_text("mine")
        run_dir.prepare(fresh=True)
        left = {p.name for p in full_disk["run_dir"].iterdir()} - {run_lock.LOCK_FILE, safety.MANIFEST}
        assert left == {"notes.txt", "backup"}  # the user's file; the folder prepare made again
        assert not run_dir.export_path.exists()  # the export: every file of it was listed
    finally:
        run_dir.close()


# ---------------------------------------------------------------- the lock

_HOLDER = textwrap.dedent("""
    import importlib.util, sys, time
    spec = importlib.util.spec_from_file_location("run_lock", sys.argv[1])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.RunLock.acquire(sys.argv[2], sys.argv[3])
    print("held", flush=True)
    time.sleep(600)
""")


@pytest.fixture
def holder():
    """``hold(folder)``: a process (without TensorFlow) that takes ``folder``'s lock and keeps it."""
    procs = []

    def hold(folder, command="keras-aesam train"):
        proc = subprocess.Popen([sys.executable, "-c", _HOLDER, run_lock.__file__, str(folder), command],
                                stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield hold
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_a_folder_held_by_a_live_process_is_refused_naming_its_pid_and_host(tmp_path, holder):
    proc = holder(tmp_path / "run")
    with pytest.raises(run_lock.Locked, match=rf"is in use by keras-aesam train \(pid {proc.pid} on host "
                                              rf"{socket.gethostname()}, since "):
        run_lock.RunLock.acquire(tmp_path / "run", "keras-aesam train")


def test_a_lock_left_by_a_killed_process_is_taken_over_saying_so(tmp_path, holder):
    proc = holder(tmp_path / "run")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    said = io.StringIO()
    lock = run_lock.RunLock.acquire(tmp_path / "run", "keras-aesam train", stream=said)
    try:
        assert f"took over the stale lock of {tmp_path / 'run'}: its holder, keras-aesam train (pid {proc.pid} " \
               f"on host {socket.gethostname()}" in said.getvalue()
        assert "no longer runs" in said.getvalue()
        assert run_lock.holder(tmp_path / "run")["pid"] == os.getpid()
    finally:
        lock.release()
    assert not (tmp_path / "run" / run_lock.LOCK_FILE).exists()


def test_a_lock_written_on_another_host_is_refused_while_it_is_there(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / run_lock.LOCK_FILE).write_text(json.dumps(
        {"pid": 1, "host": "another-host", "command": "keras-aesam train", "started": "2026-01-01T00:00:00"}))
    with pytest.raises(run_lock.Locked, match=r"pid 1 on host another-host.*delete .*\.keras-aesam-lock"):
        run_lock.RunLock.acquire(tmp_path / "run", "keras-aesam train")


def test_a_second_train_is_refused_and_its_overwrite_deletes_nothing(tmp_path, holder):
    """The issue's case: a second process's --overwrite on a folder another one trains in."""
    run_dir = tmp_path / "runs" / "x"
    run_dir.mkdir(parents=True)
    for name in ("config.json", "steps.csv"):
        (run_dir / name).write_text("{}" if name == "config.json" else "step\n")
    safety.record(run_dir, run_dir / "config.json", run_dir / "steps.csv")
    proc = holder(run_dir)
    second = subprocess.run([sys.executable, "-m", "keras_aesam.cli", "train", "--overwrite",
                             "--output", "runs/x", "--export-dir", "saved"],
                            cwd=tmp_path, capture_output=True, text=True, env=_env(), timeout=TIMEOUT)
    assert second.returncode == run_lock.LOCKED_EXIT == 75, second.stderr[-3000:]
    assert (f"keras-aesam train: error: 'runs/x' is in use by keras-aesam train (pid {proc.pid} on host "
            f"{socket.gethostname()}") in second.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(
        [".keras-aesam-files", run_lock.LOCK_FILE, "config.json", "steps.csv"])


# ---------------------------------------------------------------- the bench


def _body(spec, out):
    frac = 1.0 if spec["method"] == "sam" else 0.0
    return {"test_accuracy": 0.5, "sam_fraction": frac, "steps": 8, "sam_steps": int(8 * frac),
            "grad_evals": 8 + int(8 * frac), "pass_equivalents": 8 + 8 * frac, "step_ms": 100.0,
            "epoch_seconds_after_first": 1.0, "first_epoch_seconds": 3.0, "timed_steps": 8}


def _bench(argv_output, *extra):
    return bench.main(["--methods", "erm,sam", "--seeds", "1", "--no-peer", "--isolation", "none",
                       "--output", argv_output, *extra])


def test_a_damaged_result_file_is_reported_and_its_run_done_again(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(bench, "_run_method", lambda spec, out: calls.append(spec["run_id"]) or _body(spec, out))
    monkeypatch.chdir(tmp_path)
    assert _bench("out") == 0
    result = tmp_path / "out" / "runs" / "clean_s0_sam.json"
    result.write_text(result.read_text()[:40])  # cut short, as a crash of the storage layer leaves it
    calls.clear()
    capsys.readouterr()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # the same bench, from another working directory
    assert _bench("../out") == 0
    assert calls == ["clean_s0_sam"]
    console = capsys.readouterr().out
    assert "(1 already finished, skipped)" in console
    assert "  note: damaged result file ../out/runs/clean_s0_sam.json (" in console
    assert ": run clean_s0_sam is run again" in console
    meta = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert meta["sessions"][-1]["redone_damaged_results"] == ["clean_s0_sam"]
    assert json.loads(result.read_text())["test_accuracy"] == 0.5


def test_bench_fresh_and_resume_read_the_manifest_from_another_directory(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(bench, "_run_method", lambda spec, out: calls.append(spec["run_id"]) or _body(spec, out))
    monkeypatch.chdir(tmp_path)
    assert _bench("out") == 0
    mine = tmp_path / "out" / "runs" / "my_notes.txt"
    mine.write_text("mine")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    calls.clear()
    assert _bench(str(tmp_path / "out")) == 0 and calls == []  # resumed: both runs finished
    assert _bench("../out", "--fresh") == 0 and len(calls) == 2  # --fresh: done again
    assert mine.read_text() == "mine"


def test_a_full_disk_stops_the_bench_with_one_line_keeping_the_finished_runs(tmp_path, monkeypatch, capsys):
    def fake(spec, out):
        if spec["method"] == "sam":
            raise OSError(errno.ENOSPC, "No space left on device", str(Path(out) / "final" / "x.npz"))
        return _body(spec, out)

    monkeypatch.setattr(bench, "_run_method", fake)
    monkeypatch.chdir(tmp_path)
    assert _bench("out") == DISK_FULL_EXIT
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert errors == ["keras-aesam bench: error: the disk is full (writing out/final/x.npz: No space left on "
                      "device); the finished runs are kept: free space, then run the same command again"]
    assert [p.name for p in (tmp_path / "out" / "runs").glob("*.json")] == ["clean_s0_erm.json"]
    assert not (tmp_path / "out" / run_lock.LOCK_FILE).exists()


def test_two_benches_on_one_folder_the_second_is_refused(tmp_path, holder, monkeypatch, capsys):
    proc = holder(tmp_path / "out", "keras-aesam bench")
    monkeypatch.setattr(bench, "_run_method", _body)
    assert _bench(str(tmp_path / "out")) == run_lock.LOCKED_EXIT
    assert f"is in use by keras-aesam bench (pid {proc.pid} on host {socket.gethostname()}" \
        in capsys.readouterr().err
    assert not (tmp_path / "out" / "runs").exists()



def test_resume_without_an_intact_backup_ends_with_one_line_naming_each_file(tmp_path, capsys):
    if not _fashion_mnist_available():
        pytest.skip("Fashion-MNIST files not available offline")
    run_dir = tmp_path / "run"
    (run_dir / "backup").mkdir(parents=True)
    argv = ["train", "--train-size", "256", "--epochs", "1", "--eval-batches", "1", "--no-plots", "--output", "x",
            "--export-dir", str(tmp_path / "saved")]
    (run_dir / "config.json").write_text(json.dumps({"command": "keras-aesam train", "argv": argv}))
    (run_dir / BACKUP_FILES[0]).write_bytes(b"PK\x03\x04 cut short")
    (run_dir / BACKUP_FILES[1]).write_bytes(b"")
    safety.record(run_dir, run_dir / "config.json", run_dir / "backup", *(run_dir / n for n in BACKUP_FILES))
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--resume", "--output", str(run_dir)])
    assert info.value.code == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert errors == [
        f"keras-aesam train: error: --resume: no intact backup in {run_dir / 'backup'}: backup "
        f"'{run_dir / BACKUP_FILES[0]}' is damaged (File is not a zip file); backup '{run_dir / BACKUP_FILES[1]}' "
        "is damaged (No data left in file); start the run again with --overwrite"]


def test_a_bench_whose_disk_is_full_stops_with_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    """End to end with a worker process: a 160 kB tmpfs holds the session's files, not the initial weights."""
    if not _fashion_mnist_available():
        pytest.skip("Fashion-MNIST files not available offline")
    if not _mount_tmpfs(tmp_path / "bench", "160k"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        monkeypatch.chdir(tmp_path)
        code = bench.main(["--methods", "erm", "--seeds", "1", "--train-size", "256", "--epochs", "1",
                           "--test-batches", "2", "--no-peer", "--output", "bench"])
        assert code == DISK_FULL_EXIT
        errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        init = next((tmp_path / "bench" / "init").glob("*"), None)
        assert init is None  # the partial file was removed
        assert len(errors) == 1 and errors[0].startswith(
            "keras-aesam bench: error: the disk is full (writing bench/init/resnet8_28x28x1_10c_s0.npz.tmp: No "
            "space left on device); the finished runs are kept: free space, then run the same command again")
        assert not (tmp_path / "bench" / run_lock.LOCK_FILE).exists()
    finally:
        subprocess.run(["umount", "-l", str(tmp_path / "bench")], capture_output=True, timeout=60)
