"""Every script in examples/ and benchmarks/ runs end to end at its tiniest settings.

Each runs in its own process, as a user starts it, on the offline
Fashion-MNIST (or random data where the script uses it); a run fails the test
on a non-zero exit or a hang.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 600
# the MLP: these runs test the scripts' plumbing; the small CNN's steps only made them slower
TINY = ["--epochs", "1", "--train-size", "256", "--batch-size", "64", "--network", "mlp"]

# script -> its own arguments (the shared --output is added per test)
SCRIPTS = {
    "examples/cifar_methods.py": [*TINY, "--methods", "erm,ae_sam"],
    "examples/grad_norm_distribution.py": [*TINY, "--grad-norm-epochs", "0,1", "--batches", "3"],
    "examples/label_noise.py": [*TINY, "--noise-levels", "0.4", "--methods", "erm,ae_sam"],
    "examples/lambda_sweep.py": [*TINY, "--values=-1,1"],
    "examples/sam_budget.py": [*TINY, "--targets", "0.5"],
    "benchmarks/step_time.py": ["--steps", "1", "--warmup", "1", "--repeats", "2", "--batch-size", "16",
                                "--guard-parts", "--blocks", "2", "--block-steps", "2"],
    "benchmarks/distributed.py": ["--steps", "6", "--repeats", "1", "--batch-size", "16"],
    "benchmarks/sparse_gradients.py": ["--steps", "1", "--repeats", "1", "--batch", "4"],
}


def run_script(script, args, cwd):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    try:
        return subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{script} did not finish within {TIMEOUT} s")


def test_every_script_is_listed():
    found = {str(p.relative_to(REPO)) for folder in ("examples", "benchmarks")
             for p in (REPO / folder).glob("*.py") if not p.name.startswith("_")}
    assert found == set(SCRIPTS) | {"examples/imagenet_resnet50.py"}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_script_runs_at_tiny_settings(script, tmp_path):
    args = list(SCRIPTS[script])
    if script.startswith("examples/"):
        args += ["--output", str(tmp_path / "out")]
    else:
        # relative, into a folder that does not exist yet, as a user would type it
        args += ["--output", "reports/step_time.md"] if "step_time" in script else []
    done = run_script(script, args, tmp_path)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:])
    if script.startswith("examples/"):
        assert any((tmp_path / "out").rglob("history.csv")), done.stdout[-2000:]
    elif "step_time" in script:
        assert (tmp_path / "reports" / "step_time.md").read_text().strip()
    elif "sparse_gradients" in script:
        assert all(f"| {method} |" in done.stdout for method in ("plain", "erm", "sam", "looksam", "msam"))
    else:
        assert "2 replicas" in done.stdout


def test_step_time_refuses_an_output_it_cannot_create_before_timing_anything(tmp_path):
    (tmp_path / "taken").write_text("a file, not a folder")
    done = run_script("benchmarks/step_time.py", ["--quick", "--output", "taken/report.md"], tmp_path)
    assert done.returncode == 2
    assert "--output taken/report.md: cannot create its folder" in done.stderr
    assert "[round " not in done.stderr  # nothing was timed


def test_imagenet_example_parses_its_flags():
    """ImageNet cannot run here (it needs the ImageNet tar files); its flags parse."""
    done = run_script("examples/imagenet_resnet50.py", ["--help"], REPO)
    assert done.returncode == 0 and "--manual-dir" in done.stdout, done.stderr[-2000:]
