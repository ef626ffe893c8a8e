"""The paper's networks as Keras 3 functional models.

Every builder has the signature ``fn(num_classes=10, input_shape=(32, 32, 3), ...)``
and returns an uncompiled :class:`keras.Model` whose output is **logits** (no
softmax): compile with ``SparseCategoricalCrossentropy(from_logits=True)``, or pass
``classifier_activation="softmax"``.

Section 4.1 of the AE-SAM paper trains ResNet-18, WRN-28-10 and PyramidNet-110 on
CIFAR and ViT-S/16 on ImageNet; ResNet-32 is the classic CIFAR ResNet (He et al.,
2016) and ``small_cnn`` is a fast CPU network for Fashion-MNIST.

Conventions shared by all builders:

* No weight decay inside the networks: regularization is the caller's choice (see
  "Weight decay" in docs/design.md). An optional ``kernel_regularizer``
  is passed to every conv / dense kernel for callers who want an L2 term in the loss.
* Convolutions use ``kernel_initializer="he_normal"`` and no bias when followed by
  BatchNorm.
* BatchNorm uses PyTorch's defaults (``momentum=0.9`` in Keras terms, ``epsilon=1e-5``)
  because the paper's numbers come from a PyTorch code base.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import keras
from keras import layers, ops

from keras_aesam.validation import canonical_name as _canonical

__all__ = [
    "ChannelZeroPad",
    "ClassTokenAndPosition",
    "ClassTokenSelect",
    "NETWORKS",
    "get_network",
    "mlp",
    "pyramidnet110",
    "resnet18",
    "resnet32",
    "small_cnn",
    "vit",
    "vit_s16",
    "wide_resnet",
    "wrn28_10",
    "pyramidnet",
]

_BN_MOMENTUM = 0.9  # PyTorch BatchNorm momentum 0.1
_BN_EPSILON = 1e-5


# --------------------------------------------------------------------------- layers


@keras.saving.register_keras_serializable(package="keras_aesam")
class ChannelZeroPad(layers.Layer):
    """Parameter-free shortcut: optional spatial subsampling, then zero channels.

    This is the "option A" identity shortcut of He et al. (2016, CIFAR ResNets) and
    the zero-padded shortcut of PyramidNet (Han et al., 2017): the extra output
    channels are zeros, so the shortcut adds no parameters.
    """

    def __init__(self, out_channels: int, stride: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.out_channels = int(out_channels)
        self.stride = int(stride)

    def call(self, x):
        if self.stride > 1:
            x = x[:, :: self.stride, :: self.stride, :]
        extra = self.out_channels - x.shape[-1]
        if extra > 0:
            x = ops.pad(x, [[0, 0], [0, 0], [0, 0], [0, extra]])
        return x

    def compute_output_shape(self, input_shape):
        n, h, w, _ = input_shape
        if self.stride > 1:
            h = None if h is None else math.ceil(h / self.stride)
            w = None if w is None else math.ceil(w / self.stride)
        return (n, h, w, self.out_channels)

    def get_config(self):
        return {**super().get_config(), "out_channels": self.out_channels, "stride": self.stride}


@keras.saving.register_keras_serializable(package="keras_aesam")
class ClassTokenAndPosition(layers.Layer):
    """Prepends a learned class token and adds learned position embeddings (ViT)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)

    def build(self, input_shape):
        _, num_patches, dim = input_shape
        init = keras.initializers.TruncatedNormal(stddev=0.02)
        self.cls_token = self.add_weight(shape=(1, 1, dim), initializer="zeros", name="cls_token")
        self.position = self.add_weight(
            shape=(1, num_patches + 1, dim), initializer=init, name="position_embedding"
        )

    def call(self, x):
        batch = ops.shape(x)[0]
        cls = ops.broadcast_to(ops.cast(self.cls_token, x.dtype), (batch, 1, x.shape[-1]))
        return ops.concatenate([cls, x], axis=1) + ops.cast(self.position, x.dtype)

    def compute_output_shape(self, input_shape):
        n, p, d = input_shape
        return (n, None if p is None else p + 1, d)


