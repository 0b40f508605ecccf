"""Task augmentation for meta-training unrolls (as learned_optimization's
``tasks/task_augmentation.py`` does for VeLO): the same task, seen through a random change of
variables or a differently scaled fresh head, so that θ cannot fit one parameterization.

Everything here is a meta-training augmentation only. It is drawn inside the jitted
meta-objective from the task's key (:class:`lopt.meta.estimator.FinalValidationLoss`), so both
members of an ES pair see the same draw; validation, selection and the registered optimizer
never go through it.

**Weight reparameterization.** The optimizer sees ``p' = p / s`` while the model computes with
``p = s·p'``: with ``g' = ∂L/∂p' = s·g``, an optimizer step ``Δp'`` is a model step ``s·Δp'``.
Done here as an optax wrapper (:func:`reparameterize`) around the optimizer in the model's
coordinates, which is the same run up to rounding and leaves the model, the evaluation and the
unroll untouched. ``s = s_global · s_tensor``, each log-uniform in ``[1/f, f]``.

Why the ranges are narrow. L3RS's features are scale-free (log-ratios of loss, gradient and
weight norms to their first-step values, :mod:`lopt.optim.l3rs`), so it cannot see ``s``: an Adam-
like normalized step of size λ in ``p'`` is ``s·λ`` in ``p``, and reparameterization amounts to
a random per-tensor learning-rate multiplier the optimizer must be robust to. VeLO's ranges
(10⁻³…10³) suit an optimizer that reads raw parameter values and trains from scratch; for
fine-tuning one pretrained model, whose weight scales pretraining fixed, a factor of 10 would
teach a step size that compromises across two orders of magnitude. Suggested when turned on:
``weight_scale = 2`` (global factor in [½, 2]), ``tensor_scale = 1.5`` (per tensor in [⅔,
1.5]), ``head_init_scale = 3`` (fresh head's initialization × [⅓, 3]: the head is the one
tensor pretraining did not set, and its scale changes how hard the first steps pull on the
body). A factor of 1 turns each off; all are off by default.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lopt.inner.training import EvalParamsFn, OptimizerFactory


class ReparamState(NamedTuple):
    """The wrapped optimizer's state (in ``p'`` coordinates) and the per-tensor scales ``s``."""

    inner: optax.OptState
    scales: optax.Params


def _mul(tree: Any, scales: Any) -> Any:
    return jax.tree.map(lambda x, s: (x * s).astype(x.dtype), tree, scales)


def _div(tree: Any, scales: Any) -> Any:
    return jax.tree.map(lambda x, s: (x / s).astype(x.dtype), tree, scales)


def reparameterize(
    optimizer: optax.GradientTransformationExtraArgs, scales: optax.Params
) -> optax.GradientTransformationExtraArgs:
    """``optimizer`` run in coordinates ``p' = p / s`` (``scales`` a pytree like the params).

    It gets ``s·g`` and ``p / s`` and its updates are multiplied by ``s``, which is what it would
    do if the model computed with ``s·p'``. With ``s = 1`` every product is exact: the run is
    the unwrapped one (up to ~1 ulp where XLA fuses the wrapped step differently).
    """

    def init_fn(params: optax.Params) -> ReparamState:
        return ReparamState(optimizer.init(_div(params, scales)), scales)

    def update_fn(updates, state, params=None, **extra_args):
        inner_params = None if params is None else _div(params, state.scales)
        inner_updates, inner = optimizer.update(
            _mul(updates, state.scales), state.inner, inner_params, **extra_args
        )
        return _mul(inner_updates, state.scales), ReparamState(inner, state.scales)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


@functools.lru_cache(maxsize=None)
def reparameterized_factory(make_optimizer: OptimizerFactory) -> OptimizerFactory:
    """``make_optimizer`` taking ``(hparams, scales)``, wrapped by :func:`reparameterize`.
    Cached: the unroll takes the factory as a static argument, and one object per factory
    reuses its compilation."""

    def factory(hparams_and_scales: tuple[Any, optax.Params], num_steps: int):
        hparams, scales = hparams_and_scales
        return reparameterize(make_optimizer(hparams, num_steps), scales)

    return factory


@functools.lru_cache(maxsize=None)
def reparameterized_eval(eval_params: EvalParamsFn) -> EvalParamsFn:
    """``eval_params`` for the wrapped state: computed in ``p'`` coordinates, mapped back."""

    def wrapped(state: ReparamState, params: optax.Params) -> optax.Params:
        return _mul(eval_params(state.inner, _div(params, state.scales)), state.scales)

    return wrapped


def log_uniform(key: jax.Array, factor: float, shape: tuple[int, ...] = ()) -> jax.Array:
    """Draws from ``[1/factor, factor]``, log-uniformly (exactly 1 when ``factor`` is 1)."""
    if factor == 1.0:
        return jnp.ones(shape, jnp.float32)
    half = math.log(factor)
    return jnp.exp(jax.random.uniform(key, shape, jnp.float32, -half, half))


class AugmentedRun(NamedTuple):
    """What an augmented unroll runs with, in place of the plain arguments."""

    params: Any
    hparams: Any
    make_optimizer: OptimizerFactory
    eval_params: EvalParamsFn | None


@dataclasses.dataclass(frozen=True)
class TaskAugmentation:
    """Ranges of the augmentations (each factor ``f >= 1`` draws from ``[1/f, f]``; 1: off).

    Attributes:
      weight_scale: one global reparameterization factor for all tensors.
      tensor_scale: an independent reparameterization factor per tensor (times the global).
      head_init_scale: multiplies the fresh head's initialization.
    """

    weight_scale: float = 1.0
    tensor_scale: float = 1.0
    head_init_scale: float = 1.0

    def __post_init__(self) -> None:
        for name in ("weight_scale", "tensor_scale", "head_init_scale"):
            if not getattr(self, name) >= 1.0:
                raise ValueError(
                    f"{name} is a range factor f >= 1 (draws from [1/f, f]; 1 turns it off), "
                    f"got {getattr(self, name)}."
                )

    @property
    def active(self) -> bool:
        return self.reparameterizes or self.head_init_scale != 1.0

    @property
    def reparameterizes(self) -> bool:
        return self.weight_scale != 1.0 or self.tensor_scale != 1.0

    def scales(self, key: jax.Array, params: Any) -> Any:
        """The reparameterization's ``s``: one pytree of scalars like ``params``."""
        k_global, k_tensor = jax.random.split(key)
        leaves, treedef = jax.tree.flatten(params)
        global_scale = log_uniform(k_global, self.weight_scale)
        per_tensor = log_uniform(k_tensor, self.tensor_scale, (len(leaves),))
        return jax.tree.unflatten(treedef, [global_scale * per_tensor[i] for i in range(len(leaves))])

    def __call__(
        self,
        key: jax.Array,
        params: Any,
        hparams: Any,
        make_optimizer: OptimizerFactory,
        eval_params: EvalParamsFn | None,
    ) -> AugmentedRun:
        """The run's arguments with the augmentations ``key`` draws applied."""
        k_scales, k_head = jax.random.split(key)
        if self.head_init_scale != 1.0:
            factor = log_uniform(k_head, self.head_init_scale)
            params = {**params, "head": jax.tree.map(lambda x: x * factor, params["head"])}
        if not self.reparameterizes:
            return AugmentedRun(params, hparams, make_optimizer, eval_params)
        return AugmentedRun(
            params,
            (hparams, self.scales(k_scales, params)),
            reparameterized_factory(make_optimizer),
            None if eval_params is None else reparameterized_eval(eval_params),
        )
