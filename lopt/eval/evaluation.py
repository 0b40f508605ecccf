"""Fine-tuning runs for evaluation: pretraining, tuned baselines and the learned optimizer.

Every comparison runs through :func:`lopt.inner.training.unroll` with the same initial parameters
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
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lopt.optim.l3rs import L3RS, Controls, MetaParams
from lopt.optim.l3rs import eval_params as l3rs_eval_params
from lopt.inner.models import ModelSpec, Params, init_params, model_fn, with_fresh_head
from lopt.inner.tasks import Task
from lopt.optim.baselines import Baseline, adam
from lopt.inner.training import (
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
    # How the learning rate was chosen (a tuned baseline's selected point; defaults: untuned).
    grid_points: int = 0  # learning rates run, the configured grid and its extensions
    grid_extensions: tuple[int, int] = (0, 0)  # points added below, above the configured grid
    grid_interior: bool | None = None  # the best point has a run point on either side
    grid_note: str = ""  # why the search stopped with the best at an edge
    # Per-example test losses ``[seeds, examples, curve points]`` when the unroll reports them
    # (the paired bootstrap resamples test examples with them); never written to JSON.
    test_example_loss_curves: np.ndarray | None = dataclasses.field(
        default=None, compare=False, repr=False
    )

    def to_json(self) -> dict[str, Any]:
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name != "test_example_loss_curves"
        }


def measured_unroll(
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
    """One run on ``task`` as a single jitted :func:`lopt.inner.training.unroll`, measuring its val
    and test splits (rows ``VAL``, ``TEST``) at about ``eval_points`` evenly spaced steps (see
    :func:`lopt.inner.training.default_eval_every`), every example's loss included (the gate's
    intervals resample test examples). Validation and pretraining run this; the downstream
    job's step-by-step optax loop is :func:`lopt.finetune.finetune_loop`."""
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
        per_example_loss=True,
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
            measured_unroll(
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
        test_example_loss_curves=example_loss_curves(trajectories),
    )


def example_loss_curves(trajectories: Sequence[Trajectory]) -> np.ndarray | None:
    """Every seed's per-example test losses ``[seeds, examples, curve points]`` (NaN as
    ``inf``), or None unless every trajectory carries them.

    They come from ``Trajectory.eval_example_loss`` (one ``[E + 1, N]`` array per eval split,
    :func:`measured_unroll` asks for them); without them the bootstrap of the gate's figures
    resamples seeds only.
    """
    per_split = [t.eval_example_loss for t in trajectories]
    if not per_split or any(s is None for s in per_split):
        return None
    curves = np.stack([np.asarray(s[TEST], np.float32).T for s in per_split])
    return np.where(np.isnan(curves), np.inf, curves)


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
    max_extensions: int = 0,
) -> tuple[RunResult, list[RunResult]]:
    """``baseline`` at each grid learning rate (its default grid unless given); returns the
    best point by mean validation loss, and every point run (ascending learning rate).

    With ``max_extensions`` the grid widens past an edge that holds the best point (see
    :func:`search_grid`), within ``baseline.bounds``: a baseline whose best learning rate is
    the grid's largest was not tuned, and beating it proves little. The best point records
    how many points ran and whether it ended interior. Every point shares one compilation:
    the learning rate is a traced argument and the factory the same function object.
    """

    def run(lr: float) -> RunResult:
        trajectories = run_seeds(
            jnp.float32(lr), baseline.make_optimizer, spec, pretrained, task, horizon, seeds,
            batch_size, baseline.eval_params, eval_points,
        )
        return summarize(trajectories, task, horizon, baseline.name, lr)

    return search_grid(run, learning_rates or baseline.learning_rates, max_extensions, baseline.bounds)


def search_grid(
    run: Callable[[float], RunResult],
    learning_rates: Sequence[float],
    max_extensions: int = 0,
    bounds: tuple[float, float] = (0.0, math.inf),
) -> tuple[RunResult, list[RunResult]]:
    """Runs every learning rate, then, while the point with the lowest mean validation loss
    is the lowest (highest) one run, one more point below (above) it at the grid's own log
    spacing — until the best is interior, ``max_extensions`` points were added on that side,
    or the next point would leave ``bounds``. A diverged point has ``inf`` loss, so it never
    wins and stops the search on its side.

    The same rule for every baseline keeps the comparison fair: same density, and every
    baseline tuned until its optimum is bracketed (or the report says it is not). Returns the
    best point (annotated with the search's ``grid_*`` fields) and every point, ascending.
    """
    grid = sorted(float(lr) for lr in learning_rates)
    if not grid:
        raise ValueError("A learning-rate grid needs at least one point.")
    ratio = (grid[-1] / grid[0]) ** (1.0 / (len(grid) - 1)) if len(grid) > 1 else 1.0
    results = [run(lr) for lr in grid]
    added = {-1: 0, +1: 0}
    note = "a one-point grid has no spacing to extend it by" if ratio <= 1.0 else ""
    while ratio > 1.0:
        best = _best_index(results)
        side = -1 if best == 0 else (+1 if best == len(results) - 1 else 0)
        if side == 0:
            note = ""
            break
        edge = results[0 if side < 0 else -1].learning_rate
        note = _cannot_extend(edge, ratio, side, added[side], max_extensions, bounds)
        if note:
            break
        added[side] += 1
        lr = float(f"{edge * ratio ** side:.3g}")
        point = run(lr)
        results = [point, *results] if side < 0 else [*results, point]
    best = _best_index(results)
    interior = 0 < best < len(results) - 1
    chosen = dataclasses.replace(
        results[best],
        grid_points=len(results),
        grid_extensions=(added[-1], added[+1]),
        grid_interior=interior,
        grid_note="" if interior else note,
    )
    return chosen, results


def _best_index(results: Sequence[RunResult]) -> int:
    """The point with the lowest mean validation loss (the first of ties)."""
    return min(range(len(results)), key=lambda i: results[i].val_loss)


def _cannot_extend(
    edge: float, ratio: float, side: int, added: int, max_extensions: int, bounds: tuple[float, float]
) -> str:
    """Why the grid does not grow past ``edge`` on ``side`` (-1 low, +1 high); "" if it may."""
    where = "low" if side < 0 else "high"
    if max_extensions <= 0:
        return f"best at the {where} edge of the grid (extension off)"
    if added >= max_extensions:
        return f"best at the {where} edge after {added} of {max_extensions} extensions (cap)"
    low, high = bounds
    step = edge * ratio**side
    if not low <= step <= high:
        bound = low if side < 0 else high
        return f"best at the {where} edge: the next point {step:.3g} is beyond the bound {bound:g}"
    return ""


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

    ``l3rs.opt_fn`` is the static part of the compiled unroll: several θ of one architecture
    (equal :class:`L3RS`) reuse its compilation."""
    trajectories = run_seeds(
        theta, l3rs.opt_fn, spec, pretrained, task, horizon, seeds, batch_size,
        eval_params=l3rs_eval_params, eval_points=eval_points,
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
    trajectory = measured_unroll(
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
