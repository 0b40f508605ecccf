"""The meta-gradient estimator interface, and what every estimator shares.

As in learned_optimization's ``outer_trainers`` (``gradient_learner.py``): an
:class:`Estimator` maps (θ, key) to an :class:`Estimate` of ∇θ of the meta-objective plus
metrics, and the outer loop (:func:`lopt.meta.loop.meta_train`) does not care how it was
obtained. Concrete estimators import this module and nothing of each other: antithetic ES
(:mod:`lopt.meta.es`) and backpropagation through the unroll (:mod:`lopt.meta.tbptt`);
:mod:`lopt.meta.loop` picks one by name.

What they share lives here: the fine-tuning runs they measure (:class:`FineTuning`), the
meta-objective (:class:`FinalValidationLoss`, a clipped log of the final validation loss) and
how independent samples are spread over the local devices (:class:`Samples`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import optax

from lopt.optim.l3rs import L3RS, MetaParams, eval_params
from lopt.inner.models import ModelFn, ModelSpec, Params, model_fn, starting_params
from lopt.inner.task_augmentation import TaskAugmentation
from lopt.inner.tasks import TaskFamily
from lopt.inner.training import Split, unroll


class Estimate(NamedTuple):
    gradient: MetaParams
    metrics: Mapping[str, jax.Array]


class Estimator(Protocol):
    """A meta-gradient estimator: the same (θ, key) gives the same estimate."""

    def __call__(self, theta: MetaParams, key: jax.Array) -> Estimate: ...


# --- The meta-objective -----------------------------------------------------------------------

MIN_LOG_LOSS = math.log(1e-4)
"""The objective's floor: a validation loss below 1e-4 (no task here comes near) counts as
1e-4, so a run that fits its validation split exactly (log 0 = −inf) is bounded too."""


def clipped_log(
    loss: jax.Array, max_log_loss: float, min_log_loss: float = MIN_LOG_LOSS
) -> jax.Array:
    """``log(loss)`` clipped to ``[min_log_loss, max_log_loss]``: a diverged run (NaN/inf)
    counts as the worst allowed value and a zero loss as the best, so one bad (or perfect)
    unroll cannot dominate or poison a meta-gradient."""
    return jnp.clip(
        jnp.nan_to_num(jnp.log(loss), nan=max_log_loss), min_log_loss, max_log_loss
    )


class TaskDraw(NamedTuple):
    """One task drawn for a fine-tuning run: its splits, the network at the task's number of
    classes, and the parameters the run starts from."""

    train: Split
    val: Split
    model_fn: ModelFn
    params: Params


@dataclasses.dataclass(frozen=True, eq=False)
class FineTuning:
    """Fine-tuning runs of the pretrained model on tasks of ``family`` with θ's optimizer:
    ``horizon`` steps at ``batch_size``, each from a fresh head (``start``:
    :func:`lopt.inner.models.starting_params`), measured by the clipped log of a validation loss.

    The base of what estimators measure (:class:`FinalValidationLoss`,
    :class:`lopt.meta.tbptt.TruncatedBackprop`): one place for their shared settings
    and the task set-up.
    """

    l3rs: L3RS
    spec: ModelSpec
    pretrained: Params
    family: TaskFamily
    horizon: int
    batch_size: int
    max_log_loss: float = 3.0
    start: str = "pretrained"

    def settings(self) -> dict[str, Any]:
        """These runs' settings as keyword arguments, to build another :class:`FineTuning`
        (an objective, an estimator) on the same runs."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(FineTuning)}

    def draw(self, task_key: jax.Array, head_key: jax.Array) -> TaskDraw:
        """The task ``task_key`` draws from the family and the start ``head_key`` gives it."""
        train, val = self.family.sample(task_key)
        num_classes = self.family.num_classes
        params = starting_params(self.spec, self.pretrained, num_classes, head_key, self.start)
        return TaskDraw(train, val, model_fn(self.spec.with_num_classes(num_classes)), params)


