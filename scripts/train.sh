#!/usr/bin/env bash
# The main job: installs the package, makes Fashion-MNIST available offline,
# trains the 784-512-512-10 MLP with AE-SAM and exports it under saved_models/.
# Uses a project .venv when the system Python refuses installs (scripts/_setup.sh).
# Usage: bash scripts/train.sh [keras-aesam train flags]
# The first screen is the run's: its device line, then what trains on what
# (TensorFlow's start-up lines are hidden by the quiet start of `python -m
# keras_aesam.cli`, its errors are not; TF_CPP_MIN_LOG_LEVEL=0 shows them all).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_setup.sh
keras_aesam_python
# pip's warning for root is about the system Python, which keras_aesam_python already
# handles (a .venv where installs are refused): it would only push the run's first screen away.
export PIP_ROOT_USER_ACTION="${PIP_ROOT_USER_ACTION:-ignore}"
keras_aesam_install plots
keras_aesam_fashion_mnist
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
exec "$PY" -m keras_aesam.cli train "$@"
