# Sourced by scripts/train.sh and scripts/test.sh from the repository root.
#
# keras_aesam_python: sets PY to the Python to install into and run with.
# $PYTHON (default python3) inside a virtual environment, or one that allows
# installs, is used as it is. One that refuses them (PEP 668: an
# EXTERNALLY-MANAGED file in its standard library, as on stock Debian and
# Ubuntu) gets a project .venv instead: created once, seeing the system's
# packages, git-ignored.
keras_aesam_python() {
  local python="${PYTHON:-python3}"
  local managed
  managed="$("$python" - <<'PY'
import os, sys, sysconfig
in_venv = sys.prefix != sys.base_prefix
marker = os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")
print("yes" if not in_venv and os.path.exists(marker) else "no")
PY
)"
  PY="$python"
  if [ "$managed" = yes ]; then
    if [ ! -x .venv/bin/python ]; then
      echo "$python refuses system-wide installs (PEP 668); creating .venv for this project."
      "$python" -m venv --system-site-packages .venv || {
        echo "Could not create .venv: install the venv module (Debian/Ubuntu: apt-get install python3-venv) or run inside a virtual environment." >&2
        return 1
      }
    fi
    PY="$PWD/.venv/bin/python"
  fi
}

# keras_aesam_install EXTRA: the package, editable, with one optional extra.
keras_aesam_install() {
  "$PY" -m pip install --quiet --disable-pip-version-check -e ".[$1]"
}

# keras_aesam_fashion_mnist: makes Fashion-MNIST available offline (Debian's
# dataset-fashion-mnist, unless a local copy exists); the data loader would
# otherwise download it.
keras_aesam_fashion_mnist() {
  local cache="${KERAS_HOME:-$HOME/.keras}/datasets/fashion-mnist/train-images-idx3-ubyte.gz"
  local debian=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
  if [ ! -f "$cache" ] && [ ! -f "$debian" ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "Installing Debian's dataset-fashion-mnist (the data loader would otherwise download)."
    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null \
      || echo "apt-get failed; keras-aesam will try to download Fashion-MNIST."
  fi
}
