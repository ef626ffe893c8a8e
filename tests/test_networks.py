"""Tests for keras_aesam.networks: published parameter counts and one training step."""

import keras
import numpy as np
import pytest

from keras_aesam import networks


def trainable_params(model):
    """Parameters as PyTorch and the papers count them (BN moving statistics excluded)."""
    return int(sum(np.prod(w.shape) for w in model.trainable_weights))


# (builder name, kwargs, published figure, where it is published)
PUBLISHED = [
    ("resnet18", {}, 11_173_962, "PyTorch CIFAR ResNet-18 used by SAM papers (11.17 M)"),
    ("resnet32", {}, 464_154, "He et al. 2016, Table 6: 0.46 M"),
    ("wrn28_10", {}, 36_479_194, "Zagoruyko & Komodakis 2016: 36.5 M"),
    ("pyramidnet110", {}, 1_772_706, "Han et al. 2017 Table 4 says 1.7 M; exact count of reference code"),
    ("vit_s16", dict(num_classes=1000, input_shape=(224, 224, 3)), 22_050_664, "DeiT-S / ViT-S/16: 22 M"),
]


@pytest.mark.parametrize("name,kwargs,expected,where", PUBLISHED, ids=[p[0] for p in PUBLISHED])
def test_parameter_counts_match_published_figures(name, kwargs, expected, where):
    model = networks.get_network(name, **kwargs)
    count = trainable_params(model)
    assert abs(count - expected) / expected < 0.02, f"{name}: {count:,} vs {expected:,} ({where})"
    if name == "pyramidnet110":
        assert 1_700_000 <= count < 1_800_000  # "1.7 M" at the paper's precision
    if name == "vit_s16":
        backbone = count - trainable_params(model.get_layer("logits"))
        assert abs(backbone - 21_700_000) / 21_700_000 < 0.02  # the 21.7 M quoted without the head
        assert model.output_shape == (None, 1000)


def test_small_cnn_size_and_shapes():
    model = networks.small_cnn(10, (28, 28, 1))
    assert 100_000 <= trainable_params(model) <= 300_000
    assert model.output_shape == (None, 10)


def test_number_of_classes_changes_only_the_head():
    ten = trainable_params(networks.resnet32(10))
    hundred = trainable_params(networks.resnet32(100))
    assert hundred - ten == 90 * (64 + 1)


def test_no_regularization_unless_asked():
    assert networks.resnet32().losses == []
    model = networks.resnet32(kernel_regularizer=keras.regularizers.L2(1e-4))
    kernels = [layer for layer in model.layers if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense))]
    assert len(model.losses) == len(kernels) == 32  # 31 convs + head
    conv = next(layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D))
    assert isinstance(conv.kernel_initializer, keras.initializers.HeNormal)


def test_vit_regularizer_reaches_attention_and_mlp():
    model = networks.vit(10, (16, 16, 3), patch_size=4, dim=32, depth=1, num_heads=2, mlp_dim=64,
                         kernel_regularizer=keras.regularizers.L2(1e-4))
    # patch conv + q, k, v, out + 2 MLP denses + head
    assert len(model.losses) == 8


def _one_fit(model, input_shape, num_classes=10, batch=2, steps=2, run_eagerly=False):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch * steps, *input_shape)).astype("float32")
    y = rng.integers(0, num_classes, size=batch * steps).astype("int32")
    model.compile(
        optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=False,  # XLA compilation only slows a 2-step CPU test
        run_eagerly=run_eagerly,
    )
    before = [np.array(w.value.numpy()) for w in model.trainable_weights]
    history = model.fit(x, y, batch_size=batch, epochs=1, verbose=0)
    loss = history.history["loss"][-1]
    assert np.isfinite(loss)
    assert any(not np.array_equal(b, w.value.numpy()) for b, w in zip(before, model.trainable_weights))
    preds = keras.ops.convert_to_numpy(model(x[:batch], training=False))
    assert preds.shape == (batch, num_classes) and np.all(np.isfinite(preds))


# Deep ResNets train eagerly here: tracing their graph costs ~3x the whole test on
# 2 CPU cores; graph mode is covered by the small CNN, the ViT and the tiny nets.
@pytest.mark.parametrize(
    "build,input_shape,eager",
    [
        (lambda: networks.small_cnn(10, (28, 28, 1)), (28, 28, 1), False),
        (lambda: networks.resnet18(10, (32, 32, 3)), (32, 32, 3), True),
        (lambda: networks.resnet32(10, (32, 32, 3)), (32, 32, 3), True),
        (
            lambda: networks.vit(10, (16, 16, 3), patch_size=4, dim=32, depth=2, num_heads=2, mlp_dim=64),
            (16, 16, 3),
            False,
        ),
    ],
    ids=["small_cnn", "resnet18", "resnet32", "tiny_vit"],
)
def test_one_training_step(build, input_shape, eager):
    keras.utils.set_random_seed(0)
    _one_fit(build(), input_shape, run_eagerly=eager)


def test_tiny_pyramidnet_and_wrn_train(tmp_path):
    keras.utils.set_random_seed(0)
    _one_fit(networks.pyramidnet(depth=8, alpha=8, input_shape=(8, 8, 3)), (8, 8, 3))
    _one_fit(networks.wide_resnet(depth=10, width=1, input_shape=(8, 8, 3), dropout_rate=0.1), (8, 8, 3))


@pytest.mark.parametrize(
    "build",
    [
        lambda: networks.pyramidnet(depth=8, alpha=8, input_shape=(8, 8, 3)),
        lambda: networks.vit(10, (8, 8, 3), patch_size=4, dim=16, depth=1, num_heads=2, mlp_dim=32),
    ],
    ids=["pyramidnet_zero_pad", "vit_tokens"],
)
def test_custom_layers_survive_save_and_load(build, tmp_path):
    model = build()
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype("float32")
    path = tmp_path / "model.keras"
    model.save(path)
    restored = keras.saving.load_model(path)
    np.testing.assert_allclose(model.predict(x, verbose=0), restored.predict(x, verbose=0), rtol=1e-5, atol=1e-6)


def test_channel_zero_pad_values():
    x = np.arange(2 * 4 * 4 * 2, dtype="float32").reshape(2, 4, 4, 2)
    y = keras.ops.convert_to_numpy(networks.ChannelZeroPad(5, stride=2)(x))
    assert y.shape == (2, 2, 2, 5)
    np.testing.assert_array_equal(y[..., :2], x[:, ::2, ::2, :])
    assert np.all(y[..., 2:] == 0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="patch_size must be >= 1 and divide"):
        networks.vit(10, (30, 30, 3), patch_size=4)
    with pytest.raises(ValueError, match="depth must be 6n\\+4"):
        networks.wide_resnet(depth=27)
    with pytest.raises(ValueError, match="depth must be 6n\\+2"):
        networks.pyramidnet(depth=100)
    with pytest.raises(ValueError, match="num_classes must be an integer >= 1"):
        networks.resnet18(num_classes=0)


def test_unknown_network_lists_valid_names():
    with pytest.raises(ValueError) as info:
        networks.get_network("resnet50")
    for name in ("small_cnn", "resnet18", "resnet32", "wrn28_10", "pyramidnet110", "vit_s16"):
        assert name in str(info.value)
    assert networks.get_network("ResNet-32").name == "resnet32"
