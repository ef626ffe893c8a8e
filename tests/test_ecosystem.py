"""Models no one here wrote: KerasHub and keras.applications, wrapped and trained with every method.

Each model is built from a config at toy size (no preset, no weights to download):
KerasHub's ``ResNetImageClassifier`` on a one-stack ``ResNetBackbone``, a
``BertTextClassifier`` on a one-layer ``BertBackbone`` (dict inputs
``token_ids`` / ``segment_ids`` / ``padding_mask``), a ``GPT2CausalLM`` on a
one-layer ``GPT2Backbone`` trained on next-token loss, and ``MobileNetV2``,
``EfficientNetB0``, ``ResNet50V2`` from keras.applications (``weights=None``,
32×32 inputs, 3 classes). Every model is built once per module and trained by
every method from the same initial weights (``set_weights``); a test is a few
steps at batch 4. ``erm`` must train exactly like the model's own ``fit`` (bit for
bit; with embeddings, up to the order of adding a repeated token's rows);
the ``.keras`` file and the exported SavedModel must predict what the trained
model predicts. ``mixed_float16`` runs on one vision and one text model,
``MirroredStrategy`` on 2 logical CPUs in a subprocess (this file is its script:
``python tests/test_ecosystem.py mirrored``): the CPU split must be set before
TensorFlow starts.

Dropout is 0 in the text models so that a step is a function of the weights
and the batch alone (the ERM and 2-replica comparisons need that).
"""

import functools
import json
import os
import subprocess
import sys
from typing import Callable, NamedTuple

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_aesam  # noqa: E402

BATCH = 4
STEPS = 2
N = BATCH * STEPS
CLASSES = 3
VOCABULARY = 50
LENGTH = 8
IMAGE = (32, 32, 3)
METHODS = sorted(keras_aesam.METHODS)
TIMEOUT = 420


# --------------------------------------------------------------------------
# The models, at toy size, and their data
# --------------------------------------------------------------------------
def _resnet_hub():
    backbone = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[3], stackwise_num_filters=[64],
        stackwise_num_blocks=[1], stackwise_num_strides=[1], block_type="basic_block", image_shape=IMAGE)
    return keras_hub.models.ResNetImageClassifier(backbone=backbone, num_classes=CLASSES)


def _bert():
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=VOCABULARY, num_layers=1, num_heads=2, hidden_dim=8, intermediate_dim=16,
        dropout=0.0, max_sequence_length=LENGTH)
    return keras_hub.models.BertTextClassifier(backbone=backbone, num_classes=CLASSES, dropout=0.0)


def _gpt2():
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=VOCABULARY, num_layers=1, num_heads=2, hidden_dim=8, intermediate_dim=16,
        dropout=0.0, max_sequence_length=LENGTH)
    return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)


def _application(name):
    return lambda: getattr(keras.applications, name)(weights=None, input_shape=IMAGE, classes=CLASSES)


def _images(n=N, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(0.0, 1.0, size=(n, *IMAGE)).astype("float32"), np.arange(n) % CLASSES


def _sentences(n=N, seed=0):
    """Token ids with a padded tail in every other sentence (so the mask matters)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, VOCABULARY, size=(n, LENGTH)).astype("int32")
    mask = np.ones((n, LENGTH), "int32")
    mask[::2, LENGTH - 2:] = 0
    tokens[mask == 0] = 0
    x = {"token_ids": tokens, "segment_ids": np.zeros_like(tokens), "padding_mask": mask}
    return x, np.arange(n) % CLASSES


def _next_tokens(n=N, seed=0):
    """Inputs: the first LENGTH tokens; targets: the same shifted by one (next-token loss)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, VOCABULARY, size=(n, LENGTH + 1)).astype("int32")
    return {"token_ids": tokens[:, :-1], "padding_mask": np.ones((n, LENGTH), "int32")}, tokens[:, 1:]


class Case(NamedTuple):
    build: Callable
    data: Callable
    from_logits: bool


CASES = {
    "hub_resnet": Case(_resnet_hub, _images, True),
    "hub_bert": Case(_bert, _sentences, True),
    "hub_gpt2": Case(_gpt2, _next_tokens, True),
    "MobileNetV2": Case(_application("MobileNetV2"), _images, False),
    "EfficientNetB0": Case(_application("EfficientNetB0"), _images, False),
    "ResNet50V2": Case(_application("ResNet50V2"), _images, False),
}
VISION, TEXT = "hub_resnet", "hub_bert"
#: Trained eagerly in the sweep over methods: tracing one SAM step of these networks
#: (150-270 layers, twice: the SAM and the ERM branch) costs far more than running
#: 2 steps (ResNet50V2: about 20 s of CPU per method traced; see the module's notes
#: in docs/guide/ecosystem-models.md). The same step code runs; the save/export test
#: trains them in a graph.
EAGER = {"MobileNetV2", "EfficientNetB0", "ResNet50V2"}


