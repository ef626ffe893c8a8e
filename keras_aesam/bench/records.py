"""What a bench keeps on disk and about the machine: JSON files, stored results, versions, load."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

from keras_aesam.bench.plan import BadInput
from keras_aesam.cli.flags import json_default as _json_default, write_json as _write_json  # noqa: F401  (re-exported)


def _result_path(out, spec):
    return Path(out) / "runs" / f"{spec['run_id']}.json"


def finished_result(out, spec) -> dict | None:
    """The stored result of ``spec`` if it finished with the same configuration, else None.

    A result of the same run id but another configuration is an error: the output
    directory belongs to a different bench (use another --output or --fresh).
    """
    path = _result_path(out, spec)
    if not path.is_file():
        return None
    result, _ = _read_result(path)
    if result is None:
        return None  # a damaged file: run again (damaged_result says why)
    if result.get("spec_hash") != spec["spec_hash"]:
        old = result.get("spec", {})
        diff = sorted(k for k in set(old) | set(spec) if k not in ("index", "spec_hash")
                      and old.get(k) != spec.get(k))
        raise BadInput(
            f"{str(Path(out))!r} holds a result of run {spec['run_id']!r} with another configuration "
            f"(differs in: {', '.join(diff) or 'unknown'}); use another --output, or --fresh to discard it"
        )
    return result


def _read_result(path):
    """``(result, None)``, or ``(None, why)`` for a file that does not read back as a run's result."""
    try:
        result = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:  # UnicodeDecodeError is a ValueError
        return None, " ".join(str(err).split())
    if not isinstance(result, dict) or "spec_hash" not in result:
        return None, "not a run's result"
    return result, None


def damaged_result(out, spec) -> str | None:
    """Why the stored result of ``spec`` is damaged (truncated, garbled), or None (intact, or none yet).

    A damaged result counts as not finished: the run is done again.
    """
    path = _result_path(out, spec)
    if not path.is_file():
        return None
    why = _read_result(path)[1]
    return None if why is None else f"damaged result file {path} ({why})"


def _machine():
    model = None
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    if model is None:
        model = platform.processor() or platform.machine()
    return {"cpu": model, "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "hostname": platform.node()}


def machine():
    """The machine and the TensorFlow and Keras versions, as the noisy-labels profile records them."""
    import keras
    import tensorflow as tf

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version(),
            "tensorflow": tf.__version__, "keras": keras.__version__}


def _versions():
    import importlib.metadata as md

    versions = {}
    for package in ("keras-aesam", "tensorflow", "keras", "numpy", "scipy", "matplotlib", "tf-keras"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            versions[package] = None
    import keras_aesam

    versions["keras_aesam.__version__"] = keras_aesam.__version__
    return versions


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def load_results(out) -> list[dict]:
    """Every stored run result in ``out/runs`` (torn files left out)."""
    rows = []
    for path in sorted((Path(out) / "runs").glob("*.json")):
        try:
            rows.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return rows


def _read_bench_json(out) -> dict:
    """The previous session's bench.json, or {} (none, or unreadable)."""
    try:
        return json.loads((out / "bench.json").read_text())
    except (OSError, ValueError):
        return {}
