"""Meta-training L3RS: an outer Adam loop on θ driven by a gradient estimator.

The estimator interface follows learned_optimization's ``outer_trainers``: an estimator maps
(θ, key) to an estimate of ∇θ of the meta-objective plus metrics, and the outer loop does not
care how it was obtained. :class:`AntitheticES` is the paper's estimator; others (PES,
truncated backprop) implement the same protocol.

The meta-objective (:class:`FinalValidationLoss`) is the log of the validation loss after a
full fine-tuning unroll of the pretrained model with a fresh head. A calibration run here
(DESIGN.md §5) found the mean training loss over the unroll overfits, the final validation
loss on a held-out split does not; the log makes easy and hard tasks weigh alike, and a clip
keeps one diverging unroll from wrecking θ.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Mapping, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import optax
from tqdm.auto import tqdm

from lopt.l3rs import L3RS, MetaParams
from lopt.models import ModelSpec, Params, model_fn, with_fresh_head
from lopt.tasks import Task
from lopt.training import unroll


class Estimate(NamedTuple):
    gradient: MetaParams
    metrics: Mapping[str, jax.Array]


class GradientEstimator(Protocol):
    def __call__(self, theta: MetaParams, key: jax.Array) -> Estimate: ...


@dataclasses.dataclass(frozen=True, eq=False)
class FinalValidationLoss:
    """``log(val loss after T steps)`` of one fine-tuning run, a function of (θ, key).

    The key draws the fresh head's initialization and the minibatch order, so an antithetic
    pair evaluated with one key sees the same task instance.
    """

    l3rs: L3RS
    spec: ModelSpec
    pretrained: Params
    task: Task
    horizon: int
    batch_size: int
    max_log_loss: float = 3.0

    def __call__(self, theta: MetaParams, key: jax.Array) -> jax.Array:
        head_key, data_key = jax.random.split(key)
        params = with_fresh_head(self.spec, self.pretrained, self.task.num_classes, head_key)
        trajectory = unroll(
            theta,
            params,
            self.task.train,
            (self.task.val,),
            data_key,
            model_fn=model_fn(self.spec.with_num_classes(self.task.num_classes)),
            make_optimizer=self.l3rs.opt_fn,
            num_steps=self.horizon,
            batch_size=self.batch_size,
            eval_every=self.horizon,
        )
        log_loss = jnp.log(trajectory.eval_loss[0, -1])
        # A diverged run (NaN/inf) counts as the worst allowed value, not as a NaN gradient.
        return jnp.clip(jnp.nan_to_num(log_loss, nan=self.max_log_loss), max=self.max_log_loss)


@dataclasses.dataclass(frozen=True, eq=False)
class AntitheticES:
    """Antithetic evolution strategies (as in learned_optimization ``full_es.py``).

    For each of ``num_pairs`` draws ε ~ N(0, I) and one task key, both θ + σε and θ − σε run a
    full unroll; ``(f⁺ − f⁻) / (2σ) · ε`` averaged over pairs estimates ∇θ of the Gaussian-
    smoothed objective. Pairs run one after another inside one compiled call: vmapping CNN
    unrolls is slower than running them in sequence on CPU (DESIGN.md §3).
    """

    objective: Callable[[MetaParams, jax.Array], jax.Array]
    num_pairs: int
    sigma: float

    def __post_init__(self) -> None:
        if self.num_pairs < 1 or self.sigma <= 0:
            raise ValueError(
                f"ES needs num_pairs >= 1 and sigma > 0, got {self.num_pairs}, {self.sigma}."
            )
        object.__setattr__(self, "_estimate", jax.jit(self._estimate_impl))

    def _estimate_impl(self, theta: MetaParams, key: jax.Array) -> Estimate:
        leaves, treedef = jax.tree.flatten(theta)

        def pair(pair_key):
            noise_key, task_key = jax.random.split(pair_key)
            noise_keys = jax.random.split(noise_key, len(leaves))
            eps = jax.tree.unflatten(
                treedef,
                [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(noise_keys, leaves)],
            )
            plus = self.objective(jax.tree.map(lambda t, e: t + self.sigma * e, theta, eps), task_key)
            minus = self.objective(jax.tree.map(lambda t, e: t - self.sigma * e, theta, eps), task_key)
            scale = (plus - minus) / (2.0 * self.sigma)
            return jax.tree.map(lambda e: scale * e, eps), (plus + minus) / 2.0

        grads, values = jax.lax.map(pair, jax.random.split(key, self.num_pairs))
        gradient = jax.tree.map(lambda g: jnp.mean(g, axis=0), grads)
        return Estimate(
            gradient=gradient,
            metrics={
                "objective": jnp.mean(values),
                "objective_std": jnp.std(values),
                "gradient_norm": optax.tree.norm(gradient),
            },
        )

    def __call__(self, theta: MetaParams, key: jax.Array) -> Estimate:
        return self._estimate(theta, key)


class MetaTrainResult(NamedTuple):
    theta: MetaParams
    history: list[dict[str, float]]
    seconds: float


def meta_train(
    estimator: GradientEstimator,
    theta: MetaParams,
    *,
    num_steps: int,
    learning_rate: float,
    key: jax.Array,
    on_step: Callable[[int, dict[str, float]], Any] | None = None,
    progress: bool = True,
) -> MetaTrainResult:
    """Runs ``num_steps`` outer Adam steps on θ with gradients from ``estimator``.

    ``on_step(step, metrics)`` receives each meta-step's metrics (e.g. to log them to MLflow).
    """
    outer = optax.adam(learning_rate)

    @jax.jit
    def apply(theta, opt_state, gradient):
        updates, opt_state = outer.update(gradient, opt_state, theta)
        return optax.apply_updates(theta, updates), opt_state

    opt_state = outer.init(theta)
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    bar = tqdm(range(num_steps), desc="meta-train (ES)", unit="step", disable=not progress)
    for step in bar:
        key, step_key = jax.random.split(key)
        estimate = estimator(theta, step_key)
        theta, opt_state = apply(theta, opt_state, estimate.gradient)
        # One host transfer per meta-step, for logging; the estimate itself stays on device.
        metrics = {k: float(v) for k, v in jax.device_get(dict(estimate.metrics)).items()}
        metrics["seconds"] = time.perf_counter() - start
        history.append(metrics)
        bar.set_postfix(objective=f"{metrics['objective']:.4f}")
        if on_step is not None:
            on_step(step, metrics)
    return MetaTrainResult(theta=theta, history=history, seconds=time.perf_counter() - start)
