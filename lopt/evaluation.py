"""Fine-tuning runs for evaluation: pretraining, tuned baselines and the learned optimizer.

Every comparison runs through :func:`lopt.training.unroll` with the same initial parameters
(pretrained body, fresh head per seed), the same minibatch keys and the same number of steps,
so the only difference between two rows is the optimizer.

Baselines are tuned fairly: a learning-rate grid, each point run on every seed, the point with
the lowest mean *validation* loss is chosen, and its *test* numbers are reported. The learned
optimizer is never tuned on the task at all.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lopt.l3rs import L3RS, MetaParams
from lopt.models import ModelSpec, Params, init_params, model_fn, with_fresh_head
from lopt.tasks import Task
from lopt.training import OptimizerFactory, Trajectory, adam_factory, default_eval_every, unroll

VAL, TEST = 0, 1  # rows of Trajectory.eval_loss / eval_accuracy in runs made here


@dataclasses.dataclass(frozen=True)
class RunResult:
    """Mean over seeds of one optimizer's run on one task and horizon."""

    task: str
    horizon: int
    optimizer: str
    learning_rate: float | None
    val_loss: float
    test_loss: float
    test_accuracy: float
    test_loss_curve: tuple[float, ...]
    curve_steps: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def run_seeds(
    hparams: Any,
    make_optimizer: OptimizerFactory,
    spec: ModelSpec,
    pretrained: Params,
    task: Task,
    horizon: int,
    seeds: Sequence[int],
    batch_size: int,
) -> list[Trajectory]:
    """One unroll per seed; the seed draws the fresh head and the minibatch order."""
    task_spec = spec.with_num_classes(task.num_classes)
    trajectories = []
    for seed in seeds:
        head_key, data_key = jax.random.split(jax.random.key(seed))
        params = with_fresh_head(spec, pretrained, task.num_classes, head_key)
        trajectories.append(
            unroll(
                hparams,
                params,
                task.train,
                (task.val, task.test),
                data_key,
                model_fn=model_fn(task_spec),
                make_optimizer=make_optimizer,
                num_steps=horizon,
                batch_size=batch_size,
                eval_every=default_eval_every(horizon),
            )
        )
    return trajectories


def summarize(
    trajectories: Sequence[Trajectory], task: Task, horizon: int, optimizer: str, lr: float | None
) -> RunResult:
    losses = np.stack([np.asarray(t.eval_loss) for t in trajectories])  # [seeds, 2, E+1]
    accuracies = np.stack([np.asarray(t.eval_accuracy) for t in trajectories])
    mean_loss = np.nan_to_num(losses.mean(axis=0), nan=np.inf)
    return RunResult(
        task=task.name,
        horizon=horizon,
        optimizer=optimizer,
        learning_rate=lr,
        val_loss=float(mean_loss[VAL, -1]),
        test_loss=float(mean_loss[TEST, -1]),
        test_accuracy=float(accuracies.mean(axis=0)[TEST, -1]),
        test_loss_curve=tuple(float(x) for x in mean_loss[TEST]),
        curve_steps=tuple(int(s) for s in np.asarray(trajectories[0].eval_steps)),
    )


def tune_adam(
    spec: ModelSpec,
    pretrained: Params,
    task: Task,
    horizon: int,
    learning_rates: Sequence[float],
    seeds: Sequence[int],
    batch_size: int,
) -> tuple[RunResult, list[RunResult]]:
    """Adam at each grid learning rate; returns the best by validation loss and all points."""
    grid = [
        summarize(
            run_seeds(jnp.float32(lr), adam_factory, spec, pretrained, task, horizon, seeds, batch_size),
            task, horizon, "adam", lr,
        )
        for lr in learning_rates
    ]
    return min(grid, key=lambda r: r.val_loss), grid


def evaluate_l3rs(
    l3rs: L3RS,
    theta: MetaParams,
    spec: ModelSpec,
    pretrained: Params,
    task: Task,
    horizon: int,
    seeds: Sequence[int],
    batch_size: int,
) -> RunResult:
    trajectories = run_seeds(theta, l3rs.opt_fn, spec, pretrained, task, horizon, seeds, batch_size)
    return summarize(trajectories, task, horizon, "l3rs", None)


def pretrain(
    spec: ModelSpec, task: Task, steps: int, learning_rate: float, batch_size: int, seed: int
) -> tuple[Params, dict[str, float]]:
    """Trains ``spec`` from scratch on ``task`` with Adam; returns params and test metrics."""
    if task.num_classes != spec.num_classes:
        raise ValueError(
            f"Pretraining task {task.name} has {task.num_classes} classes but the model spec "
            f"has {spec.num_classes}."
        )
    init_key, data_key = jax.random.split(jax.random.key(seed))
    trajectory = unroll(
        jnp.float32(learning_rate),
        init_params(spec, init_key),
        task.train,
        (task.val, task.test),
        data_key,
        model_fn=model_fn(spec),
        make_optimizer=adam_factory,
        num_steps=steps,
        batch_size=batch_size,
        eval_every=default_eval_every(steps),
    )
    metrics = {
        "val_loss": float(trajectory.eval_loss[VAL, -1]),
        "val_accuracy": float(trajectory.eval_accuracy[VAL, -1]),
        "test_loss": float(trajectory.eval_loss[TEST, -1]),
        "test_accuracy": float(trajectory.eval_accuracy[TEST, -1]),
    }
    return trajectory.params, metrics
