#!/usr/bin/env bash
# The main job: installs the package, makes Fashion-MNIST available offline
# (Debian's dataset-fashion-mnist, unless a local copy exists), trains a small
# CNN with AE-SAM and exports it under saved_models/.
# Usage: bash scripts/train.sh [keras-aesam train flags]
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check -e ".[plots]"
cache="${KERAS_HOME:-$HOME/.keras}/datasets/fashion-mnist/train-images-idx3-ubyte.gz"
debian=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ ! -f "$cache" ] && [ ! -f "$debian" ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "Installing Debian's dataset-fashion-mnist (the data loader would otherwise download)."
  apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null \
    || echo "apt-get failed; keras-aesam will try to download Fashion-MNIST."
fi
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
exec python3 -m keras_aesam.cli train "$@"
