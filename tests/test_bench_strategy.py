"""``keras-aesam bench --strategy``: the bench's runs on one device, mirrored over several, or on a cluster.

The MLP (no BatchNorm, no Dropout: nothing is per replica) under AE-SAM on 512
Fashion-MNIST examples, 2 epochs of 8 global batches of 64, benched on one
device and mirrored over 2 logical CPU devices, each in a worker process of its
own (``--isolation group``: the worker splits the CPU before its TensorFlow starts);
and by two ``keras-aesam bench --strategy multi-worker`` processes on 127.0.0.1,
each with its own ``TF_CONFIG``, run twice (the second time they resume).
"""

import contextlib
import csv
import json
import subprocess
import sys

import numpy as np
import pytest

from keras_aesam import bench
from keras_aesam.bench.worker import final_weights_path
from test_distribute import communicate_all, free_ports
from test_strategy import _env, _fashion_mnist_available, _max_rel_diff

FLAGS = [
    "--network", "mlp", "--methods", "ae_sam", "--seeds", "1", "--epochs", "2", "--train-size", "512",
    "--batch-size", "64", "--test-batches", "2", "--no-peer", "--isolation", "group", "--budget-minutes", "0",
]

# Tolerance of "ends like one device" (float32): the reasoning of keras-aesam
# train's test (tests/test_strategy.py) applies unchanged, as the bench trains
# the same network, batches, step count and optimizer (16 steps of 64 = 2 x 32,
# SGD lr 0.1 with momentum 0.9, cosine). The two runs differ only in the order
# of float32 additions: one device sums 64 per-sample gradients, each replica 32
# and the all-reduce the two halves; two orders of n terms differ by at most
# 2·γ(n-1)·Σ|terms|, γ(k) ≈ k·2^-24, so ≈ 7.5e-6·G per gradient entry (G ≤ 1, the
# per-sample gradients' scale), at most lr/(1-0.9) = 1x that in the weights per
# step: ≤ 1.2e-4 over 16 steps, ≈ 2e-3 of a tensor's largest |w| (≈ 0.06), times
# 5 for feedback through later steps and SAM's normalised perturbation: 1e-2. The
# L2 weight decay (1e-4) adds w·1e-4 computed alike on every replica. A wrong step
# (a batch skipped or seen twice, a missing 1/replicas, a per-replica
# perturbation) moves the weights by O(lr·g)/|w| ≈ 1 relative. Two workers of one
# CPU device each split the global batch the same way (32 + 32, all-reduced over
# the cluster), so the same bound holds for them.
RTOL = 1e-2
#: Bound on a cluster's bench (a hang is a failure, not a wait forever).
TIMEOUT = 600

needs_data = pytest.mark.skipif(not _fashion_mnist_available(), reason="Fashion-MNIST files not available offline")


def _bench(out, *extra):
    return bench.main([*FLAGS, *extra, "--output", str(out)])


def _result(out):
    (path,) = (out / "runs").glob("*.json")
    return json.loads(path.read_text())


def _final_weights(out, result):
    with np.load(final_weights_path(out, result["spec"])) as stored:
        return [stored[k] for k in sorted(stored.files)]


def _bench_captured(out, *extra):
    """``(exit code, console)`` of a bench run in this process."""
    capture = out.with_suffix(".console")
    with open(capture, "w") as console, contextlib.redirect_stdout(console):
        code = _bench(out, *extra)
    return code, capture.read_text()


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    """The one-device bench every other strategy is compared with: its folder and ``(code, console)``."""
    out = tmp_path_factory.mktemp("bench_one") / "one"
    return out, _bench_captured(out, "--strategy", "one")


@pytest.fixture(scope="module")
def benches(tmp_path_factory, one_device):
    root = tmp_path_factory.mktemp("bench_strategy")
    outputs = {"mirrored": _bench_captured(root / "mirrored", "--strategy", "mirrored", "--cpu-devices", "2")}
    (root / "one").symlink_to(one_device[0], target_is_directory=True)
    outputs["one"] = one_device[1]
    return root, outputs


@needs_data
def test_a_mirrored_bench_on_two_cpu_devices_ends_like_one_device(benches):
    root, outputs = benches
    for name, (code, console) in outputs.items():
        assert code == 0, (console, [p.read_text() for p in (root / name / "logs").glob("*.log")])
    one, mirrored = _result(root / "one"), _result(root / "mirrored")
    assert (one["strategy"], one["replicas"]) == ("_DefaultDistributionStrategy", 1)
    assert (mirrored["strategy"], mirrored["replicas"], mirrored["sync_perturbation"]) == ("MirroredStrategy", 2, True)
    assert mirrored["steps"] == one["steps"] == 16  # --batch-size is the global batch
    assert mirrored["sam_fraction_per_epoch"] == one["sam_fraction_per_epoch"]  # the same SAM steps
    assert _max_rel_diff(_final_weights(root / "mirrored", mirrored), _final_weights(root / "one", one)) < RTOL


