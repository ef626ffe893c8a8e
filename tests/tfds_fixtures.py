"""Tiny synthetic source archives for tensorflow-datasets' real build path.

The CIFAR archives follow the official binary format (one label byte — two for
CIFAR-100: coarse then fine — followed by 3072 bytes of the image, channel-major,
row-major), inside the folder names and file names tfds's builders read. The
ImageNet archives follow the layout tfds's ``imagenet2012`` builder expects in
``manual_dir``: ``ILSVRC2012_img_train.tar`` holding one ``<synset>.tar`` per
class, and ``ILSVRC2012_img_val.tar`` holding ``ILSVRC2012_val_<8 digits>.JPEG``
files whose labels tfds takes, in sorted file-name order, from its own
``validation_labels.txt``.

The loopback HTTP server stands in for the data set's web site; tfds's CIFAR
builders are pointed at it with :func:`cifar_source_at`, which also registers the
synthetic archive's size and sha256 for that URL, so tfds validates the download
exactly as it validates the official one.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import inspect
import io
import os
import socket
import tarfile
import threading

import numpy as np

CIFAR = {
    "cifar10": dict(
        archive="cifar-10-binary.tar.gz",
        folder="cifar-10-batches-bin",
        train_files=[f"data_batch_{i}.bin" for i in range(1, 6)],
        test_files=["test_batch.bin"],
        label_files={"batches.meta.txt": 10},
        num_classes=10,
    ),
    "cifar100": dict(
        archive="cifar-100-binary.tar.gz",
        folder="cifar-100-binary",
        train_files=["train.bin"],
        test_files=["test.bin"],
        label_files={"coarse_label_names.txt": 20, "fine_label_names.txt": 100},
        num_classes=100,
    ),
}

IMAGENET_TRAIN_TAR = "ILSVRC2012_img_train.tar"
IMAGENET_VAL_TAR = "ILSVRC2012_img_val.tar"


def _add_bytes(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def _cifar_records(images: np.ndarray, labels: np.ndarray, coarse) -> bytes:
    """The binary records of one batch file: label byte(s), then the CHW image."""
    chw = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    columns = [labels.reshape(-1, 1)]
    if coarse is not None:
        columns.insert(0, coarse.reshape(-1, 1))
    return np.concatenate(columns + [chw], axis=1).astype(np.uint8).tobytes()


def write_cifar_archive(directory, name: str, per_file: int = 20, seed: int = 0) -> dict:
    """Writes ``<directory>/<official archive name>`` with random images and labels.

    Every train file holds ``per_file`` images and so does the test file. Returns
    the path and the arrays written: ``{"path", "train": (x, y), "test": (x, y)}``
    with ``x`` uint8 NHWC and ``y`` the (fine) labels.
    """
    spec = CIFAR[name]
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, spec["archive"])
    arrays = {"path": path}
    with tarfile.open(path, "w:gz") as tar:
        for file_name, count in spec["label_files"].items():
            names = "\n".join(f"class_{i}" for i in range(count)) + "\n"
            _add_bytes(tar, f"{spec['folder']}/{file_name}", names.encode())
        for split in ("train", "test"):
            xs, ys = [], []
            for file_name in spec[f"{split}_files"]:
                x = rng.integers(0, 256, size=(per_file, 32, 32, 3), dtype=np.uint8)
                y = rng.integers(0, spec["num_classes"], size=per_file).astype(np.uint8)
                coarse = (y // 5).astype(np.uint8) if name == "cifar100" else None
                _add_bytes(tar, f"{spec['folder']}/{file_name}", _cifar_records(x, y, coarse))
                xs.append(x)
                ys.append(y)
            arrays[split] = (np.concatenate(xs), np.concatenate(ys))
    return arrays


def _solid_jpeg(color, height: int, width: int) -> bytes:
    """A JPEG of one flat colour (JPEG keeps flat colours to within a few levels)."""
    import tensorflow as tf

    image = np.empty((height, width, 3), np.uint8)
    image[:] = color
    return tf.io.encode_jpeg(image, quality=95).numpy()


def class_color(index: int) -> tuple:
    """A distinct flat colour per class index, so a decoded image names its class."""
    return (40 + 60 * (index % 4), 40 + 60 * ((index // 4) % 4), 200 - 50 * (index % 3))


def write_imagenet_manual_dir(directory, synsets, per_class: int = 4, val_images: int = 6) -> dict:
    """Writes the two ImageNet tar files tfds reads from ``manual_dir``.

    Train images of synset ``synsets[i]`` are flat ``class_color(i)`` JPEGs of
    varying size. Validation images are named like the official ones; tfds assigns
    their labels itself. Returns ``{"train": [(file name, synset), ...],
    "val_names": [...]}``.
    """
    os.makedirs(directory, exist_ok=True)
    train = []
    with tarfile.open(os.path.join(directory, IMAGENET_TRAIN_TAR), "w") as outer:
        for i, synset in enumerate(synsets):
            inner_bytes = io.BytesIO()
            with tarfile.open(fileobj=inner_bytes, mode="w") as inner:
                for k in range(per_class):
                    file_name = f"{synset}_{k + 1}.JPEG"
                    _add_bytes(inner, file_name, _solid_jpeg(class_color(i), 40 + 4 * k, 56 - 4 * k))
                    train.append((file_name, synset))
            _add_bytes(outer, f"{synset}.tar", inner_bytes.getvalue())
    val_names = [f"ILSVRC2012_val_{k + 1:08d}.JPEG" for k in range(val_images)]
    with tarfile.open(os.path.join(directory, IMAGENET_VAL_TAR), "w") as tar:
        for k, file_name in enumerate(val_names):
            _add_bytes(tar, file_name, _solid_jpeg(class_color(k), 48, 40))
    return {"train": train, "val_names": val_names}


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass


@contextlib.contextmanager
def serve_directory(directory):
    """Serves ``directory`` over HTTP on 127.0.0.1 (a free port); yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=os.fspath(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def closed_port_url(path: str) -> str:
    """An http URL on 127.0.0.1 at a port nothing listens on (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/{path}"


@contextlib.contextmanager
def cifar_source_at(name: str, url: str, archive_path=None):
    """Points tfds's ``name`` builder at ``url`` for its archive, for the duration.

    With ``archive_path``, the archive's checksum is registered for ``url`` (what
    tfds's checksums file does for the official URL); otherwise no checksum is
    registered for it.
    """
    import tensorflow_datasets as tfds

    cls = tfds.builder_cls(name)
    saved = {key: cls.__dict__[key] for key in ("_cifar_info", "url_infos") if key in cls.__dict__}
    original_info = inspect.getattr_static(cls, "_cifar_info")
    cls._cifar_info = property(lambda self: original_info.fget(self)._replace(url=url))
    added = {url: tfds.core.download.checksums.compute_url_info(archive_path)} if archive_path else {}
    original_url_infos = inspect.getattr_static(cls, "url_infos")

    def url_infos(klass):
        # still reads the builder's own checksums file, as tfds does for every build
        return {**(original_url_infos.__get__(None, klass) or {}), **added}

    cls.url_infos = tfds.core.utils.classproperty(classmethod(url_infos))
    try:
        yield
    finally:
        for key in ("_cifar_info", "url_infos"):
            if key in saved:
                setattr(cls, key, saved[key])
            else:
                delattr(cls, key)
