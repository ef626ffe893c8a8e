import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import gc  # noqa: E402

import keras  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_keras_session():
    """Every test starts from a blank Keras state and the same seed.

    Without Python's full garbage collection: ``clear_session()``'s default
    ``gc.collect()`` walks every object the process still holds (TensorFlow's
    graphs and functions of all earlier tests), which cost 2-8 s per test late
    in a run, more than the tests themselves. Garbage is collected once per
    module instead (below), which keeps memory bounded."""
    keras.utils.clear_session(free_memory=False)
    keras.utils.set_random_seed(1234)
    yield


@pytest.fixture(autouse=True, scope="module")
def _collect_garbage_per_module():
    yield
    keras.utils.clear_session(free_memory=False)
    gc.collect()
