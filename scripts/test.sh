#!/usr/bin/env bash
# Installs the package with its test dependencies (Keras 2's tf-keras for the
# peer tests included), makes Fashion-MNIST available offline as the main job
# does, then runs the test suite. Uses a project .venv when the system Python
# refuses installs (scripts/_setup.sh).
# Test files run in $KERAS_AESAM_TEST_WORKERS parallel pytest processes (default
# 2; `-n 0` after the command runs them in this process).
# Usage: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_setup.sh
keras_aesam_python
keras_aesam_install dev
keras_aesam_fashion_mnist
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-3}"
exec "$PY" -m pytest -q -p no:cacheprovider -n "${KERAS_AESAM_TEST_WORKERS:-2}" --dist loadfile "$@"
