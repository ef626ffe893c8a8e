"""``keras-aesam train --strategy``: several devices and several worker processes.

End to end, in subprocesses (the CPU split and the multi-worker collectives are
set up when TensorFlow starts): the MLP (no BatchNorm, no Dropout, so nothing is
per replica) on 512 Fashion-MNIST examples, 2 epochs of 8 global batches of 64,
trained on one device, on 2 logical CPU devices (mirrored), and by 2 worker
processes on 127.0.0.1 (multi-worker), once straight through and once with a
worker killed in the middle of epoch 2 and both restarted with ``--resume``.
"""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from keras_aesam import cli
from test_distribute import communicate_all, free_ports

FLAGS = [
    "--network", "mlp", "--train-size", "512", "--batch-size", "64", "--epochs", "2", "--eval-batches", "2",
    "--grad-norm-batches", "2", "--backup-steps", "3", "--no-plots",
]
STEPS = 16  # 2 epochs x 512 / 64
TIMEOUT = 900

# Tolerance of "ends like one device" (float32). The runs compute the same
# real-number function and differ in the order of float32 additions only: one
# device sums 64 per-sample gradients, each replica 32 and the all-reduce the two
# halves (the ‖g‖² the policy reads and the perturbation use the all-reduced
# gradient, sync_perturbation=True). Two orders of n terms differ by at most
# 2·γ(n-1)·Σ|terms|, γ(k) = k·u/(1-k·u), u = 2^-24: 2·63·2^-24 ≈ 7.5e-6 of the
# per-sample gradients' scale G per step. SGD (lr 0.1, momentum 0.9) turns a
# gradient error into at most lr/(1-0.9) = 1× that error in the weights, summed
# over the 16 steps: ≤ 16·7.5e-6·G ≈ 1.2e-4·G. G ≤ 1 here (softmax minus one-hot
# times pixels in [0, 1] and ReLU activations of unit scale), compared with each
# tensor's largest |w| (≈ 0.06 at the Glorot start of the 512-wide kernels, the
# biases grow to the same order): ≈ 2e-3; feedback through later steps and SAM's
# normalised perturbation get a further 5× allowance: 1e-2. A wrong step (a batch
# seen twice or skipped, a missing 1/replicas, a perturbation per replica) moves
# the weights by O(lr·g) / |w| ≈ 1 relative: two orders of magnitude above it;
# measured here: 4e-7 for both mirrored and two workers.
RTOL = 1e-2


def _fashion_mnist_available():
    from keras_aesam import data

    dirs = [data._keras_cache_dir(), data.DEBIAN_FASHION_MNIST_DIR]
    return any(not data._missing_files(d) for d in dirs)


pytestmark = pytest.mark.skipif(not _fashion_mnist_available(), reason="Fashion-MNIST files not available offline")


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env.update(TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1", **extra)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _start(root, *extra, **env):
    argv = [sys.executable, "-m", "keras_aesam.cli", "train", *FLAGS, *extra,
            "--output", str(root / "run"), "--export-dir", str(root / "saved")]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(**env))


def _finish(procs):
    """Waits for every process (bounded); their (returncode, stdout, stderr)."""
    return communicate_all(procs, TIMEOUT, f"keras-aesam train did not finish within {TIMEOUT} s (hang?)")


def _start_workers(root, *extra):
    """The two processes of a 2-worker cluster on 127.0.0.1 (worker 0 is the chief)."""
    workers = [f"127.0.0.1:{p}" for p in free_ports(2)]
    (root / "tmp").mkdir(parents=True, exist_ok=True)
    return [
        _start(root, "--strategy", "multi-worker", *extra, TMPDIR=str(root / "tmp"),
               TF_CONFIG=json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}}))
        for i in range(2)
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("strategy")
    # The one-device reference, the mirrored run and the uninterrupted cluster side by side.
    procs = {"one": [_start(root / "one", "--strategy", "one")],
             "mirrored": [_start(root / "mirrored", "--strategy", "mirrored", "--cpu-devices", "2")],
             "workers": _start_workers(root / "workers")}
    killed = _start_workers(root / "killed")
    # Killed once the chief's backup is inside epoch 2 (steps 9, 12, 15 are backed up);
    # the other worker then waits for its peer in the all-reduce: it goes too, and both restart.
    backup_step, deadline = None, time.monotonic() + TIMEOUT
    while time.monotonic() < deadline and all(p.poll() is None for p in killed):
        meta = cli._backup_meta(root / "killed" / "run")
        if meta is not None and meta["step"] >= 9:
            backup_step = meta["step"]
            break
        time.sleep(0.01)
    killed[1].send_signal(signal.SIGKILL)
    killed[0].send_signal(signal.SIGKILL)
    for proc in killed:
        proc.communicate(timeout=60)
    resumed = _finish(_start_workers(root / "killed", "--resume"))
    results = {name: _finish(p) for name, p in procs.items()}
    return {"root": root, "backup_step": backup_step, "resumed": resumed, **results}


