"""tf.data pipelines for the paper's data sets (and Fashion-MNIST, the offline default).

Every loader returns a :class:`DataSplits` with batched ``train`` / ``validation`` /
``test`` datasets of ``(float32 NHWC images, int32 sparse labels)``. The setup follows
section 4.1 of the AE-SAM paper:

* 10 % of the training set is held out for validation (seeded permutation), which is
  what the paper tunes ``rho`` on; the test set is never used for choices.
* Per-channel normalization with mean / std computed on the training split only.
* CIFAR augmentation: 4-pixel zero pad, random 32x32 crop, horizontal flip, built
  from Keras preprocessing layers and applied to the training split only.
* Label noise (section 4.3): a fraction of the *training* labels is flipped to a
  different class; validation and test labels stay clean.

Fashion-MNIST is read from local files first (explicit dir, Keras's cache, Debian's
``dataset-fashion-mnist`` package) and downloaded only when none is found, so it works
offline. CIFAR-10/100 and ImageNet go through ``tensorflow_datasets``.
"""

from __future__ import annotations

import dataclasses
import gzip
import logging
import math
import os
from typing import Callable, Optional

import numpy as np
import tensorflow as tf

from keras_aesam.validation import canonical_name as _canonical

logger = logging.getLogger("keras_aesam.data")

__all__ = [
    "DEBIAN_FASHION_MNIST_DIR",
    "DATASETS",
    "DataSplits",
    "cifar10",
    "cifar100",
    "fashion_mnist",
    "flip_labels",
    "get_dataset",
    "imagenet2012",
    "load_fashion_mnist_arrays",
    "prepare",
]

#: Where Debian's ``dataset-fashion-mnist`` package installs the original files.
DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)

#: ImageNet statistics (RGB, [0, 1] scale): a streamed data set is too large to
#: compute them here, and these are the values every ImageNet code base uses.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass
class DataSplits:
    """Batched train / validation / test datasets and what is known about them.

    ``validation`` is None when ``validation_fraction == 0``. ``steps_per_epoch`` is
    ``ceil(train_examples / batch_size)`` (the last batch may be smaller). ``mean`` and
    ``std`` are the per-channel statistics applied (None when not normalized).
    """

    train: tf.data.Dataset
    validation: Optional[tf.data.Dataset]
    test: tf.data.Dataset
    num_classes: int
    input_shape: tuple
    train_examples: int
    steps_per_epoch: int
    noise_rate_realised: float
    source: str
    validation_examples: Optional[int] = None
    test_examples: Optional[int] = None
    mean: Optional[tuple] = None
    std: Optional[tuple] = None


# ------------------------------------------------------------------ argument checks


def _check_args(batch_size, validation_fraction, label_noise, train_size, seed):
    """Rejects bad arguments before any file is read (errors name the accepted range)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not _is_number(validation_fraction) or not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction!r}")
    if not _is_number(label_noise) or not 0.0 <= label_noise < 1.0:
        raise ValueError(f"label_noise must be in [0, 1), got {label_noise!r}")
    if train_size is not None and (
        isinstance(train_size, bool) or not isinstance(train_size, (int, np.integer)) or train_size < 1
    ):
        raise ValueError(f"train_size must be None or an integer >= 1, got {train_size!r}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
    """Labels must be integers in [0, num_classes)."""
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"{where} labels must be in [0, num_classes={num_classes}), "
            f"got values in [{labels.min()}, {labels.max()}]"
        )


# ---------------------------------------------------------------------- label noise


def flip_labels(labels, rate: float, num_classes: int, seed: int = 0):
    """Symmetric label noise (paper §4.3): flip exactly ``round(rate * n)`` labels.

    The flipped examples are chosen uniformly without replacement and each gets a
    uniformly chosen *different* class, so the realised noise rate is exact up to
    rounding. Pure numpy and deterministic given ``seed``.

    Returns ``(noisy_labels, realised_rate)``; the input array is not modified.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got shape {labels.shape} dtype {labels.dtype}")
    if not _is_number(rate) or not 0.0 <= rate < 1.0:
        raise ValueError(f"rate must be in [0, 1), got {rate!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2 to flip labels, got {num_classes!r}")
    _check_labels(labels, num_classes, "flip_labels")
    n = labels.shape[0]
    k = int(round(rate * n))
    rng = np.random.default_rng(seed)
    noisy = labels.copy()
    if k:
        idx = rng.choice(n, size=k, replace=False)
        offsets = rng.integers(1, num_classes, size=k)  # never 0: always a new class
        noisy[idx] = (labels[idx] + offsets) % num_classes
    return noisy, (k / n if n else 0.0)


