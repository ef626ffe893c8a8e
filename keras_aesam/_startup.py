"""A quiet start for the ``keras-aesam`` commands: TensorFlow's C++ start-up noise hidden.

Importing TensorFlow, and its first look at the devices, print absl log lines
(CUDA driver probes, oneDNN and CPU feature notes, and on a machine without a
GPU an ``E`` line "failed call to cuInit") straight to file descriptor 2,
before ``absl::InitializeLog``; TensorFlow 2.21 no longer filters them by
``TF_CPP_MIN_LOG_LEVEL``. So a command of ours (the ``keras-aesam`` console
script, or any ``python -m keras_aesam…`` module run as a program, as
``scripts/train.sh`` does; a library import changes nothing) sets
``TF_CPP_MIN_LOG_LEVEL=2`` unless the user set it, and imports TensorFlow and
lists the devices with descriptor 2 sent to a temporary file; afterwards it
prints back every line that is not an absl INFO/WARNING line the level hides.
Errors, Python warnings and tracebacks stay visible; the one exception is
cuInit's failure, which only says that no GPU is usable: the command's own
device line (:func:`keras_aesam.cli.devices.describe`) says that instead.
``TF_CPP_MIN_LOG_LEVEL=0`` shows everything.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile

_ABSL_LINE = re.compile(r"^([IWEF])\d{4} [\d:.]+\s+\d+ \S+:\d+\] ")  # severity, date, time, thread, file:line
_PREAMBLE = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
_CONTINUATIONS = ("To enable the following instructions:",)
_LEVEL_OF = {"I": 0, "W": 1, "E": 2, "F": 3}
#: absl errors that only mean "no usable GPU": the device line reports that.
_NO_GPU = ("failed call to cuInit",)
#: Python's options that take a value (``-W default``), before ``-m``.
_OPTIONS_WITH_VALUE = ("-W", "-X")


def is_console_script(argv0: str) -> bool:
    """Whether the interpreter runs the ``keras-aesam`` console script."""
    return os.path.basename(argv0 or "") in ("keras-aesam", "keras-aesam.exe", "keras-aesam-script.py")


def run_module(orig_argv) -> str | None:
    """The module ``python [options] -m MODULE …`` runs (``sys.orig_argv``), else None."""
    args = list(orig_argv or [])[1:]
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "-m":
            return args[i + 1] if i + 1 < len(args) else None
        if arg.startswith("-m"):
            return arg[2:]
        if arg in ("-c", "-", "--") or not arg.startswith("-"):
            return None  # a command string, stdin or a script: not -m
        i += 2 if arg in _OPTIONS_WITH_VALUE else 1
    return None


def is_our_command(argv0: str, orig_argv) -> bool:
    """Whether the process runs one of our commands: the console script or ``python -m keras_aesam…``."""
    module = run_module(orig_argv)
    return is_console_script(argv0) or (module or "").split(".")[0] == "keras_aesam"


def filter_noise(text: str, level: int) -> str:
    """``text`` without the absl lines below ``level`` (TF_CPP_MIN_LOG_LEVEL's meaning), nor, from
    level 1, the errors that only say no GPU is usable."""
    kept, dropping = [], False
    for line in text.splitlines(keepends=True):
        match = _ABSL_LINE.match(line)
        if match:
            no_gpu = level >= 1 and any(marker in line for marker in _NO_GPU)
            dropping = _LEVEL_OF[match.group(1)] < level or no_gpu
        elif line.startswith(_PREAMBLE):
            dropping = level >= 1
        elif not (dropping and line.startswith(_CONTINUATIONS)):
            dropping = False
        if not dropping:
            kept.append(line)
    return "".join(kept)


def quiet_tensorflow_import() -> None:
    """Imports TensorFlow and Keras, and lists the devices, with the start-up noise the log level hides removed."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        level = int(os.environ["TF_CPP_MIN_LOG_LEVEL"])
    except ValueError:
        level = 2
    if level <= 0 or "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import keras  # noqa: F401  (imports TensorFlow)
            import tensorflow

            # The driver probes (cuInit) run here, not at import; listing the physical
            # devices leaves the runtime unstarted, so --cpu-devices can still split the CPU.
            tensorflow.config.list_physical_devices()
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = filter_noise(captured.read().decode("utf-8", "replace"), level)
            if text:
                sys.stderr.write(text)
                sys.stderr.flush()
