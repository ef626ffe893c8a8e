"""The bench's CIFAR-style ResNets, buildable in Keras 3 and in tf_keras (for the peer row)."""

from __future__ import annotations

from keras_aesam import recipe


def _resnet_cifar(K, blocks, *, num_classes=10, input_shape=(28, 28, 1), kernel_regularizer=None,
                  widths=(16, 32, 64), name="resnet", bn_options=None):
    """A CIFAR-style ResNet (He et al., 2016) from the layers of ``K`` (``keras`` or ``tf_keras``).

    3x3 stem, three stages of ``blocks`` post-activation BasicBlocks (16/32/64
    channels, stride 2 between stages), 1x1 projection shortcuts where the shape
    changes (plain layers, so the same graph can be rebuilt in ``tf_keras``),
    BatchNorm with PyTorch's defaults (momentum 0.1, eps 1e-5, as in
    :mod:`keras_aesam.networks`), global average pooling and a dense layer
    giving logits. Depth ``6·blocks + 2``.
    """
    layers = K.layers
    reg = kernel_regularizer

    def conv(filters, size, stride, layer_name):
        return layers.Conv2D(filters, size, strides=stride, padding="same", use_bias=False,
                             kernel_initializer="he_normal", kernel_regularizer=reg() if reg else None,
                             name=layer_name)

    def bn(layer_name):
        return layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=layer_name, **(bn_options or {}))

    inputs = K.Input(shape=tuple(input_shape), name="images")
    x = conv(widths[0], 3, 1, "stem_conv")(inputs)
    x = layers.ReLU(name="stem_relu")(bn("stem_bn")(x))
    for stage, filters in enumerate(widths):
        for block in range(blocks):
            stride = 2 if (block == 0 and stage > 0) else 1
            prefix = f"stage{stage + 1}_block{block + 1}"
            shortcut = x
            if stride != 1 or x.shape[-1] != filters:
                shortcut = bn(f"{prefix}_proj_bn")(conv(filters, 1, stride, f"{prefix}_proj")(x))
            y = conv(filters, 3, stride, f"{prefix}_conv1")(x)
            y = layers.ReLU(name=f"{prefix}_relu1")(bn(f"{prefix}_bn1")(y))
            y = bn(f"{prefix}_bn2")(conv(filters, 3, 1, f"{prefix}_conv2")(y))
            x = layers.ReLU(name=f"{prefix}_out")(layers.Add(name=f"{prefix}_add")([y, shortcut]))
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = layers.Dense(num_classes, kernel_regularizer=reg() if reg else None, name="logits")(x)
    return K.Model(inputs, outputs, name=name)


def _bn_cnn(K, *, num_classes=10, input_shape=(28, 28, 1), kernel_regularizer=None, widths=(16, 32), units=128,
            name="bn_cnn"):
    """A narrow CNN with BatchNorm: the noisy-labels profile's CNN regime.

    Two blocks of 3x3 conv (``widths`` channels, no bias) → BatchNorm → ReLU →
    2x2 max-pool, then a ReLU dense layer of ``units`` and the logits; no
    Dropout, so the only randomness of a step is the batch. About 0.2 M
    parameters at 28x28x1, a few times cheaper a step than ``small_cnn``
    (whose Dropout-0.5 head does not fit 40 % noisy labels), and wide enough
    in its dense layer to memorize the flipped labels, as ERM does.
    """
    layers = K.layers
    reg = kernel_regularizer
    inputs = K.Input(shape=tuple(input_shape), name="images")
    x = inputs
    for i, filters in enumerate(widths):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False, kernel_initializer="he_normal",
                          kernel_regularizer=reg() if reg else None, name=f"conv{i + 1}")(x)
        x = layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=f"bn{i + 1}")(x)
        x = layers.ReLU(name=f"relu{i + 1}")(x)
        x = layers.MaxPooling2D(2, name=f"pool{i + 1}")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(units, activation="relu", kernel_regularizer=reg() if reg else None, name="fc")(x)
    outputs = layers.Dense(num_classes, kernel_regularizer=reg() if reg else None, name="logits")(x)
    return K.Model(inputs, outputs, name=name)


#: Networks defined here, buildable in Keras 3 and in tf_keras (so the peer can run them).
BENCH_NETWORKS = {
    "bn_cnn": _bn_cnn,
    "resnet8": lambda K, **kw: _resnet_cifar(K, 1, name="resnet8", **kw),
    "resnet14": lambda K, **kw: _resnet_cifar(K, 2, name="resnet14", **kw),
    "resnet20": lambda K, **kw: _resnet_cifar(K, 3, name="resnet20", **kw),
}




def _network_names():
    from keras_aesam.networks import NETWORKS

    return sorted(set(BENCH_NETWORKS) | set(NETWORKS))


def build_network(K, name, *, num_classes, input_shape, weight_decay=0.0, weight_decay_mode="l2", **options):
    """The network ``name`` in framework ``K``, its kernels regularized as :mod:`keras_aesam.recipe` says.

    (An L2 penalty of ``weight_decay/2`` in ``"l2"`` mode; none in ``"decoupled"`` mode.)
    """
    plan = recipe.Recipe(weight_decay=weight_decay, weight_decay_mode=weight_decay_mode)
    reg = None
    if recipe.kernel_regularizer(plan, K) is not None:
        reg = lambda: recipe.kernel_regularizer(plan, K)  # noqa: E731 - one instance per layer
    if name in BENCH_NETWORKS:
        return BENCH_NETWORKS[name](K, num_classes=num_classes, input_shape=input_shape, kernel_regularizer=reg,
                                    **options)
    import keras

    if K is not keras:
        raise ValueError(f"network {name!r} has no tf_keras twin; the peer row needs one of {sorted(BENCH_NETWORKS)}")
    from keras_aesam.networks import get_network

    return get_network(name, num_classes=num_classes, input_shape=input_shape,
                       kernel_regularizer=reg() if reg else None)