# ---------------------------------------------------------------- Fashion-MNIST files


def _read_idx_gz(path: str, offset: int, magic: int) -> np.ndarray:
    """Reads one gzipped idx file (images: offset 16, labels: offset 8) as uint8."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    found = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if found != magic:
        raise ValueError(f"{path} is not an idx file (magic {found!r}, expected {magic})")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=offset)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path} holds {data.size} bytes of data, header says {dims}")
    return data.reshape(dims)


def _read_fashion_mnist_dir(directory: str):
    """Parses the four Fashion-MNIST idx .gz files in ``directory``."""
    paths = [os.path.join(directory, name) for name in FASHION_MNIST_FILES]
    x_train = _read_idx_gz(paths[0], 16, 2051)
    y_train = _read_idx_gz(paths[1], 8, 2049)
    x_test = _read_idx_gz(paths[2], 16, 2051)
    y_test = _read_idx_gz(paths[3], 8, 2049)
    if len(x_train) != len(y_train) or len(x_test) != len(y_test):
        raise ValueError(f"image and label counts differ in {directory}")
    return (x_train, y_train), (x_test, y_test)


def _keras_cache_dir() -> str:
    """``$KERAS_HOME/datasets/fashion-mnist``, read at call time (default ~/.keras)."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return os.path.join(home, "datasets", "fashion-mnist")


def _download_fashion_mnist():
    """Last resort: Keras's own loader, which downloads when its cache is empty."""
    import keras

    return keras.datasets.fashion_mnist.load_data()


def _missing_files(directory: str) -> list:
    return [name for name in FASHION_MNIST_FILES if not os.path.isfile(os.path.join(directory, name))]


def _load_fashion_mnist_with_source(data_dir=None):
    """Tries every source in order; returns (arrays, source description)."""
    candidates = []
    if data_dir is not None:
        candidates.append(("data_dir", os.fspath(data_dir)))
    candidates.append(("keras cache", _keras_cache_dir()))
    candidates.append(("debian package dataset-fashion-mnist", DEBIAN_FASHION_MNIST_DIR))
    looked = []
    for label, directory in candidates:
        missing = _missing_files(directory)
        if missing:
            looked.append(f"{label}: {directory} (missing {', '.join(missing)})")
            if label == "data_dir":
                logger.warning("Fashion-MNIST not complete in data_dir=%s; trying other places", directory)
            continue
        try:
            arrays = _read_fashion_mnist_dir(directory)
        except (OSError, ValueError, EOFError) as err:
            looked.append(f"{label}: {directory} (unreadable: {err})")
            logger.warning("could not read Fashion-MNIST in %s: %s", directory, err)
            continue
        source = f"{label}: {directory}"
        logger.info("Fashion-MNIST loaded from %s", source)
        return arrays, source
    try:
        arrays = _download_fashion_mnist()
    except Exception as err:  # noqa: BLE001 - any download failure ends the search
        looked.append(f"download via keras.datasets.fashion_mnist.load_data() (failed: {err})")
        raise FileNotFoundError(
            "Fashion-MNIST not found. Looked at:\n  - "
            + "\n  - ".join(looked)
            + "\nOn Debian/Ubuntu, `apt-get install dataset-fashion-mnist` fixes it offline "
            f"(it installs the four files in {DEBIAN_FASHION_MNIST_DIR}); or pass data_dir= "
            f"a folder holding {', '.join(FASHION_MNIST_FILES)}."
        ) from err
    source = "download: keras.datasets.fashion_mnist.load_data()"
    logger.info("Fashion-MNIST loaded from %s", source)
    return arrays, source


