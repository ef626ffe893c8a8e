"""Moved to :mod:`keras_aesam.bench.noisy_labels_report`; this name stays for running profiles and old imports."""

from keras_aesam.bench.noisy_labels_report import *  # noqa: F401,F403
from keras_aesam.bench.noisy_labels_report import write_report  # noqa: F401
