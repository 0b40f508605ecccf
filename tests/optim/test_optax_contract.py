"""The optax contract, one suite for every optimizer lopt ships.

L3RS (untrained, through each of its code paths) and every baseline of :mod:`lopt.optim.baselines`
run through the same checks, as optax's and learned_optimization's test utilities run theirs:
each is an :data:`lopt.inner.training.OptimizerFactory` ``make(hparams, num_steps)`` returning an
``optax.GradientTransformationExtraArgs`` whose ``update`` takes ``params`` and the loss as
``value=``, which is all the inner-training loop (:func:`lopt.inner.training.unroll`) relies on.

The checks run on the tiny CNN's parameters with the gradient of a quadratic bowl, so one
recorded run (jitted, :func:`run`) serves most of them.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lopt.inner import models
from lopt.optim.baselines import BASELINES
from lopt.optim.l3rs import L3RS, L3RSConfig
from lopt.optim.layout import LayerLayout
from lopt.inner.training import OptimizerFactory

SPEC = models.ModelSpec(num_classes=3, input_shape=(8, 8, 1), conv_features=(4,), hidden_size=8)
# Several refreshes of the L3RS controller at the default interval (steps 1, 17, 33, 49), and
# enough for Prodigy, whose step-size estimate starts at 1e-6, to descend.
NUM_STEPS = 60

Params = Any


def _l3rs(config: L3RSConfig) -> Callable[[Params], tuple[OptimizerFactory, Any]]:
    def make(params: Params) -> tuple[OptimizerFactory, Any]:
        l3rs = L3RS(config, LayerLayout.from_params(params))
        return l3rs.opt_fn, l3rs.init(jax.random.key(0))

    return make


def _baseline(name: str) -> Callable[[Params], tuple[OptimizerFactory, Any]]:
    # The middle of the baseline's own grid: a learning rate it is meant to run at.
    baseline = BASELINES[name]
    return lambda params: (baseline.make_optimizer, jnp.float32(baseline.grid(1)[0]))


# name -> (params -> (factory, hparams)).
OPTIMIZERS: dict[str, Callable[[Params], tuple[OptimizerFactory, Any]]] = {
    "l3rs": _l3rs(L3RSConfig()),
    # The pipeline's default.
    "l3rs_scale_free": _l3rs(L3RSConfig(normalization="scale_free", base_learning_rate=2e-3)),
    "l3rs_schedule_free": _l3rs(
        L3RSConfig(averaging="schedule_free", schedule="warmup_constant", init_direction="rmsprop")
    ),
    "l3rs_refresh_every_step": _l3rs(L3RSConfig(control_interval=1)),
    "l3rs_three_directions": _l3rs(L3RSConfig(directions=("adam", "momentum", "gradient"))),
    "l3rs_one_decay": _l3rs(L3RSConfig(ema_decays=(0.5,), embedding_dim=2, hidden_size=4)),
    **{f"baseline_{name}": _baseline(name) for name in BASELINES},
}


def _params() -> Params:
    return models.init_params(SPEC, jax.random.key(0))


_TARGET = jax.tree.map(
    lambda p: jax.random.normal(jax.random.key(1), p.shape, p.dtype), _params()
)


def _loss_and_grads(params: Params) -> tuple[jax.Array, Params]:
    """A quadratic bowl around a random target: ``½ Σ (p − target)²``."""
    return jax.value_and_grad(
        lambda p: 0.5 * sum(jnp.sum(jnp.square(a - b)) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(_TARGET)))
    )(params)


class Run(NamedTuple):
    """NUM_STEPS jitted steps of one optimizer on the bowl."""

    optimizer: optax.GradientTransformationExtraArgs
    update: Any  # the jitted update
    params: Params
    states: list[Any]  # before the first step, then after each
    updates: list[Params]
    losses: list[float]  # before each step, then after the last


def _run(optimizer: optax.GradientTransformationExtraArgs, params: Params, update=None) -> Run:
    update = update or jax.jit(optimizer.update)
    states, updates, losses = [optimizer.init(params)], [], []
    for _ in range(NUM_STEPS):
        loss, grads = _loss_and_grads(params)
        u, state = update(grads, states[-1], params, value=loss)
        params = optax.apply_updates(params, u)
        states.append(state)
        updates.append(u)
        losses.append(float(loss))
    losses.append(float(_loss_and_grads(params)[0]))
    return Run(optimizer, update, params, states, updates, losses)


@pytest.fixture(scope="module", params=sorted(OPTIMIZERS))
def run(request) -> Run:
    params = _params()
    make, hparams = OPTIMIZERS[request.param](params)
    return _run(make(hparams, NUM_STEPS), params)


def _same_structure_shapes_and_dtypes(a: Any, b: Any) -> bool:
    if jax.tree.structure(a) != jax.tree.structure(b):
        return False
    return all(
        jnp.shape(x) == jnp.shape(y) and jnp.result_type(x) == jnp.result_type(y)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def _equal(a: Any, b: Any) -> bool:
    return all(bool(jnp.array_equal(x, y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_init_under_jit_is_init(run):
    params = _params()
    eager, jitted = run.optimizer.init(params), jax.jit(run.optimizer.init)(params)
    assert _same_structure_shapes_and_dtypes(jitted, eager)
    jax.tree.map(np.testing.assert_array_equal, jitted, eager)


def test_state_keeps_its_structure_shapes_and_dtypes_across_steps(run):
    for state in run.states[1:]:
        assert _same_structure_shapes_and_dtypes(state, run.states[0])


def test_updates_have_the_params_tree_shapes_and_dtypes_and_are_finite(run):
    params = _params()
    for updates in run.updates:
        assert _same_structure_shapes_and_dtypes(updates, params)
        assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


def test_update_compiles_once_across_steps(run):
    assert run.update._cache_size() == 1


def test_descends_a_quadratic_bowl(run):
    assert run.losses[-1] < 0.95 * run.losses[0]


def test_is_deterministic(run):
    again = _run(run.optimizer, _params(), run.update)
    assert _equal(again.params, run.params) and again.losses == run.losses


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_hparams_are_traced_one_compilation_for_many(name):
    """The factory may be called inside jit with traced hparams (θ, a learning rate): ES
    perturbations and learning-rate grids reuse one compilation."""
    params = _params()
    make, hparams = OPTIMIZERS[name](params)
    loss, grads = _loss_and_grads(params)

    @jax.jit
    def second_update(hparams):  # the first is zero under a warm-up from 0
        optimizer = make(hparams, NUM_STEPS)
        _, state = optimizer.update(grads, optimizer.init(params), params, value=loss)
        return optimizer.update(grads, state, params, value=loss)[0]

    scaled = jax.tree.map(lambda h: h * 1.5 + 0.1, hparams)
    a, b = second_update(hparams), second_update(scaled)
    assert second_update._cache_size() == 1
    assert not _equal(a, b)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_composes_with_optax_chain_and_apply_if_finite(name):
    """Inside ``optax.chain`` (which passes ``params`` and ``value=`` on) and
    ``optax.apply_if_finite``, a step with a non-finite gradient changes no parameter, and the
    run goes on with one compiled update."""
    params = _params()
    make, hparams = OPTIMIZERS[name](params)
    optimizer = optax.apply_if_finite(
        optax.chain(optax.clip_by_global_norm(100.0), make(hparams, NUM_STEPS)), max_consecutive_errors=2
    )
    update = jax.jit(optimizer.update)
    start, state = params, optimizer.init(params)
    for step in range(4):
        loss, grads = _loss_and_grads(params)
        if step == 2:
            grads = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), grads)
        updates, new_state = update(grads, state, params, value=loss)
        assert _same_structure_shapes_and_dtypes(new_state, state)
        new_params = optax.apply_updates(params, updates)
        assert int(new_state.notfinite_count) == int(step == 2)
        if step == 2:
            assert _equal(new_params, params)
        params, state = new_params, new_state
    assert not _equal(params, start)
    assert update._cache_size() == 1