@keras.saving.register_keras_serializable(package="keras_aesam")
class ClassTokenSelect(layers.Layer):
    """Returns the class-token position of a token sequence, shape (batch, dim)."""

    def call(self, x):
        return x[:, 0]

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])


# -------------------------------------------------------------------------- helpers


def _conv(filters, kernel_size, stride=1, reg=None, name=None, use_bias=False):
    """3x3 / 1x1 'same' convolution with He-normal init and no bias by default."""
    return layers.Conv2D(
        filters,
        kernel_size,
        strides=stride,
        padding="same",
        use_bias=use_bias,
        kernel_initializer="he_normal",
        kernel_regularizer=reg,
        name=name,
    )


def _bn(name=None):
    return layers.BatchNormalization(momentum=_BN_MOMENTUM, epsilon=_BN_EPSILON, name=name)


def _head(x, num_classes, reg, activation, name="logits"):
    """Global average pool + dense classifier."""
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    return layers.Dense(num_classes, kernel_regularizer=reg, activation=activation, name=name)(x)


def _check_num_classes(num_classes):
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")


def _check_input_shape(input_shape, min_side=1):
    shape = tuple(input_shape)
    if len(shape) != 3 or any(int(s) < 1 for s in shape):
        raise ValueError(f"input_shape must be (height, width, channels) of positive ints, got {input_shape!r}")
    if min(shape[:2]) < min_side:
        raise ValueError(f"input_shape height and width must be >= {min_side}, got {input_shape!r}")
    return shape


# --------------------------------------------------------------------------- small CNN


def small_cnn(
    num_classes: int = 10,
    input_shape: Sequence[int] = (28, 28, 1),
    *,
    dropout_rate: float = 0.25,
    kernel_regularizer=None,
    classifier_activation=None,
) -> keras.Model:
    """Two conv blocks (32, 64 filters) with BatchNorm, max-pool and Dropout.

    A fast CPU baseline for Fashion-MNIST (~0.22 M parameters at 28x28x1); the
    README's public reference point for such a network is 91-92 % test accuracy.
    """
    _check_num_classes(num_classes)
    input_shape = _check_input_shape(input_shape, min_side=4)
    reg = kernel_regularizer
    inputs = keras.Input(shape=input_shape, name="images")
    x = inputs
    for i, filters in enumerate((32, 64)):
        x = _conv(filters, 3, reg=reg, name=f"conv{i + 1}")(x)
        x = _bn(name=f"bn{i + 1}")(x)
        x = layers.ReLU(name=f"relu{i + 1}")(x)
        x = layers.MaxPooling2D(2, name=f"pool{i + 1}")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dropout(dropout_rate, name="dropout1")(x)
    x = layers.Dense(64, activation="relu", kernel_regularizer=reg, name="fc")(x)
    x = layers.Dropout(2 * dropout_rate, name="dropout2")(x)
    outputs = layers.Dense(num_classes, kernel_regularizer=reg, activation=classifier_activation, name="logits")(x)
    return keras.Model(inputs, outputs, name="small_cnn")


def mlp(
    num_classes: int = 10,
    input_shape: Sequence[int] = (28, 28, 1),
    *,
    hidden_units: Sequence[int] = (512, 512),
    kernel_regularizer=None,
    classifier_activation=None,
) -> keras.Model:
    """A ReLU multilayer perceptron on the flattened image (784-512-512-10 by default).

    No BatchNorm and no Dropout, so every replica computes the same function and
    nothing is random inside a step. With noisy labels it memorizes the noise
    within a few dozen epochs: the regime of the noisy-labels bench profile,
    where SAM clearly beats ERM.
    """
    _check_num_classes(num_classes)
    input_shape = _check_input_shape(input_shape)
    units = tuple(hidden_units)
    if not units or any(isinstance(u, bool) or not isinstance(u, int) or u < 1 for u in units):
        raise ValueError(f"hidden_units must be a non-empty sequence of integers >= 1, got {hidden_units!r}")
    inputs = keras.Input(shape=input_shape, name="images")
    x = layers.Flatten(name="flatten")(inputs)
    for i, width in enumerate(units):
        x = layers.Dense(width, activation="relu", kernel_regularizer=kernel_regularizer, name=f"dense{i + 1}")(x)
    outputs = layers.Dense(num_classes, kernel_regularizer=kernel_regularizer, activation=classifier_activation,
                           name="logits")(x)
    return keras.Model(inputs, outputs, name="mlp")


