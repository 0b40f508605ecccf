"""Fine-tuning tasks: a dataset (optionally a class subset), sized to a model's input.

A task has three disjoint parts. ``train`` is what the inner optimizer trains on; ``val`` is
carved out of the dataset's train split and is what anything *selects* on (the meta-training
objective, the baselines' learning-rate grid); ``test`` is the dataset's own test split and is
only ever *reported*. Nothing is tuned on a split that is reported as held out.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

import jax.numpy as jnp

from lopt.data import ImageDataset, load_dataset
from lopt.training import Split


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """Which data a task trains on.

    Attributes:
      dataset: a TFDS dataset name (one of ``lopt.data.OFFLINE_DATASETS`` or any TFDS dataset
        prepared in the data dir).
      classes: keep only these labels, relabelled ``0..k-1`` in this order (``None``: all).
      val_fraction: the part of the dataset's train split held back as the validation split.
    """

    dataset: str
    classes: tuple[int, ...] | None = None
    val_fraction: float = 0.25

    @property
    def name(self) -> str:
        if self.classes is None:
            return self.dataset
        return f"{self.dataset}[{','.join(str(c) for c in self.classes)}]"

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | str) -> "TaskSpec":
        if isinstance(data, str):
            return cls(dataset=data)
        classes = data.get("classes")
        return cls(
            dataset=data["dataset"],
            classes=None if classes is None else tuple(int(c) for c in classes),
            val_fraction=float(data.get("val_fraction", 0.25)),
        )


@dataclasses.dataclass(frozen=True)
class Task:
    """A task's data on device, resized to the model's input shape."""

    spec: TaskSpec
    num_classes: int
    train: Split
    val: Split
    test: Split
    content_hash: str

    @property
    def name(self) -> str:
        return self.spec.name


def _to_split(dataset: ImageDataset) -> Split:
    return Split(jnp.asarray(dataset.images), jnp.asarray(dataset.labels))


def _prepare(
    dataset: ImageDataset, spec: TaskSpec, input_shape: Sequence[int]
) -> ImageDataset:
    height, width, channels = input_shape
    if dataset.images.shape[-1] != channels:
        raise ValueError(
            f"Dataset {spec.dataset!r} has {dataset.images.shape[-1]} channels but the model "
            f"expects {channels}; choose a dataset with matching channels."
        )
    if spec.classes is not None:
        dataset = dataset.select_classes(spec.classes)
    return dataset.resized(height, width)


def load_task(
    spec: TaskSpec,
    input_shape: Sequence[int],
    data_dir: str | os.PathLike | None = None,
    split_seed: int = 0,
) -> Task:
    """Loads ``spec``'s data through TFDS and splits it into train / val / test."""
    full_train = _prepare(load_dataset(spec.dataset, "train", data_dir), spec, input_shape)
    test = _prepare(load_dataset(spec.dataset, "test", data_dir), spec, input_shape)
    val, train = full_train.split(spec.val_fraction, seed=split_seed)
    return Task(
        spec=spec,
        num_classes=full_train.num_classes,
        train=_to_split(train),
        val=_to_split(val),
        test=_to_split(test),
        content_hash=full_train.content_hash() + test.content_hash(),
    )
