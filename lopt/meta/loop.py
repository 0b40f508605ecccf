"""Meta-training L3RS: an outer Adam loop on θ driven by a meta-gradient estimator.

:func:`meta_train` runs the loop on any :class:`lopt.meta.estimator.Estimator`, with checkpoints
(:mod:`lopt.meta.checkpointing`). :func:`make_estimator` builds the estimator a
:class:`lopt.config.MetaTrainConfig` names, from :data:`ESTIMATOR_FACTORIES`: ``"es"``,
antithetic ES (:class:`lopt.meta.es.AntitheticES`, the paper's), or ``"backprop"`` / ``"tbptt"``,
backpropagation through whole or truncated unrolls
(:class:`lopt.meta.tbptt.TruncatedBackprop`), each on the meta-objective
:class:`lopt.meta.estimator.FinalValidationLoss`.

Meta-training-only options, all off by default: the speed term of the objective and task
augmentation inside the unroll (:mod:`lopt.inner.task_augmentation`), sign- or rank-normalized ES
differences, log-uniformly weighted horizons and random batch sizes (:class:`RandomChoice`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax
from tqdm.auto import tqdm

from lopt.meta.checkpointing import MetaTrainCheckpoints, MetaTrainState
from lopt.config import MetaTrainConfig
from lopt.meta.es import AntitheticES
from lopt.meta.estimator import Estimate, Estimator, FinalValidationLoss, FineTuning
from lopt.optim.l3rs import L3RS, MetaParams
from lopt.inner.models import ModelSpec, Params
from lopt.inner.task_augmentation import TaskAugmentation
from lopt.inner.tasks import TaskFamily
from lopt.meta.tbptt import TruncatedBackprop


@dataclasses.dataclass(frozen=True, eq=False)
class RandomChoice:
    """Draws, per meta-step, which of ``estimators`` (keyed by an integer setting, e.g. the
    horizon) gives the estimate: uniformly, or with ``weights`` (in the order of the sorted
    settings). The draw is on the host, so each setting is its own compiled program and all
    of a step's pairs share it."""

    estimators: Mapping[int, Estimator]
    weights: tuple[float, ...] | None = None
    metric: str = "choice"

    def __post_init__(self) -> None:
        if self.weights is not None and (
            len(self.weights) != len(self.estimators) or min(self.weights) < 0 or sum(self.weights) <= 0
        ):
            raise ValueError(
                f"weights must be one non-negative number per setting ({sorted(self.estimators)}), "
                f"not all zero; got {self.weights}."
            )

    def __call__(self, theta: MetaParams, key: jax.Array) -> Estimate:
        choice_key, key = jax.random.split(key)
        settings = sorted(self.estimators)
        if self.weights is None:
            index = jax.random.randint(choice_key, (), 0, len(settings))
        else:
            p = jnp.asarray(self.weights, jnp.float32)
            index = jax.random.choice(choice_key, len(settings), p=p / jnp.sum(p))
        setting = settings[int(index)]
        estimate = self.estimators[setting](theta, key)
        return Estimate(estimate.gradient, {**estimate.metrics, self.metric: setting})


@dataclasses.dataclass(frozen=True, eq=False)
class RandomHorizon(RandomChoice):
    """Draws the unroll horizon T of each meta-step from ``estimators`` (one per T).

    With T among the optimizer's inputs (t/T, log T), training over several horizons teaches
    the schedule to stretch, so the optimizer works at horizons longer than any single one.
    ``weights`` from :func:`log_uniform_weights` make the draw log-uniform over the range of
    horizons, as VeLO draws its unroll lengths (learned_optimization's
    ``LogUniformLengthSchedule``), whatever their spacing.
    """

    metric: str = "horizon"


def log_uniform_weights(settings: Sequence[int]) -> tuple[float, ...]:
    """Weights for the sorted ``settings`` that make a draw among them the discrete version of
    a log-uniform one: each gets the width, in log, of the settings it is nearest to (its
    cell between the midpoints to its neighbours; the end cells as wide on the outside as on
    the inside). Evenly log-spaced settings (T/2, T, 2T, 4T, 8T) get equal weights; a set
    like (100, 200, 300) weighs 300 down, since [100, 300] is mostly below 200 in log."""
    logs = [math.log(h) for h in sorted(settings)]
    if len(logs) == 1:
        return (1.0,)
    bounds = [logs[0] - (logs[1] - logs[0]) / 2]
    bounds += [(a + b) / 2 for a, b in zip(logs, logs[1:])]
    bounds += [logs[-1] + (logs[-1] - logs[-2]) / 2]
    widths = [b - a for a, b in zip(bounds, bounds[1:])]
    return tuple(w / sum(widths) for w in widths)


def meta_objective(cfg: MetaTrainConfig, runs: FineTuning) -> FinalValidationLoss:
    """The meta-objective ``cfg`` configures on ``runs``: its objective (final, or final +
    speed) and its augmentation."""
    return FinalValidationLoss(
        **runs.settings(),
        speed_weight=cfg.speed_weight if cfg.objective == "final+speed" else 0.0,
        speed_points=cfg.speed_points,
        augmentation=TaskAugmentation(cfg.weight_scale, cfg.tensor_scale, cfg.head_init_scale),
    )


def _es(cfg: MetaTrainConfig, runs: FineTuning) -> Estimator:
    return AntitheticES(
        meta_objective(cfg, runs), num_pairs=cfg.num_pairs, sigma=cfg.sigma,
        samples_per_program=cfg.samples_per_program, normalization=cfg.es_normalization,
    )


def _backprop(cfg: MetaTrainConfig, runs: FineTuning, truncation: int) -> Estimator:
    return TruncatedBackprop(
        **runs.settings(), truncation=truncation, num_tasks=cfg.num_tasks,
        samples_per_program=cfg.samples_per_program,
    )