# ------------------------------------------------------------------ ResNet-18 (CIFAR)


def _basic_block(x, filters, stride, reg, name):
    """Post-activation BasicBlock with a 1x1 projection shortcut when shapes change."""
    shortcut = x
    if stride != 1 or x.shape[-1] != filters:
        shortcut = _conv(filters, 1, stride, reg, name=f"{name}_proj")(x)
        shortcut = _bn(name=f"{name}_proj_bn")(shortcut)
    y = _conv(filters, 3, stride, reg, name=f"{name}_conv1")(x)
    y = layers.ReLU(name=f"{name}_relu1")(_bn(name=f"{name}_bn1")(y))
    y = _conv(filters, 3, 1, reg, name=f"{name}_conv2")(y)
    y = _bn(name=f"{name}_bn2")(y)
    y = layers.Add(name=f"{name}_add")([y, shortcut])
    return layers.ReLU(name=f"{name}_out")(y)


def resnet18(
    num_classes: int = 10,
    input_shape: Sequence[int] = (32, 32, 3),
    *,
    kernel_regularizer=None,
    classifier_activation=None,
) -> keras.Model:
    """CIFAR-style ResNet-18 (paper §4.1): 3x3 stem, no max-pool, [2,2,2,2] blocks.

    Widths 64/128/256/512; 11,173,962 parameters for 10 classes, the figure of the
    widely used PyTorch CIFAR ResNet-18 that SAM papers train.
    """
    _check_num_classes(num_classes)
    input_shape = _check_input_shape(input_shape)
    reg = kernel_regularizer
    inputs = keras.Input(shape=input_shape, name="images")
    x = _conv(64, 3, 1, reg, name="stem_conv")(inputs)
    x = layers.ReLU(name="stem_relu")(_bn(name="stem_bn")(x))
    for stage, filters in enumerate((64, 128, 256, 512)):
        for block in range(2):
            stride = 2 if (block == 0 and stage > 0) else 1
            x = _basic_block(x, filters, stride, reg, name=f"stage{stage + 1}_block{block + 1}")
    outputs = _head(x, num_classes, reg, classifier_activation)
    return keras.Model(inputs, outputs, name="resnet18")


# ------------------------------------------------------------------ ResNet-32 (CIFAR)


def _option_a_block(x, filters, stride, reg, name):
    """He et al. (2016) CIFAR block: identity shortcut, zero-padded when widening."""
    shortcut = x
    if stride != 1 or x.shape[-1] != filters:
        shortcut = ChannelZeroPad(filters, stride, name=f"{name}_shortcut")(x)
    y = _conv(filters, 3, stride, reg, name=f"{name}_conv1")(x)
    y = layers.ReLU(name=f"{name}_relu1")(_bn(name=f"{name}_bn1")(y))
    y = _conv(filters, 3, 1, reg, name=f"{name}_conv2")(y)
    y = _bn(name=f"{name}_bn2")(y)
    y = layers.Add(name=f"{name}_add")([y, shortcut])
    return layers.ReLU(name=f"{name}_out")(y)


def resnet32(
    num_classes: int = 10,
    input_shape: Sequence[int] = (32, 32, 3),
    *,
    kernel_regularizer=None,
    classifier_activation=None,
) -> keras.Model:
    """CIFAR ResNet-32 of He et al. (2016): 3 stages x 5 basic blocks, 16/32/64 channels.

    Uses the paper's parameter-free option-A shortcuts, giving 464,154 parameters
    for 10 classes (0.46 M in He et al.'s Table 6).
    """
    _check_num_classes(num_classes)
    input_shape = _check_input_shape(input_shape)
    reg = kernel_regularizer
    inputs = keras.Input(shape=input_shape, name="images")
    x = _conv(16, 3, 1, reg, name="stem_conv")(inputs)
    x = layers.ReLU(name="stem_relu")(_bn(name="stem_bn")(x))
    for stage, filters in enumerate((16, 32, 64)):
        for block in range(5):
            stride = 2 if (block == 0 and stage > 0) else 1
            x = _option_a_block(x, filters, stride, reg, name=f"stage{stage + 1}_block{block + 1}")
    outputs = _head(x, num_classes, reg, classifier_activation)
    return keras.Model(inputs, outputs, name="resnet32")


