"""Tests for keras_aesam.data: offline Fashion-MNIST loading, splits, noise, pipelines.

Everything runs on tiny synthetic idx files; no network is used. CIFAR and ImageNet
through tensorflow-datasets' real build path are in test_data_tfds.py.
"""

import gzip
import logging
import math
import os

import numpy as np
import pytest

from keras_aesam import data

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"


# ----------------------------------------------------------------------------- helpers


def _write_idx_gz(path, array, magic):
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_fake_fashion_mnist(directory, n_train=200, n_test=50, seed=0, label_max=10):
    """Writes the four idx .gz files with random (unique) images; returns the arrays."""
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    x_train = rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8)
    y_train = rng.integers(0, label_max, size=n_train).astype(np.uint8)
    x_test = rng.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8)
    y_test = rng.integers(0, label_max, size=n_test).astype(np.uint8)
    names = data.FASHION_MNIST_FILES
    _write_idx_gz(os.path.join(directory, names[0]), x_train, 2051)
    _write_idx_gz(os.path.join(directory, names[1]), y_train, 2049)
    _write_idx_gz(os.path.join(directory, names[2]), x_test, 2051)
    _write_idx_gz(os.path.join(directory, names[3]), y_test, 2049)
    return (x_train, y_train), (x_test, y_test)


