"""A quiet start for the ``keras-aesam`` command: TensorFlow's C++ start-up noise hidden.

Importing TensorFlow prints absl log lines (CUDA driver probes, oneDNN and CPU
feature notes) straight to file descriptor 2, before ``absl::InitializeLog``;
TensorFlow 2.21 no longer filters them by ``TF_CPP_MIN_LOG_LEVEL``. So the
console script (and only it: a library import changes nothing) sets
``TF_CPP_MIN_LOG_LEVEL=2`` unless the user set it, and imports TensorFlow with
descriptor 2 sent to a temporary file; afterwards it prints back every line
that is not an absl INFO/WARNING line the level hides (errors, Python warnings
and tracebacks stay visible). ``TF_CPP_MIN_LOG_LEVEL=0`` shows everything.
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


def is_console_script(argv0: str) -> bool:
    """Whether the interpreter runs the ``keras-aesam`` console script."""
    return os.path.basename(argv0 or "") in ("keras-aesam", "keras-aesam.exe", "keras-aesam-script.py")


def filter_noise(text: str, level: int) -> str:
    """``text`` without the absl lines below ``level`` (TF_CPP_MIN_LOG_LEVEL's meaning)."""
    kept, dropping = [], False
    for line in text.splitlines(keepends=True):
        match = _ABSL_LINE.match(line)
        if match:
            dropping = _LEVEL_OF[match.group(1)] < level
        elif line.startswith(_PREAMBLE):
            dropping = level >= 1
        elif not (dropping and line.startswith(_CONTINUATIONS)):
            dropping = False
        if not dropping:
            kept.append(line)
    return "".join(kept)


def quiet_tensorflow_import() -> None:
    """Imports TensorFlow and Keras with the start-up noise the log level hides removed."""
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
            import tensorflow  # noqa: F401
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = filter_noise(captured.read().decode("utf-8", "replace"), level)
            if text:
                sys.stderr.write(text)
                sys.stderr.flush()