# ----------------------------------------------------------------------- WRN-28-10


def _wide_block(x, filters, stride, dropout_rate, reg, name):
    """Pre-activation wide block (Zagoruyko & Komodakis, 2016): BN-ReLU-conv x2."""
    pre = layers.ReLU(name=f"{name}_relu1")(_bn(name=f"{name}_bn1")(x))
    if stride != 1 or x.shape[-1] != filters:
        shortcut = _conv(filters, 1, stride, reg, name=f"{name}_proj")(pre)
    else:
        shortcut = x
    y = _conv(filters, 3, stride, reg, name=f"{name}_conv1")(pre)
    y = layers.ReLU(name=f"{name}_relu2")(_bn(name=f"{name}_bn2")(y))
    if dropout_rate > 0:
        y = layers.Dropout(dropout_rate, name=f"{name}_dropout")(y)
    y = _conv(filters, 3, 1, reg, name=f"{name}_conv2")(y)
    return layers.Add(name=f"{name}_add")([y, shortcut])


def wide_resnet(
    depth: int = 28,
    width: int = 10,
    num_classes: int = 10,
    input_shape: Sequence[int] = (32, 32, 3),
    *,
    dropout_rate: float = 0.0,
    kernel_regularizer=None,
    classifier_activation=None,
) -> keras.Model:
    """WideResNet-depth-width with pre-activation blocks and 1x1 projection shortcuts."""
    if (depth - 4) % 6 != 0 or depth < 10:
        raise ValueError(f"depth must be 6n+4 with n >= 1 (e.g. 16, 22, 28, 40), got {depth!r}")
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width!r}")
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate!r}")
    _check_num_classes(num_classes)
    input_shape = _check_input_shape(input_shape)
    reg = kernel_regularizer
    n = (depth - 4) // 6
    inputs = keras.Input(shape=input_shape, name="images")
    x = _conv(16, 3, 1, reg, name="stem_conv")(inputs)
    for stage, filters in enumerate((16 * width, 32 * width, 64 * width)):
        for block in range(n):
            stride = 2 if (block == 0 and stage > 0) else 1
            x = _wide_block(x, filters, stride, dropout_rate, reg, name=f"stage{stage + 1}_block{block + 1}")
    x = layers.ReLU(name="final_relu")(_bn(name="final_bn")(x))
    outputs = _head(x, num_classes, reg, classifier_activation)
    return keras.Model(inputs, outputs, name=f"wrn{depth}_{width}")


def wrn28_10(
    num_classes: int = 10,
    input_shape: Sequence[int] = (32, 32, 3),
    *,
    dropout_rate: float = 0.0,
    kernel_regularizer=None,
    classifier_activation=None,
) -> keras.Model:
    """WideResNet-28-10 (paper §4.1): 36,479,194 parameters for 10 classes (36.5 M).

    ``dropout_rate`` defaults to 0, as in the SAM papers' WRN runs (WRN's own paper
    also reports 0.3).
    """
    return wide_resnet(
        28,
        10,
        num_classes,
        input_shape,
        dropout_rate=dropout_rate,
        kernel_regularizer=kernel_regularizer,
        classifier_activation=classifier_activation,
    )


# ---------------------------------------------------------------------- PyramidNet


