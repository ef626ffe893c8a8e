"""The ``keras-aesam`` command and the plots.

Fast: argument errors stop before any data or training; one tiny end-to-end
run (512 Fashion-MNIST examples, one epoch) is shared by the run-directory,
SavedModel and ``plot`` tests.
"""

import contextlib
import csv
import io
import json
import math
import os
import re
import sys
from importlib import metadata

import numpy as np
import pytest

from keras_aesam import METHODS, cli
from keras_aesam.callbacks import STEP_COLUMNS

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _fashion_mnist_available():
    from keras_aesam import data

    dirs = [data._keras_cache_dir(), data.DEBIAN_FASHION_MNIST_DIR]
    return any(not data._missing_files(d) for d in dirs)


needs_data = pytest.mark.skipif(not _fashion_mnist_available(), reason="Fashion-MNIST files not available offline")


def _run_cli(argv, capsys):
    """Runs the CLI in-process; returns (exit code, stdout, stderr)."""
    code = 0
    try:
        cli.main(argv)
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def _last_line(text):
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dataset", "mnist"],
         r"unknown dataset 'mnist'; valid datasets: cifar10, cifar100, fashion_mnist, imagenet2012"),
        (["--network", "resnet1000"], r"unknown network 'resnet1000'; valid networks: .*resnet18.*small_cnn"),
        (["--method", "adam"], r"unknown method 'adam'; valid methods: " + re.escape(", ".join(sorted(METHODS)))),
        (["--label-noise", "1.0"], r"--label-noise must be in \[0, 1\), got 1"),
        (["--label-noise", "-0.1"], r"--label-noise must be in \[0, 1\), got -0.1"),
        (["--batch-size", "0"], r"--batch-size must be >= 1, got 0"),
        (["--epochs", "0"], r"--epochs must be >= 1"),
        (["--train-size", "0"], r"--train-size must be >= 1"),
        (["--lr", "-1"], r"--lr must be > 0"),
        (["--method", "sam", "--lambda1", "0"],
         r"method 'sam' does not take --lambda1 \(taken by ae_sam, ae_looksam\); it takes --rho, --adaptive"),
        (["--method", "erm", "--k", "3", "--beta", "0.5"],
         r"method 'erm' does not take --k \(taken by looksam\), --beta \(taken by esam\); it takes --total-steps"),
        (["--method", "erm", "--rho", "0.1"], r"method 'erm' does not take --rho \(taken by sam, esam, "),
        (["--method", "ae_sam", "--lambda1", "2", "--lambda2", "1"],
         r"invalid hyperparameter for ae_sam: lambda1 must be <= lambda2"),
        (["--method", "looksam", "--k", "0"], r"invalid hyperparameter for looksam: k must be an integer >= 1"),
        (["--method", "sam", "--rho", "0"], r"invalid hyperparameter for sam: rho"),
        (["--grad-norm-epochs", "99"], r"--grad-norm-epochs must be in \[0, 10\]"),
        (["--grad-norm-batches", "0"], r"--grad-norm-batches must be >= 1, got 0"),
        (["--momentum", "1"], r"--momentum must be in \[0, 1\), got 1"),
        (["--method", "msam", "--momentum", "0"], r"--method msam perturbs along SGD's momentum: --momentum"),
        (["--method", "msam", "--rho", "0"], r"invalid hyperparameter for msam: rho"),
        (["--backup-steps", "-1"], r"--backup-steps must be >= 0"),
        (["--manual-dir", "/x"], r"--manual-dir is for imagenet2012 only"),
    ],
)
def test_bad_arguments_exit_2_with_one_line_before_anything_runs(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = _run_cli(["train", *argv, "--output", str(tmp_path / "run")], capsys)
    assert code == 2
    line = _last_line(err)
    assert line.startswith("keras-aesam train: error: ")
    assert re.search(message, line), line
    assert "usage: keras-aesam train" in err
    assert not (tmp_path / "run").exists()
    assert out == ""


def test_existing_output_dir_needs_overwrite(capsys, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "something.txt").write_text("keep me")
    code, _, err = _run_cli(["train", "--output", str(run_dir)], capsys)
    assert code == 2
    assert "output directory" in _last_line(err) and "exists; pass --overwrite" in _last_line(err)
    # --overwrite never deletes a folder that is not a run directory.
    code, _, err = _run_cli(["train", "--output", str(run_dir), "--overwrite"], capsys)
    assert code == 2
    assert "refuses to delete" in _last_line(err)
    assert (run_dir / "something.txt").read_text() == "keep me"


def test_unknown_subcommand_and_missing_run_dir(capsys, tmp_path):
    code, _, err = _run_cli(["fly"], capsys)
    assert code == 2 and "invalid choice" in err
    code, _, err = _run_cli(["plot", str(tmp_path / "nope")], capsys)
    assert code == 2 and "does not exist" in _last_line(err)
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = _run_cli(["plot", str(empty)], capsys)
    assert code == 2 and "nothing to plot" in _last_line(err)


@needs_data
def test_labels_that_do_not_fit_num_classes(capsys, tmp_path):
    code, _, err = _run_cli(
        ["train", "--num-classes", "5", "--train-size", "256", "--output", str(tmp_path / "run")], capsys
    )
    assert code == 2
    assert "do not fit --num-classes 5" in _last_line(err)
    assert not (tmp_path / "run").exists()


def test_bad_labels_in_the_data_stop_before_training(capsys, tmp_path, monkeypatch):
    from keras_aesam import data

    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, size=(40, 28, 28), dtype=np.uint8)
    y = np.arange(40) % 12  # 10 and 11 do not fit Fashion-MNIST's 10 classes
    monkeypatch.setattr(data, "_load_fashion_mnist_with_source", lambda data_dir=None: (((x, y), (x, y)), "test"))
    code, _, err = _run_cli(["train", "--output", str(tmp_path / "run")], capsys)
    assert code == 2
    assert "labels must be in [0, num_classes=10)" in _last_line(err)
    assert not (tmp_path / "run").exists()