def load_fashion_mnist_arrays(data_dir=None):
    """Fashion-MNIST as uint8 numpy: ``((x_train, y_train), (x_test, y_test))``.

    Looks, in order, in ``data_dir``, Keras's cache ``$KERAS_HOME/datasets/fashion-mnist``,
    Debian's ``/usr/share/datasets/fashion-mnist``, and only then downloads with
    ``keras.datasets.fashion_mnist.load_data()``. The source used is logged on the
    ``keras_aesam.data`` logger; if all fail, the error lists every place looked at.
    """
    arrays, _ = _load_fashion_mnist_with_source(data_dir)
    return arrays


# ------------------------------------------------------------ in-memory pipelines


def _split_validation(x, y, validation_fraction, seed):
    """Seeded permutation; the first ``round(f * n)`` examples become validation."""
    n = len(x)
    perm = np.random.default_rng(seed).permutation(n)
    n_val = int(round(validation_fraction * n))
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    return (x[train_idx], y[train_idx]), (x[val_idx], y[val_idx])


def _channel_stats(x: np.ndarray, chunk: int = 4096):
    """Per-channel mean and std of uint8 NHWC images on the [0, 1] scale, in chunks."""
    channels = x.shape[-1]
    total = np.zeros(channels)
    total_sq = np.zeros(channels)
    for start in range(0, len(x), chunk):
        part = x[start : start + chunk].reshape(-1, channels).astype(np.float64) / 255.0
        total += part.sum(axis=0)
        total_sq += np.square(part).sum(axis=0)
    count = x.size // channels
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - np.square(mean), 0.0))
    return tuple(float(m) for m in mean), tuple(float(max(s, 1e-8)) for s in std)


def _normalizer(mean, std) -> Callable:
    """Maps uint8 (or [0, 255] float) images to float32 standardized images."""
    mean_t = tf.constant(mean, tf.float32) if mean is not None else None
    std_t = tf.constant(std, tf.float32) if std is not None else None

    def apply(image):
        image = tf.cast(image, tf.float32) / 255.0
        if mean_t is not None:
            image = (image - mean_t) / std_t
        return image

    return apply


def _pad_crop_flip(height: int, width: int, seed: int) -> Callable:
    """CIFAR augmentation from Keras layers: 4-pixel zero pad, random crop, h-flip.

    Applied per example (before batching) because Keras's RandomCrop draws one
    offset per call, which would crop a whole batch identically.
    """
    import keras

    pad = keras.layers.ZeroPadding2D(padding=4)
    crop = keras.layers.RandomCrop(height, width, seed=seed)
    flip = keras.layers.RandomFlip("horizontal", seed=seed + 1)

    def apply(image):
        batch = tf.expand_dims(image, 0)  # ZeroPadding2D needs a batch axis
        batch = pad(batch)
        batch = crop(batch, training=True)
        batch = flip(batch, training=True)
        return batch[0]

    return apply


