"""Antithetic evolution strategies: the paper's meta-gradient estimator.

As learned_optimization's ``full_es.py``: each sample perturbs θ both ways along one Gaussian
direction and compares whole fine-tuning unrolls, so the estimate needs no gradient through
the unroll and sees the Gaussian-smoothed objective, not its chaotic fine structure. Its
variance grows with the number of meta-parameters over the number of pairs, which is why an
accelerator, where hundreds of pairs cost little more than one, suits it (docs/measurements.md).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp

from lopt.config import ES_NORMALIZATIONS
from lopt.meta.estimator import Estimate, Samples, with_metrics
from lopt.optim.l3rs import MetaParams


@dataclasses.dataclass(frozen=True, eq=False)
class AntitheticES:
    """Antithetic evolution strategies on ``objective(θ, key)``.

    For each of ``num_pairs`` draws ε ~ N(0, I) and one task key, both θ + σε and θ − σε run a
    full unroll; ``(f⁺ − f⁻) / (2σ) · ε`` averaged over pairs estimates ∇θ of the Gaussian-
    smoothed objective.

    Pairs are spread over the local devices (:class:`lopt.meta.estimator.Samples`), with
    ``samples_per_program`` pairs ``vmap``-ed into each compiled program (``None``: chosen
    by platform). On CPU that is one pair per program and one device per core. Not a
    ``shard_map`` over a device mesh: XLA compiles the partitioned program differently, and a
    long unroll amplifies the rounding into different losses.

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
        combine = _combine_ranked if self.normalization == "rank" else None
        samples = Samples(self._pair, self.num_pairs, self.samples_per_program, combine)
        object.__setattr__(self, "samples_per_program", samples.per_program)
        object.__setattr__(self, "_samples", samples)

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
        return self._samples(theta, key)


@functools.partial(jax.jit, static_argnames="batched")
def _combine_ranked(
    results: list[tuple[MetaParams, tuple[jax.Array, jax.Array]]], batched: bool
) -> Estimate:
    """The mean of the pairs' gradients, each weighted by the rank of its magnitude among all
    of them, ``r/n`` with ``r`` in 1..n (ties broken by order), with the objective's mean and
    spread as metrics."""
    join = jnp.concatenate if batched else jnp.stack
    values = join([v for _, (v, _) in results])
    magnitudes = join([m for _, (_, m) in results])
    ranks = jnp.argsort(jnp.argsort(magnitudes, stable=True), stable=True) + 1
    weights = ranks.astype(jnp.float32) / magnitudes.shape[0]
    gradient = jax.tree.map(
        lambda *g: jnp.mean(weights.reshape((-1,) + (1,) * (g[0].ndim - batched)) * join(g), axis=0),
        *[g for g, _ in results],
    )
    return with_metrics(gradient, values)