@dataclasses.dataclass(frozen=True, eq=False)
class FinalValidationLoss(FineTuning):
    """``log(val loss after T steps)`` of one fine-tuning run, a function of (θ, key): the
    meta-objective.

    The final validation loss on a held-out split, because the mean training loss over the
    unroll rewards overfitting (docs/measurements.md); the log makes easy and hard tasks weigh
    alike, and the clip on both sides (:func:`clipped_log`) keeps one diverging or perfectly
    fitting unroll from wrecking θ.

    The key draws the task from the family (classes, transform), the fresh head's
    initialization and the minibatch order, so an antithetic pair evaluated with one key sees
    the same task instance, and the meta-objective is an expectation over the family.

    With ``speed_weight`` w > 0 the value is ``(1 − w)·log L(T) + w·mean_k log L(kT/K)``
    over ``speed_points`` K evenly spaced evaluations (the last is T): a run that gets low
    early scores better, which is what the gate's steps-to-target measures, while the final
    loss keeps most of the weight (with w = ½, K = 4: 5/8 on T, 1/8 on each earlier point).
    Each log is clipped to ``[min_log_loss, max_log_loss]``.

    ``augmentation`` (meta-training only, :mod:`lopt.inner.task_augmentation`) is drawn from the
    key too, so both members of an ES pair run the same augmented task. Off (the default),
    nothing is drawn and the unroll is the plain one.
    """

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
        task = self.draw(task_key, head_key)
        run = (task.params, theta, self.l3rs.opt_fn, eval_params)
        if self.augmentation.active:
            # A key of its own: without augmentation the task, head and data are as before.
            run = self.augmentation(jax.random.fold_in(key, 1), *run)
        params, hparams, make_optimizer, measure_at = run
        trajectory = unroll(
            hparams,
            params,
            task.train,
            (task.val,),
            data_key,
            model_fn=task.model_fn,
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


# --- Spreading samples over devices -----------------------------------------------------------

SampleFn = Callable[[MetaParams, jax.Array], tuple[MetaParams, Any]]
"""``sample(θ, key) -> (gradient estimate, objective value)`` of one ES pair or one task (the
value may carry more, for a ``combine`` that reads it)."""

Combine = Callable[..., Estimate]
"""``combine(results, batched) -> Estimate``: reduces the samples' results."""


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
    combine: Combine | None = None,
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

    ``combine(results, batched)`` reduces the samples' results (default: the mean).
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
    return with_metrics(gradient, join([v for _, v in results]))


def with_metrics(gradient: MetaParams, values: jax.Array) -> Estimate:
    """An estimate with the samples' objective mean and spread and the gradient's norm."""
    return Estimate(
        gradient=gradient,
        metrics={
            "objective": jnp.mean(values),
            "objective_std": jnp.std(values),
            "gradient_norm": optax.tree.norm(gradient),
        },
    )


@dataclasses.dataclass(frozen=True, eq=False)
class Samples:
    """The estimator of ``num_samples`` independent samples of ``sample``, one per split of
    the key, ``per_program`` of them compiled into each program (``None``: by platform,
    :func:`samples_per_program`) and spread over the local devices
    (:func:`estimate_on_devices`); ``combine`` reduces them (``None``: the mean)."""

    sample: SampleFn
    num_samples: int
    per_program: int | None = None
    combine: Combine | None = None

    def __post_init__(self) -> None:
        per_program = samples_per_program(self.per_program, self.num_samples)
        object.__setattr__(self, "per_program", per_program)
        object.__setattr__(self, "_program", sample_program(self.sample, per_program))

    def __call__(self, theta: MetaParams, key: jax.Array) -> Estimate:
        keys = jax.random.split(key, self.num_samples)
        return estimate_on_devices(self._program, theta, keys, self.per_program, self.combine)