@needs_data
def test_the_records_and_the_console_say_how_each_run_was_made(benches):
    root, outputs = benches
    assert "1 replica x 64" in outputs["one"][1]
    assert "2 replicas x 32" in outputs["mirrored"][1]
    config = json.loads((root / "mirrored" / "bench.json").read_text())["config"]
    assert (config["strategy"], config["cpu_devices"], config["sync_perturbation"]) == ("mirrored", 2, True)
    with open(root / "mirrored" / "results.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert (row["strategy"], row["replicas"], row["sync_perturbation"]) == ("MirroredStrategy", "2", "True")


def test_every_run_of_the_plan_records_the_device_flags(tmp_path):
    args = bench.build_parser().parse_args([*FLAGS, "--methods", "erm,ae_sam", "--strategy", "mirrored",
                                            "--cpu-devices", "4", "--no-sync-perturbation"])
    runs = bench.resolve(args)["runs"]
    assert [(r["strategy"], r["cpu_devices"], r["sync_perturbation"]) for r in runs] == [("mirrored", 4, False)] * 2


@pytest.mark.parametrize("argv, message", [
    (["--cpu-devices", "0"], "--cpu-devices must be >= 1, got 0"),
    (["--strategy", "multi-worker"], "TF_CONFIG, which is not set"),
    (["--strategy", "multi-worker", "--cpu-devices", "2"], "--cpu-devices is for --strategy mirrored"),
    (["--strategy", "two"], "argument --strategy: invalid choice: 'two'"),
])
def test_bad_device_flags_are_refused_before_anything_runs(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        _bench(tmp_path / "out", *argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_cpu_split_this_process_cannot_make_is_refused_in_process(tmp_path, capsys):
    import tensorflow as tf

    have = len(tf.config.list_logical_devices("CPU"))  # TensorFlow has started in this process
    with pytest.raises(SystemExit) as exit_info:
        _bench(tmp_path / "out", "--isolation", "none", "--cpu-devices", str(have + 1))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"--cpu-devices {have + 1}: TensorFlow already started in this process" in err
    assert "--isolation group" in err
    assert not (tmp_path / "out").exists()


@needs_data
def test_a_global_batch_the_replicas_cannot_share_equally_fails_the_run_with_the_reason(tmp_path, capsys):
    out = tmp_path / "out"
    code = _bench(out, "--strategy", "mirrored", "--cpu-devices", "3", "--epochs", "1", "--train-size", "128")
    assert code == 1
    assert "FAILED clean_s0_ae_sam" in capsys.readouterr().out
    (error,) = (out / "runs").glob("*.error.txt")
    assert "--batch-size (the global batch) must be a multiple of the 3 replicas, got 64" in error.read_text()
    assert not list((out / "runs").glob("*.json"))


# ------------------------------------------------------------------ a cluster


def _start_cluster(root, *extra_per_worker):
    """The two ``keras-aesam bench --strategy multi-worker`` processes of a cluster on 127.0.0.1.

    Worker 0 is the chief; both name the same ``--output`` (shared storage) and
    have their temporary folders in ``root/tmp``; ``extra_per_worker``: more flags for each.
    """
    workers = [f"127.0.0.1:{p}" for p in free_ports(2)]
    (root / "tmp").mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "keras_aesam.cli", "bench", *FLAGS, "--strategy", "multi-worker",
            "--output", str(root / "out")]
    extra = extra_per_worker or ([], [])
    return [subprocess.Popen([*argv, *extra[i]], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=_env(TMPDIR=str(root / "tmp"), TF_CONFIG=json.dumps(
                                 {"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}})))
            for i in range(2)]


def _finish(procs):
    """``[(code, stdout, stderr)]`` of the cluster's processes, all ended within one TIMEOUT."""
    return communicate_all(procs, TIMEOUT,
                           f"the cluster's bench did not end within {TIMEOUT} s (a worker waiting for its peer?)")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, request):
    """Both workers' bench, then the same two commands again; meanwhile the one-device bench, and a
    cluster whose workers run different plans (2 epochs on the chief, 1 on the other; in-process).
    """
    root = tmp_path_factory.mktemp("bench_cluster")
    procs = _start_cluster(root)
    mismatched = _start_cluster(root / "mismatched", ["--isolation", "none"],
                                ["--isolation", "none", "--epochs", "1"])
    request.getfixturevalue("one_device")
    first = _finish(procs)
    leftovers = sorted(p.name for p in (root / "tmp").iterdir())
    stored = (root / "out" / "runs" / "clean_s0_ae_sam.json").read_bytes() if first[0][0] == 0 else None
    second = _finish(_start_cluster(root))
    return {"root": root, "first": first, "second": second, "leftovers": leftovers, "stored": stored,
            "mismatched": _finish(mismatched)}


def _assert_ran(results):
    for code, out, err in results:
        assert code == 0, (out[-2000:], err[-3000:])


@needs_data
def test_two_workers_write_one_bench_folder_that_ends_like_one_device(cluster, one_device):
    root = cluster["root"]
    _assert_ran(cluster["first"])
    assert sorted(p.name for p in root.iterdir()) == ["mismatched", "out", "tmp"]  # one bench folder
    assert cluster["leftovers"] == []  # the other worker removed its temporary folder
    for name in ("bench.json", "results.csv", "report.md", "final/clean_s0_ae_sam.npz"):
        assert (root / "out" / name).is_file(), name
    chief_console, worker_console = cluster["first"][0][1], cluster["first"][1][1]
    assert "worker of a cluster" in worker_console and "report:" not in worker_console
    result, reference = _result(root / "out"), _result(one_device[0])
    assert (result["strategy"], result["replicas"]) == ("MultiWorkerMirroredStrategy", 2)
    assert "2 replicas x 32" in chief_console
    assert result["steps"] == reference["steps"] == 16  # --batch-size is the global batch
    assert result["sam_fraction_per_epoch"] == reference["sam_fraction_per_epoch"]  # the same SAM steps
    assert _max_rel_diff(_final_weights(root / "out", result), _final_weights(one_device[0], reference)) < RTOL


@needs_data
def test_both_workers_run_again_skip_the_runs_the_chief_finished(cluster):
    root = cluster["root"]
    _assert_ran(cluster["first"] + cluster["second"])
    chief_console, worker_console = cluster["second"][0][1], cluster["second"][1][1]
    assert "1 runs (1 already finished, skipped)" in chief_console
    assert "1 runs (1 finished by the chief, skipped)" in worker_console
    assert "clean_s0_ae_sam:" not in chief_console + worker_console  # trained by neither
    assert (root / "out" / "runs" / "clean_s0_ae_sam.json").read_bytes() == cluster["stored"]
    assert list((root / "tmp").iterdir()) == []
    sessions = json.loads((root / "out" / "bench.json").read_text())["sessions"]
    assert [s["skipped_finished_runs"] for s in sessions] == [0, 1]


def test_a_multi_worker_plan_has_no_peer_row_and_says_why(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["127.0.0.1:1"]},
                                                "task": {"type": "worker", "index": 0}}))
    argv = [arg for arg in FLAGS if arg != "--no-peer"]
    plan = bench.resolve(bench.build_parser().parse_args([*argv, "--strategy", "multi-worker"]))
    assert [r["kind"] for r in plan["runs"]] == ["method"]
    assert "cannot join a --strategy multi-worker cluster" in plan["peer_note"]
    with pytest.raises(bench.BadInput, match="--peer/--peer-diagnostic: the tf_keras peer"):
        bench.resolve(bench.build_parser().parse_args([*argv, "--strategy", "multi-worker", "--peer"]))


@needs_data
def test_workers_with_different_plans_stop_with_the_reason_before_training(cluster):
    root = cluster["root"] / "mismatched"
    for code, out, err in cluster["mismatched"]:
        assert code == 2, (out[-2000:], err[-3000:])
        assert "the workers of the --strategy multi-worker cluster disagree on the plan" in err
        assert "[1/1]" not in out  # nothing trained
    assert not list((root / "out" / "runs").iterdir())
    assert list((root / "tmp").iterdir()) == []


@pytest.mark.parametrize("cluster_spec, task, chief", [
    ({"worker": ["a:1", "b:1"]}, {"type": "worker", "index": 0}, True),  # worker 0 of a cluster without a chief
    ({"worker": ["a:1", "b:1"]}, {"type": "worker", "index": 1}, False),
    ({"chief": ["c:1"], "worker": ["a:1"]}, {"type": "worker", "index": 0}, False),
    ({"chief": ["c:1"], "worker": ["a:1"]}, {"type": "chief", "index": 0}, True),
])
def test_the_chief_that_writes_the_bench_folder_is_keras_s(monkeypatch, cluster_spec, task, chief):
    from keras_aesam.cli import devices

    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster_spec, "task": task}))
    assert devices.tf_config_is_chief() is chief


def test_a_tf_config_that_is_no_cluster_is_refused_naming_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TF_CONFIG", "worker0")
    with pytest.raises(SystemExit) as exit_info:
        _bench(tmp_path / "out", "--strategy", "multi-worker")
    assert exit_info.value.code == 2
    assert "TF_CONFIG must be JSON with a \"cluster\"" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@needs_data
@pytest.mark.parametrize("index, writes", [(0, True), (1, False)])
def test_only_the_chief_rewrites_the_report(cluster, tmp_path, monkeypatch, capsys, index, writes):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(cluster["root"] / "out", out)
    (out / "report.md").unlink()
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]},
                                                "task": {"type": "worker", "index": index}}))
    assert bench.main(["--report-only", "--output", str(out), "--strategy", "multi-worker"]) == 0
    assert (out / "report.md").is_file() is writes
    if not writes:
        assert "the chief writes the report" in capsys.readouterr().out
