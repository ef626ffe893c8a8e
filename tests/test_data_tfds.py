"""CIFAR-10, CIFAR-100 and ImageNet through tensorflow-datasets' real build path.

No mocks: tfds downloads tiny synthetic archives in the official formats from a
loopback HTTP server (CIFAR) or reads them from ``manual_dir`` (ImageNet),
validates checksums, writes its record files into a temporary data dir, and
keras_aesam.data reads them back. Also covered: the declared dependencies
suffice for that path, and each way it can fail says what went wrong.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

import tfds_fixtures as fx  # noqa: E402
from keras_aesam import data  # noqa: E402
from test_data import collect  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def label_by_image(images, labels):
    """{image bytes: label}; synthetic images are random, hence distinct."""
    table = {np.asarray(img).tobytes(): int(lab) for img, lab in zip(images, labels)}
    assert len(table) == len(images)
    return table


@pytest.fixture(scope="module", params=["cifar10", "cifar100"])
def cifar_built(request, tmp_path_factory):
    """Builds the data set once per module from a served synthetic archive."""
    name = request.param
    work = tmp_path_factory.mktemp(name)
    archive = fx.write_cifar_archive(work / "site", name, per_file=20 if name == "cifar10" else 100)
    data_dir = work / "tfds"
    with fx.serve_directory(work / "site") as base:
        with fx.cifar_source_at(name, f"{base}/{fx.CIFAR[name]['archive']}", archive["path"]):
            # raw pixels first: they are compared with the archive below
            raw = data.get_dataset(name, data_dir=data_dir, batch_size=32, augment=False, normalize=False, seed=3)
    return dict(name=name, archive=archive, data_dir=data_dir, raw=raw, num_classes=fx.CIFAR[name]["num_classes"])


# ----------------------------------------------------------------------------- CIFAR


def test_cifar_built_by_tfds_holds_exactly_the_archive(cifar_built):
    s, archive = cifar_built["raw"], cifar_built["archive"]
    n_train, n_test = len(archive["train"][1]), len(archive["test"][1])
    assert s.source.startswith(f"tfds: {cifar_built['name']}") and str(cifar_built["data_dir"]) in s.source
    assert s.num_classes == cifar_built["num_classes"] and s.input_shape == (32, 32, 3)
    n_val = round(0.1 * n_train)
    assert (s.train_examples, s.validation_examples, s.test_examples) == (n_train - n_val, n_val, n_test)
    # normalize=False scales to [0, 1] only, so pixels * 255 are the archive's bytes
    archive_train = label_by_image(*archive["train"])
    archive_test = label_by_image(*archive["test"])
    for split, table, count in (("train", archive_train, n_train - n_val), ("validation", archive_train, n_val),
                                ("test", archive_test, n_test)):
        x, y = collect(getattr(s, split))
        assert x.shape == (count, 32, 32, 3) and x.dtype == np.float32 and y.dtype == np.int32
        assert y.min() >= 0 and y.max() < cifar_built["num_classes"]
        pixels = np.rint(x * 255.0).astype(np.uint8)
        np.testing.assert_allclose(pixels / 255.0, x, atol=1e-6)  # x held whole bytes / 255
        for img, lab in zip(pixels, y):  # same image (HWC from the CHW records), same label
            assert table[img.tobytes()] == lab


def test_cifar_normalized_with_training_statistics(cifar_built):
    s = data.get_dataset(cifar_built["name"], data_dir=cifar_built["data_dir"], batch_size=32,
                         augment=False, seed=3)
    x_raw = collect(cifar_built["raw"].train)[0].astype(np.float64)
    # x_raw holds float32 roundings of k / 255 (relative error <= 6e-8 each), and both
    # sides sum in float64, so the statistics agree to ~1e-7 relative
    np.testing.assert_allclose(s.mean, x_raw.mean(axis=(0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(s.std, x_raw.std(axis=(0, 1, 2)), rtol=1e-6)
    x, _ = collect(s.train)
    # float32 standardization of ~10^5 values per channel: per-channel mean 0 and std 1
    # hold to float32 rounding (~1e-6 relative), far inside 1e-4
    np.testing.assert_allclose(x.mean(axis=(0, 1, 2)), 0.0, atol=1e-4)
    np.testing.assert_allclose(x.std(axis=(0, 1, 2)), 1.0, atol=1e-4)


def test_cifar_label_noise_flips_training_labels_only(cifar_built):
    kw = dict(data_dir=cifar_built["data_dir"], batch_size=32, augment=False, normalize=False, seed=3)
    noisy = data.get_dataset(cifar_built["name"], label_noise=0.4, **kw)
    clean = cifar_built["raw"]
    n = clean.train_examples
    assert noisy.noise_rate_realised == pytest.approx(round(0.4 * n) / n)
    clean_labels = label_by_image(*collect(clean.train))
    x, y = collect(noisy.train)
    flipped = sum(clean_labels[img.tobytes()] != lab for img, lab in zip(x, y))
    assert flipped == round(0.4 * n)
    assert y.min() >= 0 and y.max() < cifar_built["num_classes"]
    for split in ("validation", "test"):
        np.testing.assert_array_equal(collect(getattr(noisy, split))[1], collect(getattr(clean, split))[1])


def test_prepared_cifar_loads_offline(cifar_built):
    """Once built in data_dir, nothing is downloaded: the builder's URL can be unreachable."""
    name = cifar_built["name"]
    with fx.cifar_source_at(name, fx.closed_port_url("gone.tar.gz")):
        s = data.get_dataset(name, data_dir=cifar_built["data_dir"], batch_size=32, augment=False,
                             normalize=False, seed=3)
    np.testing.assert_array_equal(collect(s.test)[1], collect(cifar_built["raw"].test)[1])


