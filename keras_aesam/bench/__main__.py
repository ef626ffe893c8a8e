"""``python -m keras_aesam.bench``: the bench's entry point (also the worker processes')."""

import sys

from keras_aesam.bench import main

if __name__ == "__main__":
    sys.exit(main(program="python -m keras_aesam.bench"))
