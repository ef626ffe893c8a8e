"""``keras-aesam bench --strategy``: the bench's runs on one device or mirrored over several.

The MLP (no BatchNorm, no Dropout: nothing is per replica) under AE-SAM on 512
Fashion-MNIST examples, 2 epochs of 8 global batches of 64, benched on one
device and mirrored over 2 logical CPU devices, each in a worker process of its
own (``--isolation group``: the worker splits the CPU before its TensorFlow starts).
"""

import contextlib
import csv
import json

import numpy as np
import pytest

from keras_aesam import bench
from keras_aesam.bench.worker import final_weights_path
from test_strategy import _fashion_mnist_available, _max_rel_diff

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
# perturbation) moves the weights by O(lr·g)/|w| ≈ 1 relative.
RTOL = 1e-2

needs_data = pytest.mark.skipif(not _fashion_mnist_available(), reason="Fashion-MNIST files not available offline")


def _bench(out, *extra):
    return bench.main([*FLAGS, *extra, "--output", str(out)])


def _result(out):
    (path,) = (out / "runs").glob("*.json")
    return json.loads(path.read_text())


def _final_weights(out, result):
    with np.load(final_weights_path(out, result["spec"])) as stored:
        return [stored[k] for k in sorted(stored.files)]


@pytest.fixture(scope="module")
def benches(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_strategy")
    outputs = {}
    for name, extra in {"one": ["--strategy", "one"],
                        "mirrored": ["--strategy", "mirrored", "--cpu-devices", "2"]}.items():
        capture = root / f"{name}.console"
        with open(capture, "w") as console, contextlib.redirect_stdout(console):
            code = _bench(root / name, *extra)
        outputs[name] = (code, capture.read_text())
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
    (["--strategy", "multi-worker"], "use keras-aesam train --strategy multi-worker"),
    (["--strategy", "multi-worker", "--cpu-devices", "2"], "--cpu-devices is for --strategy mirrored"),
    (["--strategy", "two"], "argument --strategy: invalid choice: 'two'"),
])
def test_bad_device_flags_are_refused_before_anything_runs(tmp_path, capsys, argv, message):
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
