"""Fine-tuning runs for evaluation: pretraining, tuned baselines and the learned optimizer.

Every comparison runs through :func:`lopt.training.unroll` with the same initial parameters
(pretrained body, fresh head per seed), the same minibatch keys and the same number of steps,
so the only difference between two rows is the optimizer.

Baselines are tuned fairly: a learning-rate grid, each point run on every seed, the point with
the lowest mean *validation* loss is chosen, and its *test* numbers are reported. The learned
optimizer is never tuned on the task at all.

Speed is compared by :func:`steps_to_target`: how many times fewer steps one run needs to
reach another's final loss, read off its learning curve.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lopt.l3rs import L3RS, Controls, MetaParams
from lopt.models import ModelSpec, Params, init_params, model_fn, with_fresh_head
from lopt.tasks import Task
from lopt.baselines import Baseline, adam
from lopt.training import (
    EvalParamsFn, OptimizerFactory, Split, Trajectory, default_eval_every, make_train_step, unroll,
)

VAL, TEST = 0, 1  # rows of Trajectory.eval_loss / eval_accuracy in runs made here


@dataclasses.dataclass(frozen=True)
class RunResult:
    """One optimizer's runs on one task and horizon: means over seeds, and each seed's numbers.

    A diverged run's losses are ``inf`` (not NaN), so it sorts last when selecting.
    """

    task: str
    horizon: int
    optimizer: str
    learning_rate: float | None
    val_loss: float
    test_loss: float
    test_accuracy: float
    test_loss_curve: tuple[float, ...]
    curve_steps: tuple[int, ...]
    val_loss_per_seed: tuple[float, ...] = ()
    test_loss_per_seed: tuple[float, ...] = ()
    test_accuracy_per_seed: tuple[float, ...] = ()
    test_loss_curve_per_seed: tuple[tuple[float, ...], ...] = ()

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def fine_tune(
    hparams: Any,
    make_optimizer: OptimizerFactory,
    spec: ModelSpec,
    params: Params,
    task: Task,
    num_steps: int,
    batch_size: int,
    key: jax.Array,
    eval_params: EvalParamsFn | None = None,
    eval_points: int = 10,
) -> Trajectory:
    """One run on ``task``, measuring its val and test splits (rows ``VAL``, ``TEST``) at
    about ``eval_points`` evenly spaced steps (see :func:`lopt.training.default_eval_every`)."""
    return unroll(
        hparams,
        params,
        task.train,
        (task.val, task.test),
        key,
        model_fn=model_fn(spec.with_num_classes(task.num_classes)),
        make_optimizer=make_optimizer,
        num_steps=num_steps,
        batch_size=batch_size,
        eval_every=default_eval_every(num_steps, eval_points),
        eval_params=eval_params,
    )


def seeded_start(spec: ModelSpec, pretrained: Params, task: Task, seed: int) -> tuple[Params, jax.Array]:
    """What a seed draws for one run on ``task``: the fresh head (returned in the params) and
    the key of the minibatch order; every optimizer run with that seed gets the same."""
    head_key, data_key = jax.random.split(jax.random.key(seed))
    return with_fresh_head(spec, pretrained, task.num_classes, head_key), data_key


def run_seeds(
    hparams: Any,
    make_optimizer: OptimizerFactory,
    spec: ModelSpec,
    pretrained: Params,
    task: Task,
    horizon: int,
    seeds: Sequence[int],
    batch_size: int,
    eval_params: EvalParamsFn | None = None,
    eval_points: int = 10,
) -> list[Trajectory]:
    """One run per seed; the seed draws the fresh head and the minibatch order."""
    trajectories = []
    for seed in seeds:
        params, data_key = seeded_start(spec, pretrained, task, seed)
        trajectories.append(
            fine_tune(
                hparams, make_optimizer, spec, params, task, horizon, batch_size, data_key,
                eval_params, eval_points,
            )
        )
    return trajectories


def summarize(
    trajectories: Sequence[Trajectory], task: Task, horizon: int, optimizer: str, lr: float | None
) -> RunResult:
    losses = np.nan_to_num(
        np.stack([np.asarray(t.eval_loss) for t in trajectories]), nan=np.inf
    )  # [seeds, 2, E+1]
    accuracies = np.stack([np.asarray(t.eval_accuracy) for t in trajectories])
    mean_loss = losses.mean(axis=0)
    floats = lambda xs: tuple(float(x) for x in xs)
    return RunResult(
        task=task.name,
        horizon=horizon,
        optimizer=optimizer,
        learning_rate=lr,
        val_loss=float(mean_loss[VAL, -1]),
        test_loss=float(mean_loss[TEST, -1]),
        test_accuracy=float(accuracies.mean(axis=0)[TEST, -1]),
        test_loss_curve=floats(mean_loss[TEST]),
        curve_steps=tuple(int(s) for s in np.asarray(trajectories[0].eval_steps)),
        val_loss_per_seed=floats(losses[:, VAL, -1]),
        test_loss_per_seed=floats(losses[:, TEST, -1]),
        test_accuracy_per_seed=floats(accuracies[:, TEST, -1]),
        test_loss_curve_per_seed=tuple(floats(curve) for curve in losses[:, TEST]),
    )


def tune(
    baseline: Baseline,
    spec: ModelSpec,
    pretrained: Params,
    task: Task,
    horizon: int,
    seeds: Sequence[int],
    batch_size: int,
    learning_rates: Sequence[float] | None = None,
    eval_points: int = 10,
) -> tuple[RunResult, list[RunResult]]:
    """``baseline`` at each grid learning rate (its default grid unless given); returns the
    best point by mean validation loss, and every point. All points share one compilation."""
    grid = [
        summarize(
            run_seeds(
                jnp.float32(lr), baseline.make_optimizer, spec, pretrained, task, horizon, seeds,
                batch_size, baseline.eval_params, eval_points,
            ),
            task, horizon, baseline.name, lr,
        )
        for lr in (learning_rates or baseline.learning_rates)
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
    eval_points: int = 10,
    name: str = "l3rs",
) -> RunResult:
    """The learned optimizer θ on ``task``: untuned, the same seeds as the baselines.

    ``l3rs.opt_fn`` is the static part of the compiled unroll: evaluate several θ of one
    architecture through the same :class:`L3RS` instance to reuse the compilation."""
    trajectories = run_seeds(
        theta, l3rs.opt_fn, spec, pretrained, task, horizon, seeds, batch_size,
        eval_points=eval_points,
    )
    return summarize(trajectories, task, horizon, name, None)


def trace_controls(
    l3rs: L3RS,
    theta: MetaParams,
    spec: ModelSpec,
    pretrained: Params,
    task: Task,
    horizon: int,
    batch_size: int,
    seed: int = 0,
) -> Controls:
    """What the learned optimizer decides at every step of one fine-tuning run on ``task``:
    per-layer learning rates ``[T, L]`` and mixing coefficients ``[T, L, P]`` (for plots)."""
    params, data_key = seeded_start(spec, pretrained, task, seed)
    apply = model_fn(spec.with_num_classes(task.num_classes))
    return _trace_controls(
        theta, params, task.train, data_key,
        l3rs=l3rs, model_fn=apply, horizon=horizon, batch_size=batch_size,
    )


@functools.partial(jax.jit, static_argnames=("l3rs", "model_fn", "horizon", "batch_size"))
def _trace_controls(theta, params, train, key, *, l3rs, model_fn, horizon, batch_size) -> Controls:
    optimizer = l3rs.opt_fn(theta, horizon)
    train_step = make_train_step(model_fn, optimizer, train, batch_size)

    def step(carry, step_key):
        carry, _ = train_step(carry, step_key)
        return carry, l3rs.controls_in_effect(carry[1], horizon)

    _, controls = jax.lax.scan(step, (params, optimizer.init(params)), jax.random.split(key, horizon))
    return controls


def step_reaching(
    curve_steps: Sequence[float], curve: Sequence[float], target: float
) -> float | None:
    """The first step at which ``curve`` (measured at ``curve_steps``) is at or below
    ``target``, interpolated linearly between measurements; ``None`` if it never is.

    NaN or ``inf`` points (a diverged run) never count as reaching the target.
    """
    if len(curve_steps) != len(curve):
        raise ValueError(f"{len(curve_steps)} steps but {len(curve)} curve points.")
    previous: tuple[float, float] | None = None
    for step, value in zip(curve_steps, curve):
        step, value = float(step), float(value)
        if value <= target:  # False for NaN
            if previous is None or not math.isfinite(previous[1]):
                return step
            (step0, value0) = previous
            return step0 + (value0 - target) / (value0 - value) * (step - step0)
        previous = (step, value)
    return None


def steps_to_target(
    curve_steps: Sequence[float], curve: Sequence[float], target: float, horizon: int
) -> float | None:
    """``horizon`` divided by the first (interpolated) step at which ``curve`` reaches
    ``target``: how many times fewer steps than ``horizon`` the run needs to get there.

    ``None`` when the curve never reaches the target within the curve; ``inf`` when it is
    reached at step 0 (the starting point is already as good as the target).
    """
    step = step_reaching(curve_steps, curve, target)
    if step is None:
        return None
    return math.inf if step <= 0 else horizon / step


def seconds_per_step(
    hparams: Any,
    make_optimizer: OptimizerFactory,
    spec: ModelSpec,
    pretrained: Params,
    task: Task,
    num_steps: int,
    batch_size: int,
    repeats: int = 3,
    seed: int = 0,
) -> float:
    """Wall seconds per training step of ``make_optimizer(hparams)`` on ``task``.

    Measured on a compiled unroll of ``num_steps`` steps (compiled first, not timed), the
    fastest of ``repeats``; the only evaluations are two of one batch, so the time is the
    step's, not the measurement's.
    """
    head_key, data_key = jax.random.split(jax.random.key(seed))
    params = with_fresh_head(spec, pretrained, task.num_classes, head_key)
    probe = Split(task.val.images[:batch_size], task.val.labels[:batch_size])

    def run() -> float:
        start = time.perf_counter()
        jax.block_until_ready(
            unroll(
                hparams, params, task.train, (probe,), data_key,
                model_fn=model_fn(spec.with_num_classes(task.num_classes)),
                make_optimizer=make_optimizer, num_steps=num_steps, batch_size=batch_size,
                eval_every=num_steps,
            )
        )
        return time.perf_counter() - start

    run()
    return min(run() for _ in range(repeats)) / num_steps


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
    trajectory = fine_tune(
        jnp.float32(learning_rate), adam, spec, init_params(spec, init_key), task, steps,
        batch_size, data_key,
    )
    metrics = {
        "val_loss": float(trajectory.eval_loss[VAL, -1]),
        "val_accuracy": float(trajectory.eval_accuracy[VAL, -1]),
        "test_loss": float(trajectory.eval_loss[TEST, -1]),
        "test_accuracy": float(trajectory.eval_accuracy[TEST, -1]),
    }
    return trajectory.params, metrics
