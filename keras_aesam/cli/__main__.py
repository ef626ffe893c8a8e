"""``python -m keras_aesam.cli``: the ``keras-aesam`` command."""

import sys

from keras_aesam.cli import main

sys.exit(main())
