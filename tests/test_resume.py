"""Resuming ``keras-aesam train``: killed or stopped runs continue exactly.

End to end, in subprocesses (signals need a process of their own): one
uninterrupted run, one killed with SIGKILL in the middle of an epoch and
resumed, one stopped with SIGTERM and resumed. Settings are tiny (1024
Fashion-MNIST examples, 8 steps per epoch, 2 epochs, a backup every 3 steps).
"""

import csv
import json
import os
import pty
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from keras_aesam import cli

STEPS_PER_EPOCH = 8
EPOCHS = 2
TRAIN_FLAGS = [
    "--train-size", "1024", "--epochs", str(EPOCHS), "--eval-batches", "2", "--grad-norm-epochs", "0,1,2",
    "--grad-norm-batches", "2", "--backup-steps", "3", "--no-plots",
]


def _fashion_mnist_available():
    from keras_aesam import data

    dirs = [data._keras_cache_dir(), data.DEBIAN_FASHION_MNIST_DIR]
    return any(not data._missing_files(d) for d in dirs)


def _env():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _command(run_dir, *extra):
    return [sys.executable, "-m", "keras_aesam.cli", "train", *extra, "--output", str(run_dir),
            "--export-dir", str(run_dir.parent / "saved")]


def _backup_meta(run_dir):
    return cli._backup_meta(Path(run_dir))