def test_archive_in_the_default_manual_dir_is_used_without_network(tmp_path):
    """tfds takes a registered file from <data_dir>/downloads/manual instead of downloading it."""
    data_dir = tmp_path / "tfds"
    archive = fx.write_cifar_archive(data_dir / "downloads" / "manual", "cifar10", per_file=2)
    with fx.cifar_source_at("cifar10", fx.closed_port_url("cifar-10-binary.tar.gz"), archive["path"]):
        s = data.cifar10(data_dir=data_dir, batch_size=4, validation_fraction=0.0, augment=False, normalize=False)
    assert s.train_examples == 10 and s.test_examples == 2
    x, y = collect(s.test)
    table = label_by_image(*archive["test"])
    assert sorted(table.values()) == sorted(y.tolist())
    assert all(table[np.rint(img * 255).astype(np.uint8).tobytes()] == lab for img, lab in zip(x, y))


def test_unreachable_server_is_a_network_error(tmp_path, monkeypatch):
    # tfds retries a failed connection 10 times with exponential back-off (3 min 25 s
    # measured for an unresolvable host); one attempt gives the same error
    monkeypatch.setattr(tfds.core.download.downloader, "MAX_RETRIES", 0)
    with fx.cifar_source_at("cifar10", fx.closed_port_url("cifar-10-binary.tar.gz")):
        with pytest.raises(ConnectionError) as info:
            data.cifar10(data_dir=tmp_path / "tfds")
    message = str(info.value)
    assert "could not download 'cifar10'" in message and "network" in message
    assert "data_dir=DIR" in message and "--data-dir DIR" in message and "prepare('cifar10'" in message


def test_archive_not_matching_its_checksum_is_reported(tmp_path):
    fx.write_cifar_archive(tmp_path / "site", "cifar10", per_file=2, seed=0)
    registered = fx.write_cifar_archive(tmp_path / "other", "cifar10", per_file=2, seed=1)
    with fx.serve_directory(tmp_path / "site") as base:
        with fx.cifar_source_at("cifar10", f"{base}/cifar-10-binary.tar.gz", registered["path"]):
            with pytest.raises(RuntimeError, match="does not match the checksum"):
                data.cifar10(data_dir=tmp_path / "tfds")


# -------------------------------------------------------------------------- ImageNet

SYNSETS = ("n01440764", "n01443537", "n01484850")  # classes 0, 1, 2 of tfds's labels.txt


@pytest.fixture(scope="module")
def imagenet_manual_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imagenet_manual")
    written = fx.write_imagenet_manual_dir(folder, SYNSETS, per_class=4, val_images=6)
    return folder, written


def _validation_synsets(count):
    """tfds labels the sorted validation files with the first lines of its own list."""
    path = tfds.core.tfds_path("datasets/imagenet2012/validation_labels.txt")
    return path.read_text().split()[:count]


@pytest.fixture(scope="module")
def imagenet_built(imagenet_manual_dir, tmp_path_factory):
    """imagenet2012 built by tfds from the manual_dir archives, as raw [0, 1] pixels."""
    folder, _ = imagenet_manual_dir
    data_dir = tmp_path_factory.mktemp("imagenet_tfds")
    raw = data.imagenet2012(manual_dir=folder, data_dir=data_dir, batch_size=4, image_size=24,
                            validation_fraction=0.25, augment=False, normalize=False)
    return data_dir, raw