EstimatorFactory = Callable[[MetaTrainConfig, FineTuning], Estimator]
"""``factory(cfg, runs)``: the estimator ``cfg`` configures on the fine-tuning runs of one
horizon and batch size."""

ESTIMATOR_FACTORIES: Mapping[str, EstimatorFactory] = {
    "es": _es,
    "backprop": lambda cfg, runs: _backprop(cfg, runs, truncation=runs.horizon),
    "tbptt": lambda cfg, runs: _backprop(cfg, runs, truncation=min(cfg.truncation, runs.horizon)),
}
"""The estimators by the name ``MetaTrainConfig.estimator`` gives (:data:`lopt.config.ESTIMATORS`)."""


def make_estimator(
    cfg: MetaTrainConfig, l3rs: L3RS, spec: ModelSpec, pretrained: Params, family: TaskFamily
) -> Estimator:
    """The estimator ``cfg`` configures (:class:`lopt.config.MetaTrainConfig`), drawing each
    meta-step's horizon from ``cfg.horizons`` (uniformly, or log-uniformly with
    ``horizon_sampling``) and then, with ``cfg.batch_sizes``, its batch size."""
    factory = ESTIMATOR_FACTORIES[cfg.estimator]

    def for_setting(horizon: int, batch_size: int) -> Estimator:
        runs = FineTuning(l3rs, spec, pretrained, family, horizon, batch_size, start=cfg.start)
        return factory(cfg, runs)

    def for_horizon(horizon: int) -> Estimator:
        if not cfg.batch_sizes:
            return for_setting(horizon, cfg.batch_size)
        return RandomChoice({b: for_setting(horizon, b) for b in cfg.batch_sizes}, metric="batch_size")

    horizons = sorted(set(cfg.horizons or (cfg.horizon,)))
    weights = log_uniform_weights(horizons) if cfg.horizon_sampling == "log_uniform" else None
    return RandomHorizon({h: for_horizon(h) for h in horizons}, weights=weights)


class MetaTrainResult(NamedTuple):
    theta: MetaParams
    history: list[dict[str, float]]  # every meta-step's metrics, resumed ones included
    seconds: float  # meta-training time of the steps in ``history``, across resumes
    resumed_from: int | None = None  # the checkpoint's step when this run resumed one


def meta_train(
    estimator: Estimator,
    theta: MetaParams,
    *,
    num_steps: int,
    learning_rate: float,
    key: jax.Array,
    on_step: Callable[[int, dict[str, float]], Any] | None = None,
    progress: bool = True,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 10,
) -> MetaTrainResult:
    """Runs ``num_steps`` outer Adam steps on θ with gradients from ``estimator``.

    ``on_step(step, metrics)`` receives each meta-step's metrics (e.g. to log them to MLflow);
    it is called for the steps run by this call only, not for those a resumed checkpoint holds.

    With ``checkpoint_dir``, the state is saved there (:mod:`lopt.meta.checkpointing`) every
    ``checkpoint_every`` meta-steps and at the end; when the directory already holds a
    checkpoint, the run resumes from the newest one instead of starting from ``theta`` and,
    given the same arguments, ends with the θ an uninterrupted run would.
    """
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}.")
    outer = optax.adam(learning_rate)

    @jax.jit
    def apply(theta, opt_state, gradient):
        updates, opt_state = outer.update(gradient, opt_state, theta)
        return optax.apply_updates(theta, updates), opt_state

    opt_state = outer.init(theta)
    history: list[dict[str, float]] = []
    checkpoints = None if checkpoint_dir is None else MetaTrainCheckpoints(checkpoint_dir)
    # Leaving the block, also through an exception, waits for the checkpoint being written.
    with checkpoints or contextlib.nullcontext():
        resumed = None
        if checkpoints is not None:
            resumed = checkpoints.restore_latest(theta_like=theta, outer_state_like=opt_state)
        first_step = 0
        if resumed is not None:
            if resumed.step > num_steps:
                raise ValueError(
                    f"The checkpoint in {checkpoints.directory} is at meta-step {resumed.step}, "
                    f"past num_steps={num_steps}: ask for at least {resumed.step} steps or use "
                    "a fresh checkpoint_dir."
                )
            first_step, theta, opt_state, history = resumed
        # The clock goes on from the checkpoint's, so ``seconds`` stays monotone across resumes.
        start = time.perf_counter() - (history[-1]["seconds"] if history else 0.0)
        bar = tqdm(
            range(first_step, num_steps), initial=first_step, total=num_steps,
            desc="meta-train", unit="step", disable=not progress,
        )
        for step in bar:
            # The step's key depends on the step alone: a resumed run draws what a whole run would.
            step_key = jax.random.fold_in(key, step)
            estimate = estimator(theta, step_key)
            theta, opt_state = apply(theta, opt_state, estimate.gradient)
            # One host transfer per meta-step, for logging; the estimate itself stays on device.
            metrics = {k: float(v) for k, v in jax.device_get(dict(estimate.metrics)).items()}
            metrics["seconds"] = time.perf_counter() - start
            history.append(metrics)
            bar.set_postfix(objective=f"{metrics['objective']:.4f}")
            if on_step is not None:
                on_step(step, metrics)
            # After on_step: a kill in between repeats the step's logging rather than losing it.
            done = step + 1
            if checkpoints is not None and (done % checkpoint_every == 0 or done == num_steps):
                checkpoints.save(MetaTrainState(done, theta, opt_state, history))
    return MetaTrainResult(
        theta=theta,
        history=history,
        seconds=time.perf_counter() - start,
        resumed_from=None if resumed is None else resumed.step,
    )