def test_every_method_hyperparameter_has_a_flag():
    flags = {name for name, *_ in cli.HYPERPARAMETER_FLAGS}
    for method in METHODS:
        assert set(cli._method_takes(method)) <= flags, method


def test_console_script_is_declared():
    scripts = {ep.name: ep.value for ep in metadata.entry_points(group="console_scripts")}
    assert scripts.get("keras-aesam") == "keras_aesam.cli:main"


def test_help_states_the_weight_decay_mode(capsys):
    code, out, _ = _run_cli(["train", "--help"], capsys)
    assert code == 0
    assert "--weight-decay-mode {l2,decoupled}" in out
    assert "weight_decay/2" in out and "PyTorch" in out
    for flag in ("--lambda1", "--lambda2", "--delta", "--target-sam-fraction", "--p", "--k", "--alpha",
                 "--per-tensor", "--adaptive", "--beta", "--gamma", "--total-steps", "--export-dir"):
        assert flag in out


# ------------------------------------------------------------ start-up noise

_AS_CONSOLE_SCRIPT = (
    "import os, sys\n"
    "sys.argv[0] = os.path.join(os.path.dirname(sys.executable), 'keras-aesam')\n"
    "from keras_aesam.cli import main\n"
    "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
    "print('TF_CPP_MIN_LOG_LEVEL=' + os.environ['TF_CPP_MIN_LOG_LEVEL'])\n"
)


def _console_script(level=None):
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    if level is not None:
        env["TF_CPP_MIN_LOG_LEVEL"] = level
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, "-c", _AS_CONSOLE_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=300)


def test_the_command_starts_without_tensorflow_noise_unless_the_user_asks():
    shown = _console_script(level="0")  # the user's own setting wins: everything shows
    assert shown.returncode == 0 and "TF_CPP_MIN_LOG_LEVEL=0" in shown.stdout
    if not shown.stderr.strip():
        pytest.skip("this TensorFlow prints nothing at start-up here: no noise to hide")
    quiet = _console_script()
    assert quiet.returncode == 0
    assert "usage: keras-aesam" in quiet.stdout and "TF_CPP_MIN_LOG_LEVEL=2" in quiet.stdout
    assert quiet.stderr == ""