def _pyramid_block(x, filters, stride, reg, name):
    """PyramidNet basic unit: BN-conv-BN-ReLU-conv-BN, zero-padded identity shortcut.

    Downsampling shortcuts use 2x2 average pooling, as in Han et al. (2017).
    """
    shortcut = x
    if stride != 1:
        shortcut = layers.AveragePooling2D(2, padding="same", name=f"{name}_pool")(shortcut)
    if shortcut.shape[-1] != filters:
        shortcut = ChannelZeroPad(filters, 1, name=f"{name}_shortcut")(shortcut)
    y = _bn(name=f"{name}_bn1")(x)
    y = _conv(filters, 3, stride, reg, name=f"{name}_conv1")(y)
    y = layers.ReLU(name=f"{name}_relu")(_bn(name=f"{name}_bn2")(y))
    y = _conv(filters, 3, 1, reg, name=f"{name}_conv2")(y)
    y = _bn(name=f"{name}_bn3")(y)
    return layers.Add(name=f"{name}_add")([y, shortcut])


def pyramidnet(
    depth: int = 110,
    alpha: float = 48,
    num_classes: int = 10,
    input_shape: Sequence[int] = (32, 32, 3),
    *,
    kernel_regularizer=None,
    classifier_activation=None,
) -> keras.Model:
    """Additive PyramidNet with basic blocks: width grows by alpha/N per block."""
    if (depth - 2) % 6 != 0 or depth < 8:
        raise ValueError(f"depth must be 6n+2 with n >= 1 (e.g. 110), got {depth!r}")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha!r}")
    _check_num_classes(num_classes)
    input_shape = _check_input_shape(input_shape)
    reg = kernel_regularizer
    n = (depth - 2) // 6
    add_rate = alpha / (3 * n)
    inputs = keras.Input(shape=input_shape, name="images")
    x = _bn(name="stem_bn")(_conv(16, 3, 1, reg, name="stem_conv")(inputs))
    width = 16.0
    for stage in range(3):
        for block in range(n):
            width += add_rate
            stride = 2 if (block == 0 and stage > 0) else 1
            x = _pyramid_block(x, int(round(width)), stride, reg, name=f"stage{stage + 1}_block{block + 1}")
    x = layers.ReLU(name="final_relu")(_bn(name="final_bn")(x))
    outputs = _head(x, num_classes, reg, classifier_activation)
    return keras.Model(inputs, outputs, name=f"pyramidnet{depth}_a{alpha:g}")


def pyramidnet110(
    num_classes: int = 10,
    input_shape: Sequence[int] = (32, 32, 3),
    *,
    alpha: float = 48,
    kernel_regularizer=None,
    classifier_activation=None,
) -> keras.Model:
    """PyramidNet-110, alpha=48, basic blocks (paper §4.1; Han et al. 2017 Table 4: 1.7 M).

    This implementation has 1,772,706 parameters for 10 classes, the exact count
    of the public reference implementations.
    """
    return pyramidnet(
        110,
        alpha,
        num_classes,
        input_shape,
        kernel_regularizer=kernel_regularizer,
        classifier_activation=classifier_activation,
    )


# ----------------------------------------------------------------------------- ViT


def _transformer_block(x, num_heads, mlp_dim, dropout_rate, reg, name):
    """Pre-LayerNorm encoder block: x + MHSA(LN(x)); x + MLP(LN(x))."""
    dim = x.shape[-1]
    y = layers.LayerNormalization(epsilon=1e-6, name=f"{name}_ln1")(x)
    y = layers.MultiHeadAttention(
        num_heads,
        dim // num_heads,
        dropout=dropout_rate,
        kernel_regularizer=reg,
        name=f"{name}_attn",
    )(y, y)
    x = layers.Add(name=f"{name}_add1")([x, y])
    y = layers.LayerNormalization(epsilon=1e-6, name=f"{name}_ln2")(x)
    y = layers.Dense(mlp_dim, activation="gelu", kernel_regularizer=reg, name=f"{name}_mlp1")(y)
    y = layers.Dropout(dropout_rate, name=f"{name}_drop1")(y)
    y = layers.Dense(dim, kernel_regularizer=reg, name=f"{name}_mlp2")(y)
    y = layers.Dropout(dropout_rate, name=f"{name}_drop2")(y)
    return layers.Add(name=f"{name}_add2")([x, y])