class Built(NamedTuple):
    model: keras.Model
    initial: list  # the weights
    state: list  # every variable: the weights and the dropout layers' seed states


@functools.lru_cache(maxsize=None)
def built(name) -> Built:
    """``name``'s model, built once per process, and its initial variables (restored before each use)."""
    keras.utils.set_random_seed(0)
    model = CASES[name].build()
    return Built(model, model.get_weights(), [v.numpy() for v in model.variables])


def fresh(name) -> keras.Model:
    """The shared model of ``name`` back at its initial weights, its dropout masks' seeds included."""
    model, _, state = built(name)
    for variable, value in zip(model.variables, state):
        variable.assign(value)
    return model


def loss_of(name):
    return keras.losses.SparseCategoricalCrossentropy(from_logits=CASES[name].from_logits)


def compile_sgd(model, name, run_eagerly=False):
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9), loss=loss_of(name), run_eagerly=run_eagerly)
    return model


def fit(model, name, **kwargs):
    x, y = CASES[name].data()
    return model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, **kwargs).history


def changed(before, after):
    return any(not np.array_equal(a, b) for a, b in zip(before, after))


# --------------------------------------------------------------------------
# Every method trains every model
# --------------------------------------------------------------------------
#: Every method on the KerasHub models (embeddings, masks, sparse gradients); on the
#: keras.applications ones, one method per kind of step (no second pass, a SAM pass, ESAM's
#: sample and weight selection, a direction with state, the momentum pass): the other
#: policies differ from these only in their scalar decision, which does not depend on the
#: network and is exercised on the hub models. (Each keras.applications step traced costs
#: seconds; all eleven methods on all three were the suite's largest share.)
STEP_KINDS = ("erm", "sam", "esam", "ae_looksam", "msam")
TRAINED = [(name, method) for name in CASES for method in METHODS
           if name.startswith("hub_") or method in STEP_KINDS]


@pytest.mark.parametrize("name, method", TRAINED)
def test_every_method_trains_the_model(name, method):
    inner = fresh(name)
    model = compile_sgd(keras_aesam.wrap(inner, method=method), name, run_eagerly=name in EAGER)
    history = fit(model, name)
    for key, values in history.items():
        assert np.all(np.isfinite(values)), key
    assert history["skipped_steps"] == [0.0]
    assert model.policy_state["step"] == STEPS
    expected_fraction = model.policy.expected_sam_fraction(STEPS)
    if expected_fraction in (0.0, 1.0):  # erm never, sam and esam always
        assert history["sam_fraction"] == [expected_fraction]
    assert changed(built(name).initial, inner.get_weights())


#: An embedding's gradient is a tf.IndexedSlices with a row per token occurrence; Keras's
#: fit and ours add a repeated token's rows in different orders, so after the first step
#: an embedding row may differ in its last bit (measured: one element of 400, 1.4e-7
#: relative), and the second step carries that through the network (measured: at most
#: 2e-12 absolute). A model with embeddings is held to 1e-3 of the largest weight update
#: (a tensor whose gradient is 0, as attention's key bias, moves by rounding only); a wrong step (a SAM step, a lost
#: momentum term) is off by O(1) of the update. A model without one is bit for bit Keras's.
SPARSE_UPDATE_RTOL = 1e-3


@pytest.mark.parametrize("name", list(CASES))
def test_erm_trains_exactly_like_the_models_own_fit(name):
    eager = name in EAGER
    plain = compile_sgd(fresh(name), name, run_eagerly=eager)
    fit(plain, name)
    expected = plain.get_weights()
    inner = fresh(name)
    fit(compile_sgd(keras_aesam.wrap(inner, method="erm"), name, run_eagerly=eager), name)
    sparse = any(isinstance(layer, keras.layers.Embedding) for layer in inner._flatten_layers())
    update = max(np.abs(b - w0).max() for b, w0 in zip(expected, built(name).initial))
    for a, b, w in zip(inner.get_weights(), expected, inner.weights):
        if sparse:
            assert np.abs(a - b).max() <= SPARSE_UPDATE_RTOL * update, w.path
        else:
            np.testing.assert_array_equal(a, b, err_msg=w.path)


# --------------------------------------------------------------------------
# Saving and serving
# --------------------------------------------------------------------------
def _serve(path, x):
    reloaded = tf.saved_model.load(str(path))  # held: its variables live as long as it does
    if isinstance(x, dict):
        return reloaded.serve({k: tf.constant(v) for k, v in x.items()}).numpy()
    return reloaded.serve(tf.constant(x)).numpy()


#: ResNet50V2's layers (conv, BatchNorm, residual adds) are hub_resnet's and MobileNetV2's,
#: and its file and export took 22 s of the suite; it trains with every method above.
SAVED = [name for name in CASES if name != "ResNet50V2"]