def _as_module(*argv, level=None, cwd=None):
    """``python -m keras_aesam.cli ARGV`` as scripts/train.sh runs it; stderr merged into stdout."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    if level is not None:
        env["TF_CPP_MIN_LOG_LEVEL"] = level
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, "-m", "keras_aesam.cli", *argv], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd, timeout=300)


@pytest.mark.parametrize("orig_argv, module", [
    (["python", "-m", "keras_aesam.cli", "train"], "keras_aesam.cli"),
    (["python3", "-u", "-W", "ignore", "-X", "dev", "-m", "keras_aesam.bench", "--worker", "j"], "keras_aesam.bench"),
    (["python", "-mkeras_aesam.cli"], "keras_aesam.cli"),
    (["python", "-m", "pytest", "-m", "keras_aesam"], "pytest"),
    (["python", "script.py", "-m", "keras_aesam.cli"], None),
    (["python", "-c", "import keras_aesam", "-m", "keras_aesam.cli"], None),
    (["python"], None),
])
def test_the_module_python_runs_is_read_from_its_command_line(orig_argv, module):
    from keras_aesam import _startup

    assert _startup.run_module(orig_argv) == module
    assert _startup.is_our_command("-m" if module else "x.py", orig_argv) == (module or "").startswith("keras_aesam")
    assert _startup.is_our_command("/usr/bin/keras-aesam", ["python", "/usr/bin/keras-aesam"])


def test_python_m_starts_without_tensorflow_noise_unless_the_user_asks():
    shown = _as_module("--help", level="0")
    assert shown.returncode == 0
    if shown.stdout.startswith("usage: keras-aesam"):
        pytest.skip("this TensorFlow prints nothing at start-up here: no noise to hide")
    quiet = _as_module("--help")
    assert quiet.returncode == 0 and quiet.stdout.startswith("usage: keras-aesam"), quiet.stdout[:2000]


def test_bad_input_still_shows_when_started_quietly():
    done = _as_module("train", "--method", "erm", "--rho", "0.1")
    assert done.returncode == 2
    assert done.stdout.startswith("usage: keras-aesam train"), done.stdout[:2000]
    assert "keras-aesam train: error: method 'erm' does not take --rho" in done.stdout


@needs_data
def test_the_first_screen_of_a_run_is_ours_and_names_its_devices(tmp_path):
    """The first line is the device line, the second the run's; nothing from TensorFlow before them.
    --cpu-devices 2: the quiet start-up looks at the devices without starting the runtime."""
    done = _as_module("train", "--train-size", "64", "--batch-size", "32", "--epochs", "1", "--quiet",
                      "--no-plots", "--grad-norm-epochs", "none", "--eval-batches", "1", "--cpu-devices", "2",
                      "--output", "run", "--export-dir", "saved", cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0] == ("keras-aesam: devices: CPU only (no GPU found), split into 2 logical devices; "
                        "MirroredStrategy, 2 replicas"), lines[:5]
    assert lines[1].startswith("keras-aesam: ae_sam ("), lines[:5]
    assert lines[-1].startswith("test accuracy "), lines[-5:]


def test_the_device_line_of_one_device():
    import tensorflow as tf

    from keras_aesam.cli import devices

    text = devices.describe(tf.distribute.get_strategy())
    if tf.config.list_logical_devices("GPU"):
        assert text.startswith("devices: 1 GPU") or " GPUs (" in text
    else:
        assert text == "devices: CPU only (no GPU found); one device, 1 replica"


def test_noise_filter_keeps_errors_and_python_warnings():
    from keras_aesam._startup import filter_noise

    text = (
        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
        "I0000 00:00:1795856293.727199   25553 port.cc:153] oneDNN custom operations are on.\n"
        "I0000 00:00:1795855772.338218    6443 cpu_feature_guard.cc:227] This TensorFlow binary is optimized\n"
        "To enable the following instructions: AVX2 FMA, in other operations, rebuild TensorFlow.\n"
        "W0000 00:00:1795855772.338218    6443 some.cc:1] a warning\n"
        "E0000 00:00:1795855772.338218    6443 other.cc:2] a real error\n"
        "/x/y.py:3: UserWarning: something Python says\n"
    )
    kept = filter_noise(text, 2).splitlines()
    assert kept == ["E0000 00:00:1795855772.338218    6443 other.cc:2] a real error",
                    "/x/y.py:3: UserWarning: something Python says"]
    assert "a warning" in filter_noise(text, 1) and "oneDNN" not in filter_noise(text, 1)
    assert filter_noise(text, 0) == text
    no_gpu = ("E0000 00:00:1796193196.620503   32463 cuda_platform.cc:52] failed call to cuInit: INTERNAL: "
              "CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)\n")
    assert filter_noise(no_gpu + text, 2) == filter_noise(text, 2)  # the device line says it instead
    assert filter_noise(no_gpu, 0) == no_gpu


# ------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    if not _fashion_mnist_available():
        pytest.skip("Fashion-MNIST files not available offline")
    import keras

    keras.utils.clear_session()
    root = tmp_path_factory.mktemp("cli")
    run_dir = root / "runs" / "tiny"
    export_root = root / "saved"
    argv = [
        "train", "--train-size", "512", "--epochs", "1", "--output", str(run_dir),
        "--export-dir", str(export_root), "--grad-norm-epochs", "0,1", "--grad-norm-batches", "3",
        "--eval-batches", "8", "--quiet",
    ]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        results = cli.run(argv)
    return {"run_dir": run_dir, "export": export_root / "tiny", "results": results, "stdout": out.getvalue()}


def test_train_writes_the_run_directory(tiny_run):
    run_dir = tiny_run["run_dir"]
    for name in ("config.json", "history.csv", "steps.csv", "grad_norms.csv", "model.keras"):
        assert (run_dir / name).is_file(), name
    for name in ("grad_norm_steps.png", "sam_fraction.png", "accuracy.png", "grad_norm_distribution.png"):
        path = run_dir / name
        assert path.is_file(), name
        assert path.read_bytes()[:8] == PNG_SIGNATURE
    config = json.loads((run_dir / "config.json").read_text())
    assert config["method"] == "ae_sam" and config["model"] == "mlp" and config["dataset"] == "fashion_mnist"
    assert config["train_examples"] == 512 and config["steps_per_epoch"] == 4
    assert config["weight_decay_mode"] == "l2" and config["lr"] == cli.PAPER_LR
    assert config["hyperparameters"]["lambda1"] == -1.0 and config["hyperparameters"]["lambda2"] == 1.0
    results = config["results"]
    assert 0.0 <= results["test_accuracy"] <= 1.0
    assert results["steps"] == 4 and 0 <= results["sam_steps"] <= 4
    assert results["saved_model"] == str(tiny_run["export"])
    line = _last_line(tiny_run["stdout"])
    assert line.startswith("test accuracy ") and "SAM" in line and "wall time" in line


def test_train_msam_end_to_end(tmp_path):
    """``--method msam --rho``: one pass per step (no SAM steps), the rho in the
    config and in the saved model, which loads back as MSAM."""
    if not _fashion_mnist_available():
        pytest.skip("Fashion-MNIST files not available offline")
    import keras

    keras.utils.clear_session()
    run_dir = tmp_path / "msam"
    with contextlib.redirect_stdout(io.StringIO()):
        cli.run(["train", "--method", "msam", "--rho", "0.4", "--train-size", "256", "--epochs", "1",
                 "--eval-batches", "2", "--grad-norm-epochs", "0", "--output", str(run_dir),
                 "--export-dir", str(tmp_path / "saved"), "--quiet"])
    config = json.loads((run_dir / "config.json").read_text())
    assert config["method"] == "msam" and config["hyperparameters"] == {"rho": 0.4}
    assert config["results"]["steps"] == 2 and config["results"]["sam_steps"] == 0
    loaded = keras.models.load_model(run_dir / "model.keras")
    assert loaded.method == "msam" and loaded.hyperparameters == {"rho": 0.4}


def test_steps_csv_marks_the_sam_steps_the_policy_took(tiny_run):
    with open(tiny_run["run_dir"] / "steps.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0].keys()) == STEP_COLUMNS
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3]
    assert all(0 < float(r["loss"]) < 20 for r in rows)
    for row in rows:
        took = float(row["grad_norm_sq"]) >= float(row["sam_threshold"])
        assert int(row["sam"]) == int(took)
    assert rows[0]["sam"] == "1"  # sigma starts tiny: the first step always takes SAM
    with open(tiny_run["run_dir"] / "grad_norms.csv", newline="") as f:
        samples = list(csv.DictReader(f))
    assert sorted({int(r["epoch"]) for r in samples}) == [0, 1]
    assert len(samples) == 6 and all(float(r["grad_norm_sq"]) > 0 for r in samples)
    with open(tiny_run["run_dir"] / "history.csv", newline="") as f:
        history = list(csv.DictReader(f))
    assert len(history) == 1 and {"accuracy", "val_accuracy", "sam_fraction"} <= set(history[0])
    assert math.isclose(float(history[0]["sam_fraction"]), tiny_run["results"]["sam_fraction"], abs_tol=1e-6)


def test_saved_model_loads_and_predicts_like_the_keras_model(tiny_run):
    import keras
    import tensorflow as tf

    export = tiny_run["export"]
    assert (export / "saved_model.pb").is_file()
    served = tf.saved_model.load(str(export))
    x = np.random.default_rng(0).normal(size=(5, 28, 28, 1)).astype("float32")
    logits = served.serve(tf.constant(x)).numpy()
    assert logits.shape == (5, 10) and np.isfinite(logits).all()
    model = keras.models.load_model(tiny_run["run_dir"] / "model.keras")
    np.testing.assert_allclose(model.predict(x, verbose=0), logits, rtol=1e-4, atol=1e-4)


def test_plot_command_redraws_the_plots(tiny_run, capsys):
    run_dir = tiny_run["run_dir"]
    pngs = sorted(p.name for p in run_dir.glob("*.png"))
    for name in pngs:
        (run_dir / name).unlink()
    code, out, err = _run_cli(["plot", str(run_dir)], capsys)
    assert code == 0, err
    assert sorted(p.name for p in run_dir.glob("*.png")) == pngs
    assert len(out.strip().splitlines()) == len(pngs)


def test_existing_export_dir_needs_overwrite(tiny_run, capsys, tmp_path):
    # Same run name, fresh output folder: the SavedModel folder is taken.
    argv = ["train", "--output", str(tmp_path / "tiny"), "--export-dir", str(tiny_run["export"].parent)]
    code, _, err = _run_cli(argv, capsys)
    assert code == 2 and "export directory" in _last_line(err)


# ------------------------------------------------------------------- plots


def _synthetic_run(run_dir, adaptive=True, grad_norms=True, epochs=4, steps_per_epoch=30):
    rng = np.random.default_rng(0)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "history.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "accuracy", "loss", "sam_fraction", "val_accuracy", "val_loss"])
        for e in range(epochs):
            w.writerow([e, 0.5 + 0.1 * e, 1.0 / (e + 1), 0.2 + 0.15 * e, 0.55 + 0.08 * e, 1.1 / (e + 1)])
    with open(run_dir / "steps.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(STEP_COLUMNS)
        step = 0
        for e in range(epochs):
            count = 0
            for b in range(steps_per_epoch):
                g = float(abs(rng.normal(2.0 / (e + 1), 0.3)))
                mu, sd = 2.0 / (e + 1), 0.3
                threshold = mu + (1 - 2 * step / (epochs * steps_per_epoch)) * sd
                sam = int(g >= threshold)
                count += sam
                stats = [g, mu, sd, threshold] if adaptive else ["", "", "", ""]
                sharpness = 0.05 * g if sam else ""  # measured on SAM steps only
                w.writerow([step, e, b, 1, 1.0 / (step + 1), 1.0 / (b + 1), sam, count / (b + 1), 0, *stats,
                            sharpness])
                step += 1
    if grad_norms:
        with open(run_dir / "grad_norms.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["epoch", "sample", "grad_norm_sq"])
            for e in (0, epochs):
                for i, v in enumerate(rng.normal(3.0 / (e + 1), 0.2, size=50)):
                    w.writerow([e, i, v])
    (run_dir / "config.json").write_text(json.dumps(
        {"method": "ae_sam", "model": "small_cnn", "dataset": "synthetic", "expected_sam_fraction": 0.5,
         "results": {"test_accuracy": 0.8, "sam_fraction": 0.45}}))


def test_plot_run_from_synthetic_csvs(tmp_path):
    from keras_aesam.cli.plots import PLOT_FILES, plot_run

    run_dir = tmp_path / "run"
    _synthetic_run(run_dir)
    written = plot_run(run_dir)
    assert sorted(os.path.basename(p) for p in written) == sorted(PLOT_FILES.values())
    for path in written:
        with open(path, "rb") as f:
            assert f.read(8) == PNG_SIGNATURE
        assert os.path.getsize(path) > 10_000


def test_plot_run_without_grad_norm_stats(tmp_path):
    """ERM-like runs log no ‖g‖²: loss panel only, and no distribution plot."""
    from keras_aesam.cli.plots import PLOT_FILES, plot_run

    run_dir = tmp_path / "run"
    _synthetic_run(run_dir, adaptive=False, grad_norms=False)
    written = {os.path.basename(p) for p in plot_run(run_dir)}
    assert written == {PLOT_FILES["steps"], PLOT_FILES["sam_fraction"], PLOT_FILES["accuracy"]}


def test_distribution_falls_back_to_per_step_values(tmp_path):
    from keras_aesam.cli.plots import PLOT_FILES, _grad_norm_samples, plot_run, read_csv

    run_dir = tmp_path / "run"
    _synthetic_run(run_dir, grad_norms=False, epochs=6)
    samples, source = _grad_norm_samples(str(run_dir), read_csv(run_dir / "steps.csv"))
    assert list(samples) == ["during epoch 1", "during epoch 3", "during epoch 4", "during epoch 6"]
    assert "per-step" in source
    assert PLOT_FILES["distribution"] in {os.path.basename(p) for p in plot_run(run_dir, epochs=[2])}


def test_normal_qq_matches_scipy_without_scipy(monkeypatch):
    stats = pytest.importorskip("scipy.stats")
    from keras_aesam.cli.plots import normal_qq

    x = np.random.default_rng(1).gamma(4.0, size=37)
    (osm, osr), (slope, intercept, r) = stats.probplot(x, dist="norm")
    monkeypatch.setitem(sys.modules, "scipy", None)  # `from scipy import stats` now fails
    mine = normal_qq(x)
    np.testing.assert_allclose(mine[0], osm, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(mine[1], osr)
    np.testing.assert_allclose(mine[2:], [slope, intercept, r], rtol=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        normal_qq([1.0])


def test_heatmap_leaves_nan_cells_blank(tmp_path):
    from keras_aesam.cli.plots import plot_heatmap

    values = np.array([[50.0, 30.0], [np.nan, 10.0]])
    path = plot_heatmap(values, [-1, 1], [-1, 1], tmp_path / "h.png", title="t", colorbar_label="% SAM")
    assert open(path, "rb").read(8) == PNG_SIGNATURE


@pytest.mark.parametrize("error", [
    ConnectionError("cannot reach the download server:\n  connection refused"),
    ModuleNotFoundError("No module named 'tensorflow_datasets'"),
    FileNotFoundError("no Fashion-MNIST files in\n  ~/.keras/datasets/fashion-mnist\n  /usr/share/datasets"),
])
def test_data_that_cannot_be_loaded_ends_with_one_line_and_exit_code_1(tmp_path, monkeypatch, capsys, error):
    from keras_aesam import data

    def unavailable(*args, **kwargs):
        raise error

    monkeypatch.setattr(data, "get_dataset", unavailable)
    with pytest.raises(SystemExit) as exit_info:
        cli.run(["train", "--output", str(tmp_path / "run"), "--export-dir", str(tmp_path / "saved")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("keras-aesam train: error: cannot load fashion_mnist: ")
    assert " ".join(str(error).split()) in err
    assert not (tmp_path / "run").exists()
