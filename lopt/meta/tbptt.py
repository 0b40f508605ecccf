"""Backpropagation through fine-tuning unrolls: whole (``backprop``) or truncated (``tbptt``).

An :class:`lopt.meta.estimator.Estimator` beside antithetic ES. Each sample draws a task from the
family, trains a fresh head with θ held constant for a random number of steps (no gradient),
then runs ``truncation`` more steps with θ differentiable and backpropagates the log
validation loss at the window's end through them. With ``truncation == horizon`` the window is
the whole unroll and the sample is the exact gradient, for that task, of the meta-objective
ES estimates (:class:`lopt.meta.estimator.FinalValidationLoss`).

What it trades: a short window sees θ's effect on ``truncation`` steps only (biased toward
greedy, short-horizon behaviour, the classic truncation bias); the whole unroll has no bias
and costs ~4 unrolls of memory-light reverse mode per task. Neither has ES's sampling noise in
θ-space, but single tasks' gradients disagree, so an estimate averages several
(docs/measurements.md). A short window's position is random so that every part of the
schedule (t/T) gets gradient signal; it begins at one of the controller's refreshes.
Divergence is contained as in ES: the loss is clipped, and a non-finite gradient counts as
zero.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lopt.meta.estimator import Estimate, FineTuning, Samples, clipped_log
from lopt.optim.l3rs import MetaParams, eval_params
from lopt.inner.training import evaluate, make_train_step


@dataclasses.dataclass(frozen=True, eq=False)
class TruncatedBackprop(FineTuning):
    """∇θ of ``log(val loss)`` after a ``truncation``-step window of a ``horizon``-step run.

    ``num_tasks`` windows (each its own task, head, data and position) are averaged per
    estimate; they are spread over the local devices and ``samples_per_program`` of them
    ``vmap``-ed into each program, as ES pairs are (:class:`lopt.meta.estimator.Samples`).
    """

    truncation: int = 20
    num_tasks: int = 4
    samples_per_program: int | None = None

    def __post_init__(self) -> None:
        if not 0 < self.truncation <= self.horizon:
            raise ValueError(
                f"truncation must be in [1, horizon={self.horizon}], got {self.truncation}."
            )
        samples = Samples(self._sample, self.num_tasks, self.samples_per_program)
        object.__setattr__(self, "samples_per_program", samples.per_program)
        object.__setattr__(self, "_samples", samples)

    def window_loss(self, theta: MetaParams, key: jax.Array) -> jax.Array:
        task_key, head_key, data_key, start_key = jax.random.split(key, 4)
        task = self.draw(task_key, head_key)
        keys = jax.random.split(data_key, self.horizon)
        # Windows begin at a refresh of the controller (L3RSConfig.control_interval): a window
        # that began between refreshes would run on controls carried in from before it,
        # constants to the gradient, and one shorter than the interval would get none at all.
        interval = self.l3rs.config.control_interval
        starts = (self.horizon - self.truncation) // interval + 1
        start = interval * jax.random.randint(start_key, (), 0, starts)

        frozen = self.l3rs.opt_fn(jax.lax.stop_gradient(theta), self.horizon)
        prefix_step = make_train_step(task.model_fn, frozen, task.train, self.batch_size)
        carry = jax.lax.fori_loop(
            0, start, lambda i, c: prefix_step(c, keys[i])[0], (task.params, frozen.init(task.params))
        )
        optimizer = self.l3rs.opt_fn(theta, self.horizon)
        window_step = make_train_step(task.model_fn, optimizer, task.train, self.batch_size)
        window_keys = jax.lax.dynamic_slice_in_dim(keys, start, self.truncation)
        (params, opt_state), _ = jax.lax.scan(window_step, jax.lax.stop_gradient(carry), window_keys)
        loss, _ = evaluate(task.model_fn, eval_params(opt_state, params), task.val)
        return clipped_log(loss, self.max_log_loss)

    def _sample(self, theta: MetaParams, key: jax.Array) -> tuple[MetaParams, jax.Array]:
        value, grad = jax.value_and_grad(self.window_loss)(theta, key)
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grad)]))
        return jax.tree.map(lambda g: jnp.where(finite, g, 0.0), grad), value

    def __call__(self, theta: MetaParams, key: jax.Array) -> Estimate:
        return self._samples(theta, key)
