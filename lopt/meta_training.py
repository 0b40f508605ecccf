"""Meta-training L3RS: an outer Adam loop on θ driven by a gradient estimator.

The estimator interface follows learned_optimization's ``outer_trainers``: an estimator maps
(θ, key) to an estimate of ∇θ of the meta-objective plus metrics, and the outer loop does not
care how it was obtained. :class:`AntitheticES` is the paper's estimator; others (PES,
truncated backprop) implement the same protocol.

The meta-objective (:class:`FinalValidationLoss`) is the log of the validation loss after a
full fine-tuning unroll of the pretrained model with a fresh head. A calibration run here
found the mean training loss over the unroll overfits, the final validation loss on a
held-out split does not; the log makes easy and hard tasks weigh alike, and a clip on both
sides keeps one diverging (or perfectly fitting) unroll from wrecking θ. Optionally it mixes
in the mean log validation loss along the run (``speed_weight``), since the promotion gate
reads speed (steps to a baseline's final loss) as well as final losses.

Meta-training-only options, all off by default: task augmentation inside the unroll
(:mod:`lopt.task_augmentation`), sign- or rank-normalized ES differences
(:class:`AntitheticES`), log-uniformly weighted horizons and random batch sizes
(:class:`RandomChoice`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import time
from typing import TYPE_CHECKING, Any, Callable, Mapping, NamedTuple, Protocol, Sequence

import jax
import jax.numpy as jnp
import optax
from tqdm.auto import tqdm

from lopt.checkpointing import MetaTrainCheckpoints, MetaTrainState
from lopt.config import ES_NORMALIZATIONS
from lopt.l3rs import L3RS, MetaParams, eval_params
from lopt.models import ModelSpec, Params, model_fn, starting_params
from lopt.task_augmentation import TaskAugmentation
from lopt.tasks import TaskFamily
from lopt.training import unroll

if TYPE_CHECKING:
    from lopt.config import MetaTrainConfig


class Estimate(NamedTuple):
    gradient: MetaParams
    metrics: Mapping[str, jax.Array]


class GradientEstimator(Protocol):
    def __call__(self, theta: MetaParams, key: jax.Array) -> Estimate: ...


MIN_LOG_LOSS = math.log(1e-4)
"""The objective's floor: a validation loss below 1e-4 (no task here comes near) counts as
1e-4, so a run that fits its validation split exactly (log 0 = −inf) is bounded too."""


@dataclasses.dataclass(frozen=True, eq=False)
class FinalValidationLoss:
    """``log(val loss after T steps)`` of one fine-tuning run, a function of (θ, key).

    The key draws the task from the family (classes, transform), the fresh head's
    initialization and the minibatch order, so an antithetic pair evaluated with one key sees
    the same task instance, and the meta-objective is an expectation over the family.
    ``start`` is where each run starts (:func:`lopt.models.starting_params`).

    With ``speed_weight`` w > 0 the value is ``(1 − w)·log L(T) + w·mean_k log L(kT/K)``
    over ``speed_points`` K evenly spaced evaluations (the last is T): a run that gets low
    early scores better, which is what the gate's steps-to-target measures, while the final
    loss keeps most of the weight (with w = ½, K = 4: 5/8 on T, 1/8 on each earlier point).
    Each log is clipped to ``[min_log_loss, max_log_loss]`` (:func:`clipped_log`).

    ``augmentation`` (meta-training only, :mod:`lopt.task_augmentation`) is drawn from the
    key too, so both members of an ES pair run the same augmented task. Off (the default),
    nothing is drawn and the unroll is the plain one.
    """

    l3rs: L3RS
    spec: ModelSpec
    pretrained: Params
    family: TaskFamily
    horizon: int
    batch_size: int
    max_log_loss: float = 3.0
    start: str = "pretrained"
    speed_weight: float = 0.0
    speed_points: int = 4
    min_log_loss: float = MIN_LOG_LOSS
    augmentation: TaskAugmentation = TaskAugmentation()

    def __post_init__(self) -> None:
        if not 0.0 <= self.speed_weight <= 1.0:
            raise ValueError(f"speed_weight must lie in [0, 1], got {self.speed_weight}.")
        if self.speed_weight > 0 and (self.speed_points < 1 or self.horizon % self.speed_points):
            raise ValueError(
                f"speed_points ({self.speed_points}) must be positive and divide the horizon "
                f"({self.horizon}): the run is evaluated every horizon / speed_points steps."
            )
        if not self.min_log_loss < self.max_log_loss:
            raise ValueError(
                f"min_log_loss ({self.min_log_loss}) must be below max_log_loss ({self.max_log_loss})."
            )

    @property
    def eval_every(self) -> int:
        """Steps between validation measurements: the horizon, or its ``speed_points``-th."""
        return self.horizon // self.speed_points if self.speed_weight > 0 else self.horizon

    def curve(self, theta: MetaParams, key: jax.Array) -> jax.Array:
        """The validation losses of the run at every ``eval_every`` steps after step 0 (just
        the final one without the speed term), unclipped."""
        task_key, head_key, data_key = jax.random.split(key, 3)
        train, val = self.family.sample(task_key)
        num_classes = self.family.num_classes
        params = starting_params(self.spec, self.pretrained, num_classes, head_key, self.start)
        run = (params, theta, self.l3rs.opt_fn, eval_params)
        if self.augmentation.active:
            # A key of its own: without augmentation the task, head and data are as before.
            run = self.augmentation(jax.random.fold_in(key, 1), *run)
        params, hparams, make_optimizer, measure_at = run
        trajectory = unroll(
            hparams,
            params,
            train,
            (val,),
            data_key,
            model_fn=model_fn(self.spec.with_num_classes(num_classes)),
            make_optimizer=make_optimizer,
            num_steps=self.horizon,
            batch_size=self.batch_size,
            eval_every=self.eval_every,
            eval_params=measure_at,
        )
        return trajectory.eval_loss[0, 1:]  # step 0 is the same for every θ

    def __call__(self, theta: MetaParams, key: jax.Array) -> jax.Array:
        losses = self.curve(theta, key)
        final = clipped_log(losses[-1], self.max_log_loss, self.min_log_loss)
        if self.speed_weight == 0:
            return final
        along = clipped_log(losses, self.max_log_loss, self.min_log_loss)
        return (1.0 - self.speed_weight) * final + self.speed_weight * jnp.mean(along)


def clipped_log(
    loss: jax.Array, max_log_loss: float, min_log_loss: float = MIN_LOG_LOSS
) -> jax.Array:
    """``log(loss)`` clipped to ``[min_log_loss, max_log_loss]``: a diverged run (NaN/inf)
    counts as the worst allowed value and a zero loss as the best, so one bad (or perfect)
    unroll cannot dominate or poison a meta-gradient."""
    return jnp.clip(
        jnp.nan_to_num(jnp.log(loss), nan=max_log_loss), min_log_loss, max_log_loss
    )


@dataclasses.dataclass(frozen=True, eq=False)
class AntitheticES:
    """Antithetic evolution strategies (as in learned_optimization ``full_es.py``).

    For each of ``num_pairs`` draws ε ~ N(0, I) and one task key, both θ + σε and θ − σε run a
    full unroll; ``(f⁺ − f⁻) / (2σ) · ε`` averaged over pairs estimates ∇θ of the Gaussian-
    smoothed objective.

    Pairs are spread over the local devices (:func:`estimate_on_devices`), with
    ``samples_per_program`` pairs ``vmap``-ed into each compiled program (``None``: chosen
    by platform, :func:`samples_per_program`). On CPU that is one pair per program and one
    device per core. (A ``shard_map`` over a device mesh was tried: XLA compiles the
    partitioned program differently, and 200 training steps amplify the rounding differences
    into visibly different losses.)

    ``normalization`` replaces each pair's difference ``f⁺ − f⁻`` so that no task dominates
    the estimate by its scale (a hard or unstable task's differences can be 100× an easy
    one's, and the log only partly evens them):

    * ``"none"``: the raw difference, the unbiased estimate above.
    * ``"sign"``: ``sign(f⁺ − f⁻)``, as VeLO's ``sign_delta_loss_scalar`` (learned_optimization
      ``full_es.py``): every pair votes ±ε/(2σ), whatever its magnitude; a tie (both runs
      clipped at the same bound) votes 0.
    * ``"rank"``: ``sign(f⁺ − f⁻) · r/n``, ``r`` the rank (1..n) of ``|f⁺ − f⁻|`` among the
      step's n pairs: the order of the magnitudes counts, their scale does not. Signed ranks
      of the differences, not centered ranks of the values as OpenAI-ES ranks fitness: a
      centered rank of the differences would subtract the step's median, a baseline that
      antithetic pairs do not need.

    Both are biased (their expectation is not ∇θ), but both point up the gradient on average
    for a smooth objective (for a linear one, E[sign(εᵀg) ε] ∝ g).

    Its variance grows with the number of meta-parameters over the number of pairs: measured
    here at the untrained θ (390 meta-parameters, T = 200), two independent 8-pair estimates
    have a mean cosine of 0.007, i.e. almost no signal per meta-step, while whole-unroll
    backpropagation (:mod:`lopt.truncated_backprop`) gets 0.39 from 2 tasks. An accelerator,
    where hundreds of pairs cost little more than one, is what ES needs.
    """

    objective: Callable[[MetaParams, jax.Array], jax.Array]
    num_pairs: int
    sigma: float
    samples_per_program: int | None = None
    normalization: str = "none"

    def __post_init__(self) -> None:
        if self.num_pairs < 1 or self.sigma <= 0:
            raise ValueError(
                f"ES needs num_pairs >= 1 and sigma > 0, got {self.num_pairs}, {self.sigma}."
            )
        if self.normalization not in ES_NORMALIZATIONS:
            raise ValueError(
                f"Unknown ES normalization {self.normalization!r}; choose from {list(ES_NORMALIZATIONS)}."
            )
        per_program = samples_per_program(self.samples_per_program, self.num_pairs)
        object.__setattr__(self, "samples_per_program", per_program)
        object.__setattr__(self, "_sample_fn", sample_program(self._pair, per_program))

    def _pair(self, theta: MetaParams, pair_key: jax.Array) -> tuple[MetaParams, jax.Array]:
        leaves, treedef = jax.tree.flatten(theta)
        noise_key, task_key = jax.random.split(pair_key)
        noise_keys = jax.random.split(noise_key, len(leaves))
        eps = jax.tree.unflatten(
            treedef, [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(noise_keys, leaves)]
        )
        antithetic = jax.tree.map(
            lambda t, e: jnp.stack([t + self.sigma * e, t - self.sigma * e]), theta, eps
        )
        objective = lambda th: self.objective(th, task_key)  # noqa: E731
        if self.samples_per_program == 1:
            # θ ± σε mapped in sequence: one unroll in the compiled program instead of two
            # halves the compile time, and on CPU a batch of two is no faster than two runs.
            plus, minus = jax.lax.map(objective, antithetic)
        else:
            # Vectorized pairs (an accelerator): both signs in the batch too.
            plus, minus = jax.vmap(objective)(antithetic)
        if self.normalization == "none":
            scale = (plus - minus) / (2.0 * self.sigma)
        else:
            scale = jnp.sign(plus - minus) / (2.0 * self.sigma)
        gradient = jax.tree.map(lambda e: scale * e, eps)
        if self.normalization == "rank":
            # |f⁺ − f⁻| goes along: the step's ranks weight the signs (_combine_ranked).
            return gradient, ((plus + minus) / 2.0, jnp.abs(plus - minus))
        return gradient, (plus + minus) / 2.0

    def __call__(self, theta: MetaParams, key: jax.Array) -> Estimate:
        return estimate_on_devices(
            self._sample_fn, theta, jax.random.split(key, self.num_pairs), self.samples_per_program,
            combine=_combine_ranked if self.normalization == "rank" else _combine,
        )


SampleFn = Callable[[MetaParams, jax.Array], tuple[MetaParams, jax.Array]]
"""``sample(θ, key) -> (gradient estimate, objective value)`` of one ES pair or one task."""


def samples_per_program(requested: int | None, num_samples: int) -> int:
    """How many samples one compiled program ``vmap``-s: ``requested`` (at most
    ``num_samples``), or by platform when ``None``.

    On CPU, one: a ``vmap`` over copies of a CNN costs ~40× one copy there (docs/design.md §3), so
    samples run one per program, concurrently on one XLA device per core. On an accelerator,
    each device's whole share: one small unroll leaves a GPU idle between kernel launches, and a
    batch of hundreds costs about as much wall time as one.
    """
    if requested is not None:
        if requested < 1:
            raise ValueError(f"samples_per_program must be >= 1 (or None: by platform), got {requested}.")
        return min(requested, num_samples)
    if jax.default_backend() == "cpu":
        return 1
    return -(-num_samples // len(jax.local_devices()))


def sample_program(sample_fn: SampleFn, per_program: int) -> SampleFn:
    """``sample_fn`` compiled for :func:`estimate_on_devices`: as it is for one sample per
    program, else ``vmap``-ed over a leading axis of keys (θ shared)."""
    if per_program == 1:
        return jax.jit(sample_fn)
    return jax.jit(jax.vmap(sample_fn, in_axes=(None, 0)))


def sample_devices(num_programs: int) -> list[jax.Device]:
    """The local devices ``num_programs`` programs are spread over (at most one per program)."""
    return jax.local_devices()[:num_programs]


def estimate_on_devices(
    program: SampleFn,
    theta: MetaParams,
    keys: jax.Array,
    per_program: int = 1,
    combine: Callable[..., Estimate] | None = None,
) -> Estimate:
    """Averages ``sample(θ, key) -> (gradient, objective)`` over ``keys``, ``per_program``
    samples per call of ``program`` (from :func:`sample_program`), the calls dispatched
    round-robin to the local devices.

    On CPU, with one XLA device per core (:func:`lopt.host.use_all_cores`), the samples run
    concurrently, one per core, which is faster than one program XLA threads over the cores
    or a ``vmap`` over CNN unrolls (docs/design.md §3). Every chunk of samples runs the same
    single-device program from its own keys, so for a given ``per_program`` the estimate is
    bitwise the same on any number of devices. (``vmap``-ed chunks round differently from
    single samples: ~1e-6 relative, see the tests.)

    ``combine(results, batched)`` reduces the samples' results (default: :func:`_combine`,
    the mean).
    """
    chunks = [keys[i : i + per_program] for i in range(0, len(keys), per_program)]
    if per_program == 1:
        chunks = [chunk[0] for chunk in chunks]
    devices = sample_devices(len(chunks))
    # Asynchronous dispatch: all programs are queued before any result is waited for.
    results = [
        program(*jax.device_put((theta, chunk), devices[i % len(devices)]))
        for i, chunk in enumerate(chunks)
    ]
    return (combine or _combine)(jax.device_put(results, devices[0]), batched=per_program > 1)


@functools.partial(jax.jit, static_argnames="batched")
def _combine(results: list[tuple[MetaParams, jax.Array]], batched: bool) -> Estimate:
    """The mean of the samples' gradients, with the objective's mean and spread as metrics.
    ``batched``: each result holds a leading axis of samples."""
    join = jnp.concatenate if batched else jnp.stack
    gradient = jax.tree.map(lambda *g: jnp.mean(join(g), axis=0), *[g for g, _ in results])
    return _estimate(gradient, join([v for _, v in results]))


def _estimate(gradient: MetaParams, values: jax.Array) -> Estimate:
    """An estimate with the samples' objective mean and spread and the gradient's norm."""
    return Estimate(
        gradient=gradient,
        metrics={
            "objective": jnp.mean(values),
            "objective_std": jnp.std(values),
            "gradient_norm": optax.tree.norm(gradient),
        },
    )


@functools.partial(jax.jit, static_argnames="batched")
def _combine_ranked(
    results: list[tuple[MetaParams, tuple[jax.Array, jax.Array]]], batched: bool
) -> Estimate:
    """As :func:`_combine` for samples that also return a magnitude: each sample's gradient is
    weighted by the rank of its magnitude among all of them, ``r/n`` with ``r`` in 1..n
    (ties broken by order), before the mean."""
    join = jnp.concatenate if batched else jnp.stack
    values = join([v for _, (v, _) in results])
    magnitudes = join([m for _, (_, m) in results])
    ranks = jnp.argsort(jnp.argsort(magnitudes, stable=True), stable=True) + 1
    weights = ranks.astype(jnp.float32) / magnitudes.shape[0]
    gradient = jax.tree.map(
        lambda *g: jnp.mean(weights.reshape((-1,) + (1,) * (g[0].ndim - batched)) * join(g), axis=0),
        *[g for g, _ in results],
    )
    return _estimate(gradient, values)


@dataclasses.dataclass(frozen=True, eq=False)
class RandomChoice:
    """Draws, per meta-step, which of ``estimators`` (keyed by an integer setting, e.g. the
    horizon) gives the estimate: uniformly, or with ``weights`` (in the order of the sorted
    settings). The draw is on the host, so each setting is its own compiled program and all
    of a step's pairs share it."""

    estimators: Mapping[int, GradientEstimator]
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