def _run_in_terminal(argv):
    """Runs ``argv`` with stdout on a pseudo-terminal; returns (code, everything it printed)."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(argv, stdout=follower, stderr=follower, env=_env())
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the terminal closed: the process ended
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    proc.wait(timeout=600)
    return proc.returncode, b"".join(chunks).decode("utf-8", "replace")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if not _fashion_mnist_available():
        pytest.skip("Fashion-MNIST files not available offline")
    root = tmp_path_factory.mktemp("resume")

    def start(name):
        return subprocess.Popen(_command(root / name, *TRAIN_FLAGS), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=_env())

    # Side by side: the uninterrupted reference; one run killed (SIGKILL) and one
    # stopped (SIGTERM), each once a backup inside epoch 2 exists (steps 9, 12, 15 are
    # backed up, 16 ends the epoch), so both stop strictly inside epoch 2. (Signalling
    # once the end-of-epoch-1 backup at step 8 exists raced: a signal landing before
    # step 9 began stopped the run at the epoch boundary.)
    procs = {name: start(name) for name in ("reference", "killed", "termed")}
    triggers = {"killed": (signal.SIGKILL, lambda m: m["step"] >= STEPS_PER_EPOCH + 1),
                "termed": (signal.SIGTERM, lambda m: m["step"] >= STEPS_PER_EPOCH + 1)}
    deadline = time.monotonic() + 900
    while triggers and time.monotonic() < deadline:
        for name, (signum, when) in list(triggers.items()):
            meta = _backup_meta(root / name)
            if procs[name].poll() is not None or (meta is not None and when(meta)):
                if procs[name].poll() is None:
                    procs[name].send_signal(signum)
                del triggers[name]
        time.sleep(0.01)
    finished = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=900)
        finished[name] = (proc.returncode, out, err)
    metas = {name: _backup_meta(root / name) for name in ("killed", "termed")}
    # Both resumed side by side; the second prints to a terminal: Keras's live progress bar.
    resume_kill = subprocess.Popen(_command(root / "killed", "--resume"), stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, env=_env())
    resumed_term = _run_in_terminal(_command(root / "termed", "--resume"))
    out, err = resume_kill.communicate(timeout=900)
    return {
        "root": root,
        "reference": finished["reference"],
        "killed": finished["killed"], "killed_meta": metas["killed"], "killed_pid": procs["killed"].pid,
        "resumed_kill": subprocess.CompletedProcess(resume_kill.args, resume_kill.returncode, out, err),
        "termed": finished["termed"], "termed_meta": metas["termed"], "resumed_term": resumed_term,
    }


def _load(run_dir):
    import keras

    import keras_aesam  # noqa: F401  (registers the model class)

    return keras.models.load_model(run_dir / "model.keras")


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _assert_same_run(reference_dir, resumed_dir):
    # Exact equality, no tolerance: the resumed process applies the same float32
    # operations to the same batches in the same order, from bit-identical state
    # (weights, BatchNorm statistics, momenta, policy EMAs, dropout seed states,
    # step counters), and TensorFlow's CPU kernels are deterministic for a given
    # machine and thread count. A difference would be a resume bug, not round-off.
    ref, res = _load(reference_dir), _load(resumed_dir)
    assert [w.path for w in ref.weights] == [w.path for w in res.weights]
    for a, b in zip(ref.weights, res.weights):  # weights, BN statistics, policy state (µ, σ², t, T)
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    assert len(ref.optimizer.variables) == len(res.optimizer.variables) > 1
    for a, b in zip(ref.optimizer.variables, res.optimizer.variables):  # iterations, momenta
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    assert ref.policy_state == res.policy_state
    ref_results = json.loads((reference_dir / "config.json").read_text())["results"]
    res_results = json.loads((resumed_dir / "config.json").read_text())["results"]
    for key in ("test_accuracy", "test_loss", "sam_steps", "steps", "sam_fraction"):
        assert ref_results[key] == res_results[key], key
    # The logs: every step once, no gap, no duplicate, and the same values.
    steps = _rows(resumed_dir / "steps.csv")
    assert [int(r["step"]) for r in steps] == list(range(EPOCHS * STEPS_PER_EPOCH))
    assert steps == _rows(reference_dir / "steps.csv")
    history = _rows(resumed_dir / "history.csv")
    assert [int(r["epoch"]) for r in history] == list(range(EPOCHS))
    assert history == _rows(reference_dir / "history.csv")
    assert _rows(resumed_dir / "grad_norms.csv") == _rows(reference_dir / "grad_norms.csv")
    assert not (resumed_dir / cli.BACKUP_FILE).exists()  # a finished run keeps model.keras, not the backup


def test_the_uninterrupted_run_prints_one_line_per_epoch_when_not_on_a_terminal(runs):
    code, out, err = runs["reference"]
    assert code == 0, err
    epoch_lines = [line for line in out.splitlines() if line.startswith(f"{STEPS_PER_EPOCH}/{STEPS_PER_EPOCH} - ")]
    assert len(epoch_lines) == EPOCHS
    assert "\r" not in out and "━" not in out  # no live bar in a log file


def test_a_run_killed_mid_epoch_resumes_to_the_uninterrupted_result(runs):
    code, _, _ = runs["killed"]
    assert code == -signal.SIGKILL
    meta = runs["killed_meta"]
    assert meta["epoch"] == 1 and 0 < meta["batch"] < STEPS_PER_EPOCH  # the backup is inside epoch 2
    resumed = runs["resumed_kill"]
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming at step {meta['step']} of {EPOCHS * STEPS_PER_EPOCH}" in resumed.stdout
    # The killed process's lock is stale: taken over, naming it.
    assert (f"keras-aesam: took over the stale lock of {runs['root'] / 'killed'}: its holder, keras-aesam train "
            f"(pid {runs['killed_pid']} on host {socket.gethostname()}, since ") in resumed.stderr
    config = json.loads((runs["root"] / "killed" / "config.json").read_text())
    assert [r["from_step"] for r in config["resumed"]] == [meta["step"]]
    _assert_same_run(runs["root"] / "reference", runs["root"] / "killed")


def test_sigterm_writes_the_backup_and_prints_the_resume_command(runs):
    code, _, err = runs["termed"]
    assert code == 128 + signal.SIGTERM
    meta = runs["termed_meta"]
    assert STEPS_PER_EPOCH < meta["step"] < EPOCHS * STEPS_PER_EPOCH  # written at the step it stopped
    assert f"backup at step {meta['step']} of {EPOCHS * STEPS_PER_EPOCH}" in err
    run_dir = runs["root"] / "termed"
    assert err.strip().splitlines()[-1].strip() == f"keras-aesam train --resume --output {run_dir}"
    code, printed = runs["resumed_term"]
    assert code == 0, printed
    _assert_same_run(runs["root"] / "reference", run_dir)


def test_a_terminal_gets_the_live_progress_bar(runs):
    code, printed = runs["resumed_term"]
    assert code == 0
    assert "━" in printed and "\r" in printed  # Keras's bar, redrawn in place


# --------------------------------------------------------- refusals, in process


def _fake_run_dir(tmp_path, argv, results=None):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = {"command": "keras-aesam train", "argv": argv, "epochs": 2, "steps_per_epoch": 8}
    if results is not None:
        config["results"] = results
    (run_dir / "config.json").write_text(json.dumps(config))
    return run_dir


def _cli(argv, capsys):
    try:
        cli.main(argv)
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err.strip().splitlines()[-1]


def test_resume_refuses_flags_that_differ_from_the_runs_config(tmp_path, capsys):
    run_dir = _fake_run_dir(tmp_path, ["train", "--epochs", "2", "--train-size", "1024", "--output", "x"])
    code, line = _cli(["train", "--resume", "--output", str(run_dir), "--epochs", "3", "--lr", "0.1"], capsys)
    assert code == 2
    assert "--resume: flags differ from" in line
    assert "--epochs 3 (the run has 2)" in line and "--lr 0.1 (the run has None)" in line


def test_resume_needs_an_unfinished_run_of_ours(tmp_path, capsys):
    code, line = _cli(["train", "--resume"], capsys)
    assert code == 2 and "--resume needs --output RUN_DIR" in line
    code, line = _cli(["train", "--resume", "--output", str(tmp_path)], capsys)
    assert code == 2 and "holds no keras-aesam train run" in line
    run_dir = _fake_run_dir(tmp_path, ["train"], results={"test_accuracy": 0.5})
    code, line = _cli(["train", "--resume", "--output", str(run_dir)], capsys)
    assert code == 2 and "already finished (test accuracy 0.5000); nothing to resume" in line
    code, line = _cli(["train", "--resume", "--overwrite", "--output", str(run_dir)], capsys)
    assert code == 2 and "--resume and --overwrite exclude each other" in line


def test_the_same_command_on_an_unfinished_run_points_to_resume(tmp_path, capsys):
    run_dir = _fake_run_dir(tmp_path, ["train"])
    code, line = _cli(["train", "--output", str(run_dir)], capsys)
    assert code == 2
    assert "holds an unfinished run (last backup at step 0 of 16); pass --resume to continue it" in line


def test_backup_steps_must_not_be_negative(tmp_path, capsys):
    code, line = _cli(["train", "--backup-steps", "-1", "--output", str(tmp_path / "r")], capsys)
    assert code == 2 and "--backup-steps must be >= 0" in line


def test_a_run_killed_before_its_first_backup_starts_over_on_resume(tmp_path):
    """No backup yet: --resume starts from step 0 (the seeds rebuild the start) and cuts the logs back."""
    import contextlib
    import io
    import shutil

    import keras

    from keras_aesam.cli import safety

    if not _fashion_mnist_available():
        pytest.skip("Fashion-MNIST files not available offline")
    flags = ["--train-size", "256", "--epochs", "1", "--eval-batches", "1", "--grad-norm-epochs", "0",
             "--grad-norm-batches", "1", "--quiet", "--no-plots", "--export-dir", str(tmp_path / "saved")]
    with contextlib.redirect_stdout(io.StringIO()):
        reference = cli.run(["train", *flags, "--output", str(tmp_path / "reference")])
    # What a kill inside the first epoch leaves: config.json without results, the
    # epoch-0 ‖g‖² samples, and no backup.
    run_dir = tmp_path / "killed"
    run_dir.mkdir()
    config = json.loads((tmp_path / "reference" / "config.json").read_text())
    config = {k: v for k, v in config.items() if k not in ("results", "finished")}
    (run_dir / "config.json").write_text(json.dumps(config))
    shutil.copy(tmp_path / "reference" / "grad_norms.csv", run_dir / "grad_norms.csv")
    safety.record(run_dir, run_dir / "config.json", run_dir / "grad_norms.csv")
    with contextlib.redirect_stdout(io.StringIO()):
        resumed = cli.run(["train", "--resume", "--output", str(run_dir)])
    assert resumed["resumed_from_step"] == 0
    for key in ("test_accuracy", "test_loss", "sam_steps", "steps"):
        assert resumed[key] == reference[key], key
    for name in ("steps.csv", "grad_norms.csv", "history.csv"):  # each row once
        assert _rows(run_dir / name) == _rows(tmp_path / "reference" / name), name
    a = keras.models.load_model(tmp_path / "reference" / "model.keras")
    b = keras.models.load_model(run_dir / "model.keras")
    for x, y in zip(a.weights, b.weights):  # exact, for the reason given in _assert_same_run
        np.testing.assert_array_equal(x.numpy(), y.numpy(), err_msg=x.path)