def _weights(run_dir):
    import keras

    import keras_aesam  # noqa: F401  (registers the model class)

    return [w.numpy() for w in keras.models.load_model(run_dir / "model.keras").inner.weights]


def _max_rel_diff(a, b):
    """Largest |a - b| of each tensor relative to that tensor's largest |b|."""
    return max(float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-12)) for x, y in zip(a, b))


def _sam_column(run_dir):
    with open(run_dir / "steps.csv", newline="") as f:
        return [(int(r["step"]), r["sam"]) for r in csv.DictReader(f)]


def _assert_ran(results):
    for code, _out, err in results:
        assert code == 0, err[-3000:]


def _assert_one_run_directory(root):
    assert sorted(p.name for p in root.iterdir() if p.name != "tmp") == ["run", "saved"]
    assert len(list((root / "saved").iterdir())) == 1  # one export


def _assert_like_one_device(runs, root):
    reference = runs["root"] / "one" / "run"
    assert _sam_column(root / "run") == _sam_column(reference)  # the same SAM steps, every step once
    assert _max_rel_diff(_weights(root / "run"), _weights(reference)) < RTOL


def test_mirrored_on_two_cpu_devices_ends_like_one_device(runs):
    _assert_ran(runs["one"] + runs["mirrored"])
    assert "(1 replica x 64)" in runs["one"][0][1]
    assert "(2 replicas x 32)" in runs["mirrored"][0][1]  # --batch-size is the global batch
    config = json.loads((runs["root"] / "mirrored" / "run" / "config.json").read_text())
    assert (config["strategy"], config["replicas"], config["sync_perturbation"]) == ("MirroredStrategy", 2, True)
    _assert_like_one_device(runs, runs["root"] / "mirrored")
    _assert_one_run_directory(runs["root"] / "mirrored")


def test_two_workers_write_one_run_directory_and_match_one_device(runs):
    root = runs["root"] / "workers"
    _assert_ran(runs["workers"])
    _assert_one_run_directory(root)
    assert not list((root / "tmp").glob("keras-aesam-worker-*"))  # the other worker cleaned up
    _assert_like_one_device(runs, root)
    accuracies = [out.strip().splitlines()[-1].split(" | ")[0] for _, out, _ in runs["workers"]]
    assert accuracies[0] == accuracies[1]  # both evaluated the same weights


def test_killing_a_worker_mid_run_and_restarting_both_resumes(runs):
    root = runs["root"] / "killed"
    assert runs["backup_step"] is not None and 9 <= runs["backup_step"] < STEPS
    _assert_ran(runs["resumed"])
    assert f"resuming at step {runs['backup_step']}" in runs["resumed"][0][1]
    _assert_one_run_directory(root)
    _assert_like_one_device(runs, root)
    assert not (root / "run" / cli.BACKUP_FILE).exists()


@pytest.mark.parametrize("argv, message", [
    (["--strategy", "multi-worker"], "TF_CONFIG, which is not set"),
    (["--cpu-devices", "0"], "--cpu-devices must be >= 1, got 0"),
    (["--strategy", "multi-worker", "--cpu-devices", "2"], "--cpu-devices is for --strategy mirrored"),
])
def test_bad_device_flags_are_refused_before_training(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        cli.run(["train", *argv, "--output", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