def meta_objective(
    cfg: MetaTrainConfig,
    l3rs: L3RS,
    spec: ModelSpec,
    pretrained: Params,
    family: TaskFamily,
    horizon: int,
    batch_size: int,
) -> FinalValidationLoss:
    """The meta-objective ``cfg`` configures at one horizon and batch size: its objective
    (final, or final + speed) and its augmentation."""
    return FinalValidationLoss(
        l3rs, spec, pretrained, family, horizon, batch_size, start=cfg.start,
        speed_weight=cfg.speed_weight if cfg.objective == "final+speed" else 0.0,
        speed_points=cfg.speed_points,
        augmentation=TaskAugmentation(cfg.weight_scale, cfg.tensor_scale, cfg.head_init_scale),
    )


def make_estimator(
    cfg: MetaTrainConfig, l3rs: L3RS, spec: ModelSpec, pretrained: Params, family: TaskFamily
) -> GradientEstimator:
    """The estimator ``cfg`` configures (:class:`lopt.config.MetaTrainConfig`), drawing each
    meta-step's horizon from ``cfg.horizons`` (uniformly, or log-uniformly with
    ``horizon_sampling``) and then, with ``cfg.batch_sizes``, its batch size."""
    from lopt.truncated_backprop import TruncatedBackprop  # It builds on this module.

    def for_setting(horizon: int, batch_size: int) -> GradientEstimator:
        if cfg.estimator in ("tbptt", "backprop"):
            truncation = horizon if cfg.estimator == "backprop" else min(cfg.truncation, horizon)
            return TruncatedBackprop(
                l3rs, spec, pretrained, family, horizon, batch_size, truncation,
                cfg.num_tasks, start=cfg.start, samples_per_program=cfg.samples_per_program,
            )
        return AntitheticES(
            meta_objective(cfg, l3rs, spec, pretrained, family, horizon, batch_size),
            num_pairs=cfg.num_pairs, sigma=cfg.sigma,
            samples_per_program=cfg.samples_per_program, normalization=cfg.es_normalization,
        )

    def for_horizon(horizon: int) -> GradientEstimator:
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
    estimator: GradientEstimator,
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

    With ``checkpoint_dir``, the state is saved there (:mod:`lopt.checkpointing`) every
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
