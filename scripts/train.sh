#!/usr/bin/env bash
# The main job: installs the package, makes Fashion-MNIST available offline,
# trains the 784-512-512-10 MLP with AE-SAM and exports it under saved_models/.
# Uses a project .venv when the system Python refuses installs (scripts/_setup.sh).
# Usage: bash scripts/train.sh [keras-aesam train flags]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_setup.sh
keras_aesam_python
keras_aesam_install plots
keras_aesam_fashion_mnist
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
exec "$PY" -m keras_aesam.cli train "$@"