def collect(ds):
    """Concatenates a batched (images, labels) dataset into numpy arrays."""
    xs, ys = [], []
    for x, y in ds:
        xs.append(x.numpy())
        ys.append(y.numpy())
    return np.concatenate(xs), np.concatenate(ys)


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No Keras cache, no Debian files, and a download that fails at once."""
    keras_home = tmp_path / "keras_home"
    debian = tmp_path / "debian"
    monkeypatch.setenv("KERAS_HOME", str(keras_home))
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", str(debian))

    def no_download():
        raise OSError("no network in tests")

    monkeypatch.setattr(data, "_download_fashion_mnist", no_download)
    return {"keras": keras_home / "datasets" / "fashion-mnist", "debian": debian, "tmp": tmp_path}


@pytest.fixture
def fake_dir(tmp_path):
    directory = tmp_path / "fm"
    arrays = write_fake_fashion_mnist(directory)
    return directory, arrays


# ------------------------------------------------------------------ Fashion-MNIST files


def test_load_from_explicit_dir(offline, fake_dir, caplog):
    directory, ((x_tr, y_tr), (x_te, y_te)) = fake_dir
    with caplog.at_level(logging.INFO, logger="keras_aesam.data"):
        (a, b), (c, d) = data.load_fashion_mnist_arrays(directory)
    for got, want in ((a, x_tr), (b, y_tr), (c, x_te), (d, y_te)):
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got, want)
    assert a.shape == (200, 28, 28) and c.shape == (50, 28, 28)
    assert any("data_dir" in r.getMessage() for r in caplog.records)


def test_search_order_keras_cache_then_debian(offline, caplog):
    (cache_x, _), _ = write_fake_fashion_mnist(offline["keras"], seed=1)
    (debian_x, _), _ = write_fake_fashion_mnist(offline["debian"], seed=2)
    with caplog.at_level(logging.INFO, logger="keras_aesam.data"):
        (x, _), _ = data.load_fashion_mnist_arrays()
    np.testing.assert_array_equal(x, cache_x)
    assert any("keras cache" in r.getMessage() for r in caplog.records)

    # An explicit data_dir beats both.
    (explicit_x, _), _ = write_fake_fashion_mnist(offline["tmp"] / "explicit", seed=3)
    (x, _), _ = data.load_fashion_mnist_arrays(offline["tmp"] / "explicit")
    np.testing.assert_array_equal(x, explicit_x)

    # Without the Keras cache, the Debian files are used.
    os.remove(offline["keras"] / data.FASHION_MNIST_FILES[0])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="keras_aesam.data"):
        (x, _), _ = data.load_fashion_mnist_arrays()
    np.testing.assert_array_equal(x, debian_x)
    assert any("debian" in r.getMessage() for r in caplog.records)


def test_corrupt_dir_is_skipped(offline):
    bad = offline["tmp"] / "bad"
    write_fake_fashion_mnist(bad)
    with gzip.open(bad / data.FASHION_MNIST_FILES[0], "wb") as f:
        f.write(b"not an idx file at all")
    (debian_x, _), _ = write_fake_fashion_mnist(offline["debian"], seed=4)
    (x, _), _ = data.load_fashion_mnist_arrays(bad)
    np.testing.assert_array_equal(x, debian_x)


def test_download_is_the_last_resort(offline, monkeypatch):
    fake = ((np.zeros((3, 28, 28), np.uint8), np.zeros(3, np.uint8)),
            (np.zeros((2, 28, 28), np.uint8), np.zeros(2, np.uint8)))
    monkeypatch.setattr(data, "_download_fashion_mnist", lambda: fake)
    splits = data.fashion_mnist(batch_size=2, validation_fraction=0.0)
    assert splits.source.startswith("download")
    assert splits.train_examples == 3


def test_error_lists_every_place_looked(offline):
    missing = offline["tmp"] / "nowhere"
    with pytest.raises(FileNotFoundError) as info:
        data.load_fashion_mnist_arrays(missing)
    message = str(info.value)
    assert str(missing) in message
    assert str(offline["keras"]) in message
    assert str(offline["debian"]) in message
    assert "load_data()" in message and "no network in tests" in message
    assert "apt-get install dataset-fashion-mnist" in message


@pytest.mark.skipif(not os.path.isdir(DEBIAN_DIR), reason="dataset-fashion-mnist is not installed")
def test_real_debian_files_load():
    (x_tr, y_tr), (x_te, y_te) = data._read_fashion_mnist_dir(DEBIAN_DIR)
    assert x_tr.shape == (60000, 28, 28) and y_tr.shape == (60000,)
    assert x_te.shape == (10000, 28, 28) and y_te.shape == (10000,)
    assert x_tr.dtype == np.uint8 and set(np.unique(y_tr)) == set(range(10))


# ------------------------------------------------------------------------- pipelines


def test_fashion_mnist_pipeline_shapes(offline, fake_dir):
    directory, _ = fake_dir
    s = data.fashion_mnist(batch_size=32, data_dir=directory)
    assert (s.train_examples, s.validation_examples, s.test_examples) == (180, 20, 50)
    assert s.steps_per_epoch == math.ceil(180 / 32)
    assert s.input_shape == (28, 28, 1) and s.num_classes == 10
    assert s.noise_rate_realised == 0.0 and "data_dir" in s.source
    x, y = next(iter(s.train))
    assert x.shape == (32, 28, 28, 1) and x.dtype.name == "float32" and y.dtype.name == "int32"
    assert sum(1 for _ in s.train) == s.steps_per_epoch
    assert collect(s.validation)[0].shape == (20, 28, 28, 1)
    assert collect(s.test)[0].shape == (50, 28, 28, 1)


def test_validation_split_sizes_disjoint_and_seeded():
    x = np.arange(1000)
    (tr, _), (val, _) = data._split_validation(x, x, 0.1, seed=0)
    assert len(val) == 100 and len(tr) == 900
    assert set(tr).isdisjoint(val) and set(tr) | set(val) == set(range(1000))
    (_, _), (val_again, _) = data._split_validation(x, x, 0.1, seed=0)
    (_, _), (val_other, _) = data._split_validation(x, x, 0.1, seed=1)
    np.testing.assert_array_equal(val, val_again)
    assert not np.array_equal(np.sort(val), np.sort(val_other))


def test_validation_determined_by_seed_in_pipeline(offline, fake_dir):
    directory, _ = fake_dir
    first = collect(data.fashion_mnist(batch_size=16, data_dir=directory, seed=5).validation)
    again = collect(data.fashion_mnist(batch_size=16, data_dir=directory, seed=5).validation)
    other = collect(data.fashion_mnist(batch_size=16, data_dir=directory, seed=6).validation)
    np.testing.assert_array_equal(first[0], again[0])
    assert not np.array_equal(first[0], other[0])
    assert data.fashion_mnist(data_dir=directory, validation_fraction=0.0).validation is None


def test_normalization_uses_training_statistics(offline, fake_dir):
    directory, ((x_all, y_all), _) = fake_dir
    s = data.fashion_mnist(batch_size=64, data_dir=directory, seed=0)
    (x_tr, _), _ = data._split_validation(x_all, y_all, 0.1, seed=0)
    expected_mean = x_tr.astype(np.float64).mean() / 255.0
    expected_std = x_tr.astype(np.float64).std() / 255.0
    assert s.mean[0] == pytest.approx(expected_mean, rel=1e-6)
    assert s.std[0] == pytest.approx(expected_std, rel=1e-6)
    x, _ = collect(s.train)
    assert x.mean() == pytest.approx(0.0, abs=1e-4) and x.std() == pytest.approx(1.0, abs=1e-3)
    raw = collect(data.fashion_mnist(data_dir=directory, normalize=False).test)[0]
    assert raw.min() >= 0.0 and raw.max() <= 1.0


def test_channel_stats_per_channel():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(50, 4, 4, 3), dtype=np.uint8)
    mean, std = data._channel_stats(x, chunk=7)
    np.testing.assert_allclose(mean, (x / 255.0).mean(axis=(0, 1, 2)), rtol=1e-10)
    np.testing.assert_allclose(std, (x / 255.0).std(axis=(0, 1, 2)), rtol=1e-8)


def test_augmentation_keeps_shapes_and_changes_images(offline, fake_dir):
    directory, _ = fake_dir
    plain = data.fashion_mnist(batch_size=200, data_dir=directory, augment=False)
    augmented = data.fashion_mnist(batch_size=200, data_dir=directory, augment=True)
    xp, yp = next(iter(plain.train))
    xa, ya = next(iter(augmented.train))
    assert xa.shape == xp.shape == (180, 28, 28, 1) and xa.dtype == xp.dtype
    np.testing.assert_array_equal(ya.numpy(), yp.numpy())  # same seeded shuffle order
    assert not np.allclose(xa.numpy(), xp.numpy())
    # the test split is never augmented
    np.testing.assert_array_equal(collect(plain.test)[0], collect(augmented.test)[0])


def test_train_size_subsamples(offline, fake_dir):
    directory, _ = fake_dir
    s = data.fashion_mnist(batch_size=16, data_dir=directory, train_size=50)
    assert s.train_examples == 50 and s.steps_per_epoch == 4
    assert collect(s.train)[0].shape[0] == 50
    with pytest.raises(ValueError, match=r"train_size must be in \[1, 180\]"):
        data.fashion_mnist(data_dir=directory, train_size=181)


# ----------------------------------------------------------------------- label noise


@pytest.mark.parametrize("n,rate", [(1000, 0.2), (1000, 0.8), (333, 0.5), (10, 0.04), (50, 0.0)])
def test_flip_labels_exact_rate_and_always_a_new_class(n, rate):
    labels = np.random.default_rng(1).integers(0, 10, size=n)
    original = labels.copy()
    noisy, realised = data.flip_labels(labels, rate, 10, seed=3)
    changed = noisy != labels
    assert changed.sum() == round(rate * n)
    assert realised == pytest.approx(round(rate * n) / n)
    assert noisy.min() >= 0 and noisy.max() < 10
    np.testing.assert_array_equal(labels, original)  # input untouched


def test_flip_labels_seeded_and_uniform_over_other_classes():
    labels = np.zeros(20000, dtype=np.int64)
    a, _ = data.flip_labels(labels, 0.5, 5, seed=0)
    b, _ = data.flip_labels(labels, 0.5, 5, seed=0)
    c, _ = data.flip_labels(labels, 0.5, 5, seed=1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    counts = np.bincount(a[a != 0], minlength=5)[1:]
    assert counts.sum() == 10000 and np.all(np.abs(counts - 2500) < 200)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(rate=1.0), r"rate must be in \[0, 1\)"),
        (dict(rate=-0.1), r"rate must be in \[0, 1\)"),
        (dict(num_classes=1), r"num_classes must be an integer >= 2"),
        (dict(labels=np.array([0, 3, 10])), r"labels must be in \[0, num_classes=10\)"),
        (dict(labels=np.array([0.5, 1.0])), r"labels must be a 1-D integer array"),
    ],
)
def test_flip_labels_bad_input(kwargs, match):
    args = dict(labels=np.array([0, 1, 2]), rate=0.5, num_classes=10, seed=0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        data.flip_labels(**args)


def test_label_noise_only_on_training_split(offline, fake_dir):
    directory, _ = fake_dir
    kw = dict(batch_size=64, data_dir=directory, normalize=False, seed=2)
    clean = data.fashion_mnist(**kw)
    noisy = data.fashion_mnist(label_noise=0.3, **kw)
    assert noisy.noise_rate_realised == pytest.approx(54 / 180)
    # training: match examples by image, count flipped labels
    xc, yc = collect(clean.train)
    xn, yn = collect(noisy.train)
    clean_label = {img.tobytes(): lab for img, lab in zip(xc, yc)}
    flipped = sum(clean_label[img.tobytes()] != lab for img, lab in zip(xn, yn))
    assert flipped == 54
    # validation and test labels stay clean
    for split in ("validation", "test"):
        np.testing.assert_array_equal(collect(getattr(clean, split))[1], collect(getattr(noisy, split))[1])


# --------------------------------------------------------------------------- ImageNet


def test_imagenet_rejects_label_noise_before_loading():
    with pytest.raises(ValueError, match=r"label_noise must be 0 for imagenet2012"):
        data.imagenet2012(manual_dir="/nonexistent", label_noise=0.1)


# -------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(label_noise=1.0), r"label_noise must be in \[0, 1\)"),
        (dict(label_noise=-0.2), r"label_noise must be in \[0, 1\)"),
        (dict(batch_size=0), r"batch_size must be an integer >= 1"),
        (dict(batch_size=2.5), r"batch_size must be an integer >= 1"),
        (dict(validation_fraction=1.0), r"validation_fraction must be in \[0, 1\)"),
        (dict(validation_fraction=-0.1), r"validation_fraction must be in \[0, 1\)"),
        (dict(train_size=0), r"train_size must be None or an integer >= 1"),
        (dict(seed=None), r"seed must be an integer >= 0"),
    ],
)
@pytest.mark.parametrize("name", ["fashion_mnist", "cifar10", "cifar100", "imagenet2012"])
def test_bad_arguments_fail_before_loading(name, kwargs, match, monkeypatch):
    def must_not_load(*args, **kw):
        raise AssertionError("data was loaded before the arguments were checked")

    monkeypatch.setattr(data, "_load_fashion_mnist_with_source", must_not_load)
    monkeypatch.setattr(data, "_tfds_arrays", must_not_load)
    monkeypatch.setattr(data, "prepare", must_not_load)
    with pytest.raises(ValueError, match=match):
        data.get_dataset(name, **kwargs)


def test_labels_outside_num_classes_are_rejected(offline, tmp_path):
    directory = tmp_path / "bad_labels"
    write_fake_fashion_mnist(directory, label_max=12)
    with pytest.raises(ValueError, match=r"labels must be in \[0, num_classes=10\)"):
        data.fashion_mnist(data_dir=directory)


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ValueError) as info:
        data.get_dataset("mnist")
    for name in ("fashion_mnist", "cifar10", "cifar100", "imagenet2012"):
        assert name in str(info.value)


def test_get_dataset_accepts_hyphenated_name(offline, fake_dir):
    directory, _ = fake_dir
    assert data.get_dataset("Fashion-MNIST", data_dir=directory, batch_size=8).train_examples == 180