def vit(
    num_classes: int = 10,
    input_shape: Sequence[int] = (32, 32, 3),
    *,
    patch_size: int = 4,
    dim: int = 384,
    depth: int = 12,
    num_heads: int = 6,
    mlp_dim: int = 1536,
    dropout_rate: float = 0.0,
    kernel_regularizer=None,
    classifier_activation=None,
    name: str = "vit",
) -> keras.Model:
    """Vision Transformer (Dosovitskiy et al., 2021) with a class token and pre-LN blocks.

    Every size is a parameter so that small configurations (tests) and CIFAR-sized
    inputs work; the image side must be a multiple of ``patch_size``.
    """
    _check_num_classes(num_classes)
    input_shape = _check_input_shape(input_shape)
    h, w, _ = input_shape
    if patch_size < 1 or h % patch_size or w % patch_size:
        raise ValueError(
            f"patch_size must be >= 1 and divide the image height and width {h}x{w}, got {patch_size!r}"
        )
    if dim < 1 or num_heads < 1 or dim % num_heads:
        raise ValueError(f"dim must be a positive multiple of num_heads, got dim={dim!r}, num_heads={num_heads!r}")
    if depth < 1 or mlp_dim < 1:
        raise ValueError(f"depth and mlp_dim must be >= 1, got depth={depth!r}, mlp_dim={mlp_dim!r}")
    reg = kernel_regularizer
    inputs = keras.Input(shape=input_shape, name="images")
    x = _conv(dim, patch_size, patch_size, reg, name="patch_embed", use_bias=True)(inputs)
    x = layers.Reshape(((h // patch_size) * (w // patch_size), dim), name="patches")(x)
    x = ClassTokenAndPosition(name="cls_pos")(x)
    x = layers.Dropout(dropout_rate, name="embed_dropout")(x)
    for i in range(depth):
        x = _transformer_block(x, num_heads, mlp_dim, dropout_rate, reg, name=f"block{i + 1}")
    x = layers.LayerNormalization(epsilon=1e-6, name="final_ln")(x)
    x = ClassTokenSelect(name="cls_select")(x)
    outputs = layers.Dense(num_classes, kernel_regularizer=reg, activation=classifier_activation, name="logits")(x)
    return keras.Model(inputs, outputs, name=name)


def vit_s16(
    num_classes: int = 10,
    input_shape: Sequence[int] = (32, 32, 3),
    *,
    patch_size: int = 16,
    dropout_rate: float = 0.0,
    kernel_regularizer=None,
    classifier_activation=None,
) -> keras.Model:
    """ViT-S/16 (paper §4.1): patch 16, dim 384, depth 12, 6 heads, MLP 1536.

    At 224x224 with 1000 classes this has 22,050,664 parameters (21,665,664 without
    the classification head). For CIFAR-sized input pass a smaller ``patch_size``
    (e.g. 4, giving 64 tokens); the default 16 gives only 4 tokens at 32x32.
    """
    return vit(
        num_classes,
        input_shape,
        patch_size=patch_size,
        dim=384,
        depth=12,
        num_heads=6,
        mlp_dim=1536,
        dropout_rate=dropout_rate,
        kernel_regularizer=kernel_regularizer,
        classifier_activation=classifier_activation,
        name="vit_s16",
    )


# ------------------------------------------------------------------------ registry

NETWORKS: dict[str, Callable[..., keras.Model]] = {
    "small_cnn": small_cnn,
    "resnet18": resnet18,
    "resnet32": resnet32,
    "wrn28_10": wrn28_10,
    "pyramidnet110": pyramidnet110,
    "vit_s16": vit_s16,
    "vit": vit,
    "mlp": mlp,
}


def get_network(name: str, **kwargs) -> keras.Model:
    """Builds the network called ``name`` (case, '-', '_' and '/' ignored)."""
    wanted = _canonical(name)
    for key, builder in NETWORKS.items():
        if _canonical(key) == wanted:
            return builder(**kwargs)
    raise ValueError(f"unknown network {name!r}; valid names: {', '.join(sorted(NETWORKS))}")