def test_imagenet_built_from_manual_dir(imagenet_built):
    data_dir, s = imagenet_built
    assert s.num_classes == 1000 and s.input_shape == (24, 24, 3)
    assert s.train_examples == 9 and s.steps_per_epoch == 3  # 75 % of 12 images
    x_tr, y_tr = collect(s.train)
    x_val, y_val = collect(s.validation)
    x_te, y_te = collect(s.test)
    assert x_tr.shape == (9, 24, 24, 3) and x_val.shape == (3, 24, 24, 3) and x_te.shape == (6, 24, 24, 3)
    assert y_tr.dtype == np.int32 and x_tr.dtype == np.float32
    assert x_tr.min() >= 0.0 and x_tr.max() <= 1.0
    # each class's images are one flat colour, so a decoded, resized image names its
    # label. JPEG at quality 95 keeps a flat colour to a few levels; 10/255 still
    # separates classes, whose colours differ by >= 50 levels in some channel
    for x, y in ((x_tr, y_tr), (x_val, y_val)):
        for image, label in zip(x, y):
            np.testing.assert_allclose(image.mean(axis=(0, 1)) * 255, fx.class_color(label), atol=10)
    assert sorted(np.concatenate([y_tr, y_val]).tolist()) == sorted([0, 1, 2] * 4)
    names = tfds.builder("imagenet2012", data_dir=data_dir).info.features["label"].names
    expected = sorted(names.index(synset) for synset in _validation_synsets(6))
    assert sorted(y_te.tolist()) == expected


def test_imagenet_normalized_and_loads_offline_once_prepared(imagenet_built):
    data_dir, _ = imagenet_built
    s = data.imagenet2012(data_dir=data_dir, batch_size=4, image_size=16, augment=True)  # no manual_dir
    x, y = next(iter(s.train))
    assert x.shape == (4, 16, 16, 3) and y.dtype.name == "int32"
    assert s.mean == data.IMAGENET_MEAN and s.std == data.IMAGENET_STD
    raw = data.imagenet2012(data_dir=data_dir, batch_size=6, image_size=16, normalize=False)
    x_raw, _ = collect(raw.test)
    x_norm, _ = collect(s.test)  # the test split is neither shuffled nor augmented
    expected = (x_raw - np.array(data.IMAGENET_MEAN, np.float32)) / np.array(data.IMAGENET_STD, np.float32)
    np.testing.assert_allclose(x_norm, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("present", [(), (fx.IMAGENET_TRAIN_TAR,)])
def test_imagenet_missing_manual_files_named_with_folder(tmp_path, present, imagenet_manual_dir):
    folder = tmp_path / "manual"
    folder.mkdir()
    for name in present:
        os.symlink(imagenet_manual_dir[0] / name, folder / name)
    with pytest.raises(FileNotFoundError) as info:
        data.imagenet2012(manual_dir=folder, data_dir=tmp_path / "tfds")
    message = str(info.value)
    assert f"in the folder {folder}" in message
    assert fx.IMAGENET_TRAIN_TAR in message and fx.IMAGENET_VAL_TAR in message
    assert f"missing: {', '.join(n for n in data.IMAGENET_MANUAL_FILES if n not in present)}" in message
    assert "--manual-dir" in message


def test_imagenet_default_manual_dir_is_searched_and_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="in the folder " + str(tmp_path / "tfds" / "downloads" / "manual")):
        data.imagenet2012(data_dir=tmp_path / "tfds")


# ------------------------------------------------------------- a new user's install


@pytest.fixture(scope="module")
def fresh_install_run(tmp_path_factory):
    """The tfds path in a new interpreter that can import only declared dependencies."""
    if sys.version_info < (3, 11):
        pytest.skip("the worker reads pyproject.toml with tomllib (Python >= 3.11)")
    work = tmp_path_factory.mktemp("fresh")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "tfds_worker.py"), "--workdir", str(work),
         "--block", "importlib_resources"],
        capture_output=True, text=True, timeout=600, env=env,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.parametrize("name,train_examples,shape", [
    ("cifar10", 18, [32, 32, 3]),      # 5 x 4 images, 2 held out for validation
    ("cifar100", 4, [32, 32, 3]),      # 4 images, none held out (round(0.4) = 0)
    ("imagenet2012", 4, [16, 16, 3]),  # 2 classes x 2 images
])
def test_declared_dependencies_suffice_for_every_data_set(fresh_install_run, name, train_examples, shape):
    outcome = fresh_install_run[name]
    assert outcome["ok"], f"{name} failed with only the declared dependencies importable: {outcome}"
    assert outcome["train_examples"] == train_examples and outcome["input_shape"] == shape


def test_missing_module_is_named_with_its_install_command(fresh_install_run):
    error = fresh_install_run["blocked"]
    assert not error["ok"] and error["type"] == "ImportError"
    assert "'importlib_resources'" in error["message"] and "pip install importlib_resources" in error["message"]
    assert "network" not in error["message"] and "offline" not in error["message"]