@pytest.mark.parametrize("name", SAVED)
def test_the_keras_file_and_the_export_predict_what_the_trained_model_predicts(name, tmp_path):
    """Same process, same kernels: the reloaded model runs the same operations on the
    same weights, so it predicts bit for bit alike; the SavedModel is another graph
    of the same operations (float32 rounding, 1e-5 relative, allowed)."""
    model = compile_sgd(keras_aesam.wrap(fresh(name), method="ae_looksam"), name, run_eagerly=name in EAGER)
    fit(model, name)
    model.run_eagerly = False  # trained eagerly where tracing costs most; predicts in a graph like the loaded one
    x, _ = CASES[name].data(seed=1)
    expected = model.predict(x, batch_size=BATCH, verbose=0)

    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    assert type(loaded) is type(model) and type(loaded.inner) is type(model.inner)
    assert loaded.policy_state == model.policy_state
    np.testing.assert_array_equal(loaded.predict(x, batch_size=BATCH, verbose=0), expected)

    model.export(tmp_path / "export", verbose=False)
    np.testing.assert_allclose(_serve(tmp_path / "export", x), expected, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------
# Mixed precision
# --------------------------------------------------------------------------
@pytest.fixture
def mixed_float16():
    keras.mixed_precision.set_global_policy("mixed_float16")
    yield
    keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("method", ["sam", "esam", "ae_looksam"])
@pytest.mark.parametrize("name", [VISION, TEXT])
def test_mixed_float16_trains(name, method, mixed_float16):
    keras.utils.set_random_seed(0)
    inner = CASES[name].build()
    assert inner.dtype_policy.name == "mixed_float16"
    model = compile_sgd(keras_aesam.wrap(inner, method=method), name)
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    history = fit(model, name)
    assert np.all(np.isfinite(history["loss"]))
    # float16's first steps may overflow while the loss scale settles: skipped, not counted
    assert model.policy_state["step"] + round(sum(history["skipped_steps"])) == STEPS


# --------------------------------------------------------------------------
# Two replicas (subprocess: the CPU split must come before TensorFlow starts)
# --------------------------------------------------------------------------
MIRRORED_METHODS = ("sam", "ae_looksam")


def _mirrored_runs():
    """In the subprocess: per model and method, the 2-replica run and the one-device run."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])
    out = {}
    for name in (VISION, TEXT):
        for method in MIRRORED_METHODS:
            runs = {}
            strategies = {"mirrored": tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])}
            if name == TEXT:  # the one-device twin (BatchNorm makes the vision model's replicas differ)
                strategies["one"] = tf.distribute.OneDeviceStrategy("/cpu:0")
            for label, strategy in strategies.items():
                with strategy.scope():
                    keras.utils.set_random_seed(0)
                    inner = CASES[name].build()
                    model = compile_sgd(keras_aesam.wrap(inner, method=method), name)
                history = fit(model, name)
                runs[label] = {"replicas": strategy.num_replicas_in_sync, "history": history,
                               "steps": model.policy_state["step"],
                               "weights": [w.tolist() for w in inner.get_weights()]}
            runs["initial"] = [w.tolist() for w in built(name).initial]
            out[f"{name}/{method}"] = runs
    return out


@pytest.fixture(scope="module")
def mirrored():
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run([sys.executable, __file__, "mirrored"], capture_output=True, text=True,
                          env=env, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _flat(weights):
    return np.concatenate([np.ravel(w) for w in weights])


@pytest.mark.parametrize("method", MIRRORED_METHODS)
@pytest.mark.parametrize("name", [VISION, TEXT])
def test_mirrored_on_two_logical_cpus_trains(mirrored, name, method):
    runs = mirrored[f"{name}/{method}"]
    two = runs["mirrored"]
    assert two["replicas"] == 2 and two["steps"] == STEPS
    assert np.all(np.isfinite(two["history"]["loss"]))
    initial, w_two = _flat(runs["initial"]), _flat(two["weights"])
    assert np.linalg.norm(w_two - initial) > 0
    if name == TEXT:
        w_one = _flat(runs["one"]["weights"])
        # No BatchNorm and no dropout: the 2-replica step is the one-device step on the
        # global batch, up to float32 summation order. A gradient entry is a sum over
        # 4 examples × 8 positions of products through dot products of at most 16
        # terms, 2 layers deep: at most ~100 roundings, 100·u = 6e-6 of the update
        # (u = 2^-24). 1e-3 leaves a factor 100 for 2 steps' feedback through SAM's
        # normalized perturbation. A missing 1/replicas doubles the update (off by 1×).
        update = np.linalg.norm(w_one - initial)
        assert np.linalg.norm(w_two - w_one) <= 1e-3 * update


if __name__ == "__main__" and sys.argv[1:] == ["mirrored"]:
    print(json.dumps(_mirrored_runs()))