def _train_pipeline(x, y, batch_size, seed, augment_fn, normalize_fn):
    """cache -> shuffle (seeded) -> augment -> normalize -> batch -> prefetch."""
    ds = tf.data.Dataset.from_tensor_slices((x, y)).cache()
    ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)

    def prepare(image, label):
        image = tf.cast(image, tf.float32)
        if augment_fn is not None:
            image = augment_fn(image)
        return normalize_fn(image), label

    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def _eval_pipeline(x, y, batch_size, normalize_fn):
    """normalize -> cache -> batch -> prefetch (no shuffling, no augmentation)."""
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    ds = ds.map(lambda image, label: (normalize_fn(image), label), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.cache().batch(batch_size).prefetch(tf.data.AUTOTUNE)


def _in_memory_splits(
    arrays,
    num_classes,
    *,
    batch_size,
    validation_fraction,
    seed,
    label_noise,
    train_size,
    augment,
    normalize,
    source,
    name,
) -> DataSplits:
    """Shared by Fashion-MNIST and CIFAR: split, subsample, add noise, build pipelines."""
    (x_train, y_train), (x_test, y_test) = arrays
    if x_train.ndim == 3:  # grayscale: add the channel axis
        x_train, x_test = x_train[..., None], x_test[..., None]
    y_train = np.asarray(y_train).reshape(-1).astype(np.int32)
    y_test = np.asarray(y_test).reshape(-1).astype(np.int32)
    _check_labels(y_train, num_classes, f"{name} train")
    _check_labels(y_test, num_classes, f"{name} test")

    (x_tr, y_tr), (x_val, y_val) = _split_validation(x_train, y_train, validation_fraction, seed)
    if train_size is not None:
        if train_size > len(x_tr):
            raise ValueError(
                f"train_size must be in [1, {len(x_tr)}] (training examples left after the "
                f"validation split), got {train_size}"
            )
        x_tr, y_tr = x_tr[:train_size], y_tr[:train_size]  # already a seeded permutation

    realised = 0.0
    if label_noise > 0:
        y_tr, realised = flip_labels(y_tr, label_noise, num_classes, seed=seed + 1)
        logger.info(
            "%s: flipped %.4f of %d training labels (requested %.4f); validation and test are clean",
            name, realised, len(y_tr), label_noise,
        )

    mean, std = _channel_stats(x_tr) if normalize else (None, None)
    normalize_fn = _normalizer(mean, std)
    height, width, _ = x_tr.shape[1:]
    augment_fn = _pad_crop_flip(height, width, seed) if augment else None

    train = _train_pipeline(x_tr, y_tr, batch_size, seed, augment_fn, normalize_fn)
    validation = _eval_pipeline(x_val, y_val, batch_size, normalize_fn) if len(x_val) else None
    test = _eval_pipeline(x_test, y_test, batch_size, normalize_fn)
    logger.info(
        "%s: %d train / %d validation / %d test examples from %s",
        name, len(x_tr), len(x_val), len(x_test), source,
    )
    return DataSplits(
        train=train,
        validation=validation,
        test=test,
        num_classes=num_classes,
        input_shape=tuple(int(s) for s in x_tr.shape[1:]),
        train_examples=len(x_tr),
        steps_per_epoch=math.ceil(len(x_tr) / batch_size),
        noise_rate_realised=realised,
        source=source,
        validation_examples=len(x_val),
        test_examples=len(x_test),
        mean=mean,
        std=std,
    )


# --------------------------------------------------------------------- public loaders


def fashion_mnist(
    batch_size: int = 128,
    validation_fraction: float = 0.1,
    seed: int = 0,
    data_dir=None,
    label_noise: float = 0.0,
    train_size: Optional[int] = None,
    augment: bool = False,
    normalize: bool = True,
) -> DataSplits:
    """Fashion-MNIST (28x28x1, 10 classes) with the paper's split and normalization.

    ``label_noise`` flips that fraction of the *training* labels only, after the
    validation examples are taken out: validation stays clean (so model selection
    measures clean accuracy, as in §4.3) and so does the test set. ``train_size``
    keeps only the first ``train_size`` examples of the (seeded) training split.
    ``augment`` applies the pad-4 / random-crop / flip augmentation. With
    ``normalize=False`` images are scaled to [0, 1] only.
    """
    _check_args(batch_size, validation_fraction, label_noise, train_size, seed)
    arrays, source = _load_fashion_mnist_with_source(data_dir)
    return _in_memory_splits(
        arrays,
        10,
        batch_size=batch_size,
        validation_fraction=validation_fraction,
        seed=seed,
        label_noise=label_noise,
        train_size=train_size,
        augment=augment,
        normalize=normalize,
        source=source,
        name="fashion_mnist",
    )


#: Python modules tensorflow-datasets imports (some only lazily, on first use) whose
#: pip package has another name.
_PIP_NAMES = {
    "tensorflow_datasets": "tensorflow-datasets",
    "PIL": "Pillow",
    "tree": "dm-tree",
    "cv2": "opencv-python",
    "yaml": "pyyaml",
    "skimage": "scikit-image",
}

IMAGENET_MANUAL_FILES = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")


def _missing_module(err: ModuleNotFoundError, needed_by: str) -> ImportError:
    """An ImportError naming the missing module and the command that installs it."""
    module = (err.name or "").split(".")[0] or str(err)
    package = _PIP_NAMES.get(module, module)
    return ImportError(
        f"{needed_by} needs the Python module {module!r}, which is not installed: "
        f"install it with `pip install {package}`.",
        name=module,
    )


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ModuleNotFoundError as err:
        raise _missing_module(err, "keras_aesam.data (CIFAR, ImageNet)") from err
    return tfds


def _causes(err: BaseException):
    """``err`` and every exception it was raised from or during, once each."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _is_network_error(err: BaseException) -> bool:
    """True for failures to reach a server (DNS, refused or reset connection, timeout, HTTP status)."""
    import socket
    import urllib.error

    kinds = [ConnectionError, TimeoutError, socket.gaierror, urllib.error.URLError]
    try:
        import requests

        kinds += [requests.exceptions.ConnectionError, requests.exceptions.Timeout]
    except ModuleNotFoundError:
        pass
    try:
        import tensorflow_datasets as tfds

        kinds.append(tfds.download.DownloadError)  # the server answered with an HTTP error
    except ImportError:
        pass
    return any(isinstance(cause, tuple(kinds)) for cause in _causes(err))


def _offline_hint(name: str) -> str:
    return (
        f"To use {name} offline, prepare it on a connected machine "
        f"(`python -c \"from keras_aesam.data import prepare; prepare('{name}', data_dir='DIR')\"`), "
        "copy DIR to this machine and pass data_dir=DIR (`keras-aesam train --data-dir DIR`)."
    )


def _check_imagenet_manual_dir(builder, manual_dir) -> None:
    """ImageNet cannot be downloaded: name the files and the folder when they are missing."""
    default_folder = os.path.join(os.fspath(builder.data_dir_root), "downloads", "manual")
    folder = os.fspath(manual_dir) if manual_dir else default_folder
    missing = [f for f in IMAGENET_MANUAL_FILES if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise FileNotFoundError(
            f"imagenet2012 is not prepared in {builder.data_dir} and its source files are missing: "
            f"expected {' and '.join(IMAGENET_MANUAL_FILES)} in the folder {folder} "
            f"(searched there; missing: {', '.join(missing)}). ImageNet cannot be downloaded "
            "automatically: download the two tar files from https://image-net.org/download-images "
            "(registration needed) into one folder and pass manual_dir=that folder "
            "(`keras-aesam train --dataset imagenet2012 --manual-dir FOLDER`)."
        )


def prepare(name: str, data_dir=None, manual_dir=None):
    """Downloads (or, for ImageNet, extracts) and prepares a tfds data set; returns its builder.

    Does nothing when the data set is already prepared in ``data_dir`` (default
    tfds's, ``~/tensorflow_datasets``), which is how prepared data is used offline.
    ``manual_dir`` is where tfds looks for files it cannot download itself (ImageNet's
    tar files; default ``<data_dir>/downloads/manual``). Failures say what went wrong:
    a missing module (ImportError with the pip command), an unreachable server
    (ConnectionError), missing ImageNet files (FileNotFoundError naming them and the
    folder searched).
    """
    tfds = _import_tfds()
    try:
        builder = tfds.builder(name, data_dir=data_dir)
        if name == "imagenet2012" and not builder.is_prepared():
            _check_imagenet_manual_dir(builder, manual_dir)
        config = tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir) if manual_dir else None)
        builder.download_and_prepare(download_config=config)
    except FileNotFoundError:
        raise
    except ModuleNotFoundError as err:
        raise _missing_module(err, f"tensorflow_datasets (building {name!r})") from err
    except Exception as err:  # noqa: BLE001 - re-raised with what went wrong and the fix
        if _is_network_error(err):
            raise ConnectionError(
                f"could not download {name!r}: the network or the data set's server cannot be "
                f"reached ({type(err).__name__}: {err}). {_offline_hint(name)}"
            ) from err
        if isinstance(err, tfds.core.download.download_manager.NonMatchingChecksumError):
            raise RuntimeError(
                f"a file downloaded for {name!r} does not match the checksum tensorflow_datasets "
                f"records for it (a truncated download or a changed file on the server): {err}"
            ) from err
        raise RuntimeError(f"tensorflow_datasets could not prepare {name!r} (data_dir={data_dir!r}): {err}") from err
    return builder


def _tfds_arrays(name: str, data_dir=None):
    """Prepares a small tfds data set and loads its train and test splits fully into numpy."""
    tfds = _import_tfds()
    builder = prepare(name, data_dir=data_dir)
    splits = []
    for split in ("train", "test"):
        ds = builder.as_dataset(split=split, as_supervised=True, shuffle_files=False)
        xs, ys = [], []
        for x, y in tfds.as_numpy(ds.batch(10000)):
            xs.append(x)
            ys.append(y)
        splits.append((np.concatenate(xs), np.concatenate(ys)))
    source = f"tfds: {name} ({builder.data_dir})"
    logger.info("%s loaded from %s", name, source)
    return splits, source


def _cifar(name, num_classes, batch_size, validation_fraction, seed, data_dir, label_noise, train_size,
           augment, normalize) -> DataSplits:
    _check_args(batch_size, validation_fraction, label_noise, train_size, seed)
    arrays, source = _tfds_arrays(name, data_dir)
    return _in_memory_splits(
        arrays,
        num_classes,
        batch_size=batch_size,
        validation_fraction=validation_fraction,
        seed=seed,
        label_noise=label_noise,
        train_size=train_size,
        augment=augment,
        normalize=normalize,
        source=source,
        name=name,
    )


def cifar10(
    batch_size: int = 128,
    validation_fraction: float = 0.1,
    seed: int = 0,
    data_dir=None,
    label_noise: float = 0.0,
    train_size: Optional[int] = None,
    augment: bool = True,
    normalize: bool = True,
) -> DataSplits:
    """CIFAR-10 via tensorflow_datasets, set up as in the paper (§4.1, §4.3 noise).

    Augmentation (pad 4, random 32x32 crop, horizontal flip) is on by default, on the
    training split only. Label noise touches training labels only; validation and
    test stay clean.
    """
    return _cifar("cifar10", 10, batch_size, validation_fraction, seed, data_dir, label_noise,
                  train_size, augment, normalize)


def cifar100(
    batch_size: int = 128,
    validation_fraction: float = 0.1,
    seed: int = 0,
    data_dir=None,
    label_noise: float = 0.0,
    train_size: Optional[int] = None,
    augment: bool = True,
    normalize: bool = True,
) -> DataSplits:
    """CIFAR-100 via tensorflow_datasets; same setup as :func:`cifar10`."""
    return _cifar("cifar100", 100, batch_size, validation_fraction, seed, data_dir, label_noise,
                  train_size, augment, normalize)


# -------------------------------------------------------------------------- ImageNet


def _imagenet_train_map(image_size: int, augment: bool, seed: int) -> Callable:
    """Inception-style random-resized crop + flip, or the eval transform if no augment."""
    eval_map = _imagenet_eval_map(image_size)
    if not augment:
        return eval_map

    def apply(image, label):
        bbox = tf.zeros([0, 0, 4], tf.float32)
        begin, size, _ = tf.image.sample_distorted_bounding_box(
            tf.shape(image), bbox, min_object_covered=0.1, aspect_ratio_range=(3 / 4, 4 / 3),
            area_range=(0.08, 1.0), max_attempts=10, use_image_if_no_bounding_boxes=True, seed=seed,
        )
        image = tf.slice(image, begin, size)
        image = tf.image.resize(image, (image_size, image_size))
        image = tf.image.random_flip_left_right(image, seed=seed)
        return image, label

    return apply


def _imagenet_eval_map(image_size: int) -> Callable:
    """Resize the shorter side to image_size / 0.875, then take the central crop."""

    def apply(image, label):
        shape = tf.cast(tf.shape(image)[:2], tf.float32)
        scale = (image_size / 0.875) / tf.reduce_min(shape)
        new_size = tf.cast(tf.math.ceil(shape * scale), tf.int32)
        image = tf.image.resize(image, new_size)
        image = tf.image.resize_with_crop_or_pad(image, image_size, image_size)
        return image, label

    return apply


def _info_examples(builder, split: str) -> int:
    """Size of ``split`` from the builder's metadata, 0 when unknown (e.g. under mocks)."""
    try:
        return int(builder.info.splits[split].num_examples)
    except (KeyError, ValueError):
        return 0


def imagenet2012(
    manual_dir=None,
    batch_size: int = 128,
    validation_fraction: float = 0.1,
    seed: int = 0,
    data_dir=None,
    label_noise: float = 0.0,
    train_size: Optional[int] = None,
    augment: bool = True,
    normalize: bool = True,
    image_size: int = 224,
) -> DataSplits:
    """ImageNet-1k via tensorflow_datasets, which needs the tar files in ``manual_dir``.

    Streamed, not held in memory, so three things differ from the small data sets:
    the validation examples are the last ``validation_fraction`` (rounded to a whole
    percent) of tfds's train split, whose files are already shuffled, rather than a
    seeded permutation; normalization uses the standard ImageNet mean / std; nothing
    is cached; and label noise is not supported (the paper uses it
    on CIFAR only). The ``test`` split is ImageNet's official validation set.
    """
    _check_args(batch_size, validation_fraction, label_noise, train_size, seed)
    if label_noise:
        raise ValueError("label_noise must be 0 for imagenet2012 (supported range for streamed data: [0, 0])")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be an integer >= 1, got {image_size!r}")
    tfds = _import_tfds()
    builder = prepare("imagenet2012", data_dir=data_dir, manual_dir=manual_dir)
    keep = 100 - int(round(validation_fraction * 100))
    train_split = tfds.core.ReadInstruction("train", to=keep, unit="%")
    val_split = tfds.core.ReadInstruction("train", from_=keep, unit="%")
    train_raw = builder.as_dataset(split=train_split, as_supervised=True, shuffle_files=True,
                                   read_config=tfds.ReadConfig(shuffle_seed=seed))
    total = _info_examples(builder, "train")
    train_examples = int(round(total * keep / 100)) if total else int(train_raw.cardinality().numpy())
    if train_size is not None:
        train_raw = train_raw.take(train_size)
        train_examples = min(train_examples, train_size)

    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if normalize else (None, None)
    normalize_fn = _normalizer(mean, std)

    def finish(ds, fn, training):
        if training:  # shuffle the decoded uint8 images, before they become float32
            ds = ds.shuffle(10 * batch_size, seed=seed)
        ds = ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.map(lambda x, y: (normalize_fn(x), tf.cast(y, tf.int32)), num_parallel_calls=tf.data.AUTOTUNE)
        return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)

    train = finish(train_raw, _imagenet_train_map(image_size, augment, seed), True)
    eval_map = _imagenet_eval_map(image_size)
    validation = None
    if keep < 100:
        validation = finish(builder.as_dataset(split=val_split, as_supervised=True), eval_map, False)
    test = finish(builder.as_dataset(split="validation", as_supervised=True), eval_map, False)
    source = f"tfds: imagenet2012 ({builder.data_dir}, manual_dir={manual_dir})"
    logger.info("imagenet2012: ~%d train examples from %s", train_examples, source)
    return DataSplits(
        train=train,
        validation=validation,
        test=test,
        num_classes=1000,
        input_shape=(image_size, image_size, 3),
        train_examples=train_examples,
        steps_per_epoch=math.ceil(train_examples / batch_size),
        noise_rate_realised=0.0,
        source=source,
        mean=mean,
        std=std,
    )


# -------------------------------------------------------------------------- registry

DATASETS: dict[str, Callable[..., DataSplits]] = {
    "fashion_mnist": fashion_mnist,
    "cifar10": cifar10,
    "cifar100": cifar100,
    "imagenet2012": imagenet2012,
}


def get_dataset(name: str, **kwargs) -> DataSplits:
    """Builds the data set called ``name`` (case, '-', '_' and '/' ignored)."""
    wanted = _canonical(name)
    for key, builder in DATASETS.items():
        if _canonical(key) == wanted:
            return builder(**kwargs)
    raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(sorted(DATASETS))}")


