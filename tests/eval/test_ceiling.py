"""The ceiling benchmark's pieces: a task as a one-task family, and the gap arithmetic."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lopt.eval.evaluation import RunResult
from lopt.inner.tasks import Task, TaskSpec
from lopt.inner.training import Split

_spec = importlib.util.spec_from_file_location(
    "ceiling_benchmark", Path(__file__).resolve().parents[2] / "benchmarks" / "ceiling.py"
)
ceiling = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = ceiling
_spec.loader.exec_module(ceiling)


def _task() -> Task:
    images = jax.random.uniform(jax.random.key(0), (30, 4, 4, 1))
    labels = jnp.asarray([0, 1, 2, 0, 1] * 6)  # train: 10, 9, 5 per class
    split = lambda idx: Split(images[idx], labels[idx])  # noqa: E731
    return Task(TaskSpec("toy"), 3, split(np.arange(24)), split(np.arange(24, 30)), split(np.arange(30)), "h")


def test_a_fixed_family_draws_the_task_itself_untransformed():
    task = _task()
    family = ceiling.fixed_family(task)
    assert family.num_classes == 3
    train, val = family.sample(jax.random.key(5))
    # All classes, the smallest class's count each (5 in train), no transform: every drawn
    # image is one of the task's training images.
    assert train.images.shape == (3 * 5, 4, 4, 1)
    originals = np.asarray(task.train.images).reshape(len(task.train.labels), -1)
    for image in np.asarray(train.images).reshape(len(train.labels), -1):
        assert np.min(np.abs(originals - image).max(axis=1)) == 0.0
    assert sorted(set(np.asarray(train.labels).tolist())) == [0, 1, 2]


def _result(loss: float) -> RunResult:
    return RunResult("t", 10, "x", None, loss, loss, 1.0, (loss * 3, loss), (0, 10))


def test_the_gain_over_the_best_baseline_is_a_log_ratio_and_speed_is_read_off_the_curve():
    best = _result(0.2)
    record = ceiling.compare(_result(0.1), best, 10)
    assert math.isclose(record["log_gain_over_best"], math.log(2.0))
    assert math.isclose(record["steps_to_target"], 10 / 5)  # 0.2 reached halfway between 0 and 10
    assert ceiling.compare(_result(0.4), best, 10)["steps_to_target"] is None
