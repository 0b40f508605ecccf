"""The L3RS update rule against its design, over several configurations (the optax contract it
meets with every other optimizer is checked in tests/optim/test_optax_contract.py)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lopt.inner import models
from lopt.optim.l3rs import DIRECTIONS, L3RS, L3RSConfig, constant_meta_params, eval_params
from lopt.optim.layout import LayerLayout, LayoutMismatchError

SPEC = models.ModelSpec(num_classes=3, input_shape=(8, 8, 1), conv_features=(4,), hidden_size=8)

CONFIGS = {
    "default": L3RSConfig(),
    "three_directions": L3RSConfig(directions=("adam", "momentum", "gradient")),
    "one_decay": L3RSConfig(ema_decays=(0.5,), embedding_dim=2, hidden_size=4),
    "refresh_every_step": L3RSConfig(control_interval=1),
    "schedule_free": L3RSConfig(
        averaging="schedule_free", schedule="warmup_constant", init_direction="rmsprop"
    ),
}


def _params(dtype=jnp.float32, spec=SPEC):
    params = models.init_params(spec, jax.random.key(0))
    return jax.tree.map(lambda p: p.astype(dtype), params)


def _grads(params, seed):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        treedef, [jax.random.normal(k, p.shape).astype(p.dtype) for k, p in zip(keys, leaves)]
    )


def _rms(x):
    return float(jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32)))))


@pytest.fixture(params=sorted(CONFIGS))
def config(request):
    return CONFIGS[request.param]


def test_bfloat16_params_get_bfloat16_updates_and_a_jit_stable_state(config):
    """The optax contract (tests/optim/test_optax_contract.py) is checked on float32 params; L3RS
    also gives low-precision params updates of their own dtype, its state staying as it was."""
    params = _params(jnp.bfloat16)
    l3rs = L3RS(config, LayerLayout.from_params(params))
    opt = l3rs.opt_fn(l3rs.init(jax.random.key(1)), num_steps=10)
    state = opt.init(params)
    update = jax.jit(opt.update)
    for step in range(3):
        updates, new_state = update(_grads(params, step), state, params, value=jnp.float32(1.0 / (step + 1)))
        assert jax.tree.structure(new_state) == jax.tree.structure(state)
        same = jax.tree.map(lambda a, b: (a.shape, a.dtype) == (b.shape, b.dtype), new_state, state)
        assert all(jax.tree.leaves(same))  # the tree of booleans itself is always truthy
        for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
            assert u.shape == p.shape and u.dtype == p.dtype
            assert bool(jnp.all(jnp.isfinite(u.astype(jnp.float32))))
        params, state = optax.apply_updates(params, updates), new_state
    assert int(state.count) == 3
    # jit compiled once: the state kept its structure, shapes and dtypes.
    assert update._cache_size() == 1


def test_equal_architectures_are_one_factory_and_share_a_compilation():
    """Frozen and compared by config and layout, equal L3RS are interchangeable wherever the
    optimizer factory is a jit-static argument (as in every unroll): one compilation for both."""
    params = _params()
    layout = LayerLayout.from_params(params)
    a, b = L3RS(L3RSConfig(), layout), L3RS(L3RSConfig(), LayerLayout.from_params(_params()))
    other = L3RS(L3RSConfig(hidden_size=8), layout)
    assert a == b and hash(a) == hash(b) and a.opt_fn == b.opt_fn and a != other

    @functools.partial(jax.jit, static_argnames="make")
    def first_update(theta, *, make):
        optimizer = make(theta, 10)
        return optimizer.update(_grads(params, 0), optimizer.init(params), params, value=1.0)[0]

    first_update(a.init(jax.random.key(0)), make=a.opt_fn)
    first_update(b.init(jax.random.key(1)), make=b.opt_fn)
    assert first_update._cache_size() == 1
    first_update(other.init(jax.random.key(0)), make=other.opt_fn)
    assert first_update._cache_size() == 2


def test_update_requires_loss_and_params(config):
    params = _params()
    l3rs = L3RS(config, LayerLayout.from_params(params))
    opt = l3rs.opt_fn(l3rs.init(jax.random.key(0)), num_steps=10)
    state = opt.init(params)
    with pytest.raises(ValueError, match="value=loss"):
        opt.update(_grads(params, 0), state, params)
    with pytest.raises(ValueError, match="value=loss"):
        opt.update(_grads(params, 0), state, value=1.0)


def _reference_direction(name, grads_seq, b1=0.9, b2=0.999, eps=1e-8):
    """Each base optimizer written out independently, leaf by leaf, then unit-RMS normalized."""
    if name == "adam":
        opt = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)
        state = opt.init(grads_seq[0])
        for g in grads_seq:
            out, state = opt.update(g, state)
    else:
        m = jax.tree.map(jnp.zeros_like, grads_seq[0])
        v = jax.tree.map(jnp.zeros_like, grads_seq[0])
        for t, g in enumerate(grads_seq, start=1):
            m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, m, g)
            v = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, v, g)
        v_hat = jax.tree.map(lambda v: v / (1 - b2**t), v)
        out = {
            "momentum": m,
            "gradient": grads_seq[-1],
            "rmsprop": jax.tree.map(lambda g, v: g / (jnp.sqrt(v) + eps), grads_seq[-1], v_hat),
            "sign_momentum": jax.tree.map(jnp.sign, m),
        }[name]
    return jax.tree.map(lambda d: d / jnp.sqrt(jnp.mean(d * d)), out)


def _one_direction_optimizer(params, direction, control_interval, scale=1.0):
    """L3RS reduced to one normalized base direction at a constant step of ``0.01 · scale``."""
    config = L3RSConfig(
        base_learning_rate=0.01, schedule="constant", horizon_exponent=0.0,
        control_interval=control_interval,
    )
    l3rs = L3RS(config, LayerLayout.from_params(params))
    return l3rs.opt_fn(constant_meta_params(l3rs, direction, np.log(scale)), num_steps=10)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_one_hot_mixture_is_the_normalized_base_optimizer(direction):
    params = _params()
    scale = 0.5
    # Refreshing every step: each update is exactly normalized.
    opt = _one_direction_optimizer(params, direction, control_interval=1, scale=scale)
    state = opt.init(params)
    grads_seq = [_grads(params, s) for s in range(4)]
    for g in grads_seq:
        updates, state = opt.update(g, state, params, value=jnp.float32(1.0))
    expected = _reference_direction(direction, grads_seq)
    for u, e in zip(jax.tree.leaves(updates), jax.tree.leaves(expected)):
        np.testing.assert_allclose(u, -0.01 * scale * e, rtol=2e-4, atol=1e-7)


@pytest.mark.parametrize("direction", ["sign_momentum", "adam", "gradient"])
def test_directions_with_exact_zeros_are_normalized_over_the_whole_layer(direction):
    # Dead units give exactly-zero gradient entries at every step, so m is exactly 0 there;
    # sign(m)'s mean square is then the fraction of nonzero entries, not 1.
    params = _params()
    # Refreshing every step: each update is exactly normalized.
    opt = _one_direction_optimizer(params, direction, control_interval=1)
    state = opt.init(params)
    dead = lambda g: g.at[..., ::3].set(0.0)  # a third of each layer's last axis
    grads_seq = [jax.tree.map(dead, _grads(params, s)) for s in range(3)]
    for g in grads_seq:
        updates, state = opt.update(g, state, params, value=jnp.float32(1.0))
    expected = _reference_direction(direction, grads_seq)
    for u, e in zip(jax.tree.leaves(updates), jax.tree.leaves(expected)):
        assert float(jnp.max(jnp.abs(u[..., ::3]))) == 0.0
        np.testing.assert_allclose(u, -0.01 * e, rtol=2e-4, atol=1e-7)


def test_untrained_optimizer_is_a_sensible_adam():
    params = _params()
    config = L3RSConfig()
    l3rs = L3RS(config, LayerLayout.from_params(params))
    theta = l3rs.init(jax.random.key(3))
    horizon = config.reference_horizon  # the first step of a run of this length: prior 1
    opt = l3rs.opt_fn(theta, num_steps=horizon)
    state = opt.init(params)
    _, state = opt.update(_grads(params, 0), state, params, value=jnp.float32(2.0))
    controls = l3rs.controls_in_effect(state, horizon)
    adam = config.directions.index("adam")
    assert np.all(np.asarray(controls.mixing_coefficients)[:, adam] > 0.5)
    lr = np.asarray(controls.learning_rates) / config.base_learning_rate
    assert np.all((lr > 0.8) & (lr < 1.25))


def test_cosine_prior_decays_the_step_size_over_the_horizon():
    """With the MLP's outputs constant, λ follows the cosine prior: 1 at the first step, half
    at mid-horizon, ~0 at the last step and after it (and the constant prior stays at 1)."""
    params = _params()
    grads = _grads(params, 0)

    def relative_rates(schedule: str, steps: int, horizon: int = 8) -> np.ndarray:
        config = L3RSConfig(base_learning_rate=0.01, schedule=schedule, horizon_exponent=0.0)
        l3rs = L3RS(config, LayerLayout.from_params(params))
        theta = constant_meta_params(l3rs, "adam")
        opt = l3rs.opt_fn(theta, num_steps=horizon)
        state = opt.init(params)
        rates = []
        for _ in range(steps):
            _, state = opt.update(grads, state, params, value=jnp.float32(1.0))
            rates.append(l3rs.controls_in_effect(state, horizon).learning_rates[0] / 0.01)
        return np.asarray(rates)

    cosine = relative_rates("cosine", 10)
    np.testing.assert_allclose(cosine[[0, 4]], [1.0, 0.5], rtol=1e-6)
    assert np.all(np.diff(cosine[:8]) < 0) and cosine[7] < 0.04
    np.testing.assert_allclose(cosine[8:], 0.0, atol=1e-7)  # past the horizon
    np.testing.assert_allclose(relative_rates("constant", 10), 1.0, rtol=1e-6)


def test_horizon_prior_scales_the_peak_step_inversely_with_the_horizon():
    params = _params()
    l3rs = L3RS(L3RSConfig(reference_horizon=200, horizon_exponent=1.0), LayerLayout.from_params(params))
    first_step = jnp.int32(1)
    peaks = [float(l3rs.step_size_prior(first_step, t)) for t in (100, 200, 800)]
    np.testing.assert_allclose(peaks, [2.0, 1.0, 0.25], rtol=1e-6)


def test_config_round_trips_through_json_and_rejects_bad_values():
    assert L3RSConfig.from_json(L3RSConfig().to_json()) == L3RSConfig()
    with pytest.raises(ValueError, match="Unknown schedule"):
        L3RSConfig(schedule="linear")
    with pytest.raises(ValueError, match="control_interval"):
        L3RSConfig(control_interval=0)


def test_learning_rate_schedule_depends_on_time_and_horizon():
    """t/T and log T are inputs: the same state at another horizon gives other controls."""
    params = _params()
    l3rs = L3RS(L3RSConfig(init_output_scale=1.0), LayerLayout.from_params(params))
    theta = l3rs.init(jax.random.key(0))

    def first_rates(horizon: int) -> np.ndarray:
        opt = l3rs.opt_fn(theta, num_steps=horizon)
        _, state = opt.update(_grads(params, 0), opt.init(params), params, value=jnp.float32(1.0))
        return np.asarray(state.controls.learning_rates)  # before the priors

    assert not np.allclose(first_rates(10), first_rates(1000))


def test_controller_refreshes_every_control_interval_steps():
    """With control_interval k, the MLP's controls and the direction normalizers change only
    at steps 1, k + 1, 2k + 1, ...; in between, the same mixture scales the current directions."""
    params = _params()
    config = L3RSConfig(control_interval=3, init_output_scale=1.0)
    l3rs = L3RS(config, LayerLayout.from_params(params))
    opt = l3rs.opt_fn(l3rs.init(jax.random.key(0)), num_steps=20)
    state = opt.init(params)
    rates, inverse_rms = [], []
    for step in range(7):
        _, state = opt.update(_grads(params, step), state, params, value=jnp.float32(1.0 / (step + 1)))
        rates.append(np.asarray(state.controls.learning_rates))
        inverse_rms.append(np.asarray(state.inverse_rms))
    for held in ([0, 1, 2], [3, 4, 5]):
        for i in held[1:]:
            np.testing.assert_array_equal(rates[i], rates[held[0]])
            np.testing.assert_array_equal(inverse_rms[i], inverse_rms[held[0]])
    for before, after in ((2, 3), (5, 6)):
        assert not np.allclose(rates[before], rates[after])
        assert not np.allclose(inverse_rms[before], inverse_rms[after])


def test_refreshed_updates_match_every_step_control():
    """With constant controls, refresh steps give exactly the every-step update, and the steps
    in between its direction under the last refresh's normalizer."""
    params = _params()

    def updates(interval: int) -> list:
        config = L3RSConfig(base_learning_rate=0.01, control_interval=interval)
        l3rs = L3RS(config, LayerLayout.from_params(params))
        opt = l3rs.opt_fn(constant_meta_params(l3rs, "adam"), num_steps=10)
        state, out = opt.init(params), []
        for step in range(5):
            u, state = opt.update(_grads(params, step), state, params, value=jnp.float32(1.0))
            out.append(u)
        return out

    every_step, every_third = updates(1), updates(3)
    for step in range(5):
        for a, b in zip(jax.tree.leaves(every_step[step]), jax.tree.leaves(every_third[step])):
            if step in (0, 3):  # refreshes
                np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-9)
            else:  # parallel, scaled by rms(now) / rms(at the refresh)
                ratio = float(jnp.sum(a * b) / jnp.sum(a * a))
                np.testing.assert_allclose(b, ratio * a, rtol=1e-5, atol=1e-9)
                assert 0.1 < ratio < 10.0


@pytest.mark.parametrize("direction", ["adam", "momentum", "sign_momentum"])
def test_update_size_is_steady_between_refreshes_under_a_constant_gradient(direction):
    """m's bias shrinks over the first steps; between refreshes it must not grow the step
    (uncorrected, the adam direction's second step would be 1.9× its first)."""
    params = _params()
    opt = _one_direction_optimizer(params, direction, control_interval=4)
    state, grads = opt.init(params), _grads(params, 0)
    for _ in range(6):
        updates, state = opt.update(grads, state, params, value=jnp.float32(1.0))
        for u in jax.tree.leaves(updates):
            np.testing.assert_allclose(_rms(u), 0.01, rtol=1e-4)


@pytest.mark.parametrize("direction", ["adam", "momentum", "gradient", "rmsprop"])
def test_a_gradient_spike_between_refreshes_does_not_enlarge_the_step(direction):
    """Between refreshes the normalizers are stale; a gradient 100× the refresh's must still
    give a step no larger than λ (uncapped, the gradient direction's would be 100× λ)."""
    params = _params()
    opt = _one_direction_optimizer(params, direction, control_interval=8)
    state, grads = opt.init(params), _grads(params, 0)
    for step in range(4):
        spike = 100.0 if step == 2 else 1.0
        updates, state = opt.update(
            jax.tree.map(lambda g: spike * g, grads), state, params, value=jnp.float32(1.0)
        )
        if spike > 1.0:
            for u in jax.tree.leaves(updates):
                assert _rms(u) <= 0.01 * (1 + 1e-4)


@pytest.mark.parametrize("interval", [1, 3])
def test_norm_features_are_bias_corrected_at_every_refresh(interval):
    """Constant gradients and weights must read as constant (log-ratio 0 to the first step),
    whatever the refresh interval: the norms' EMAs are corrected for the refreshes they had."""
    params = _params()
    config = L3RSConfig(control_interval=interval)
    l3rs = L3RS(config, LayerLayout.from_params(params))
    theta = l3rs.init(jax.random.key(0))
    opt = l3rs.opt_fn(theta, num_steps=20)
    state, grads = opt.init(params), _grads(params, 0)
    num_decays = len(config.ema_decays)
    norm_columns = slice(config.embedding_dim + 2 + num_decays, None)
    for _ in range(2 * interval + 1):
        _, state = opt.update(grads, state, params, value=jnp.float32(1.0))
        features = l3rs.features(theta, state, 20)
        # float32 rounding of 1 - 0.999^k is ~1e-5; a wrong correction is off by ~log(2).
        np.testing.assert_allclose(features[:, norm_columns], 0.0, atol=1e-4)


def test_layout_mismatch_names_the_layers_and_allows_a_new_head_size():
    params = _params()
    l3rs = L3RS(L3RSConfig(), LayerLayout.from_params(params))
    opt = l3rs.opt_fn(l3rs.init(jax.random.key(0)), num_steps=10)
    # A head for another number of classes is the same architecture.
    opt.init(models.with_fresh_head(SPEC, params, 7, jax.random.key(1)))
    other = _params(spec=models.ModelSpec(num_classes=3, input_shape=(8, 8, 1), conv_features=(6,), hidden_size=8))
    with pytest.raises(LayoutMismatchError, match=r"PatchConv_0/Dense_0/kernel: expected shape \[9, 4\], got \[9, 6\]"):
        opt.init(other)
    deeper = _params(spec=models.ModelSpec(num_classes=3, input_shape=(8, 8, 1), conv_features=(4, 4), hidden_size=8))
    with pytest.raises(LayoutMismatchError, match="unexpected PatchConv_1/Dense_0/kernel"):
        opt.init(deeper)


def test_config_rejects_unknown_directions():
    with pytest.raises(ValueError, match="Unknown base directions"):
        L3RSConfig(directions=("adam", "lamb"))
    with pytest.raises(ValueError, match="init_direction"):
        L3RSConfig(directions=("momentum", "gradient"))


def _sine_grads(params, seed):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [
        jnp.sin(3.0 * p + 0.1 * seed) + 0.1 * jax.random.normal(k, p.shape)
        for k, p in zip(keys, leaves)
    ])


def _max_difference(a, b):
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_averaging_is_optax_schedule_free_around_the_rule():
    """With a constant interpolation, L3RS's averaging is exactly optax's schedule-free
    wrapper around the non-averaging rule (the same weights from the warm-up prior)."""
    params = _params()
    horizon = 20
    plain_config = L3RSConfig(
        schedule="warmup_constant", warmup_fraction=0.2, horizon_exponent=0.0, control_interval=1
    )
    plain = L3RS(plain_config, LayerLayout.from_params(params))
    averaged = L3RS(
        dataclasses.replace(plain_config, averaging="schedule_free"), LayerLayout.from_params(params)
    )
    reference = optax.contrib.schedule_free(
        plain.opt_fn(constant_meta_params(plain, "rmsprop"), horizon),
        learning_rate=lambda count: plain.schedule(count, horizon),
        b1=0.9,
    )
    mine = averaged.opt_fn(constant_meta_params(averaged, "rmsprop"), horizon)
    p_ref = p_mine = params
    s_ref, s_mine = reference.init(params), mine.init(params)
    for step in range(horizon - 1):  # the last step lands on the average: compared below
        u, s_ref = reference.update(_sine_grads(p_ref, step), s_ref, p_ref, value=1.0)
        p_ref = optax.apply_updates(p_ref, u)
        u, s_mine = mine.update(_sine_grads(p_mine, step), s_mine, p_mine, value=1.0)
        p_mine = optax.apply_updates(p_mine, u)
    assert _max_difference(p_ref, p_mine) < 1e-5
    x_ref = optax.contrib.schedule_free_eval_params(s_ref, p_ref)
    assert _max_difference(x_ref, eval_params(s_mine, p_mine)) < 1e-5
    assert _max_difference(x_ref, p_ref) > 1e-3  # y and x differ: the comparison means something


def test_a_run_of_the_planned_length_ends_on_the_average():
    params = _params()
    l3rs = L3RS(CONFIGS["schedule_free"], LayerLayout.from_params(params))
    horizon = 12
    opt = l3rs.opt_fn(l3rs.init(jax.random.key(0)), horizon)
    state = opt.init(params)
    for step in range(horizon):
        before = eval_params(state, params)
        updates, state = opt.update(_sine_grads(params, step), state, params, value=1.0)
        params = optax.apply_updates(params, updates)
        if step == horizon - 2:
            assert _max_difference(eval_params(state, params), params) > 1e-4
    assert _max_difference(eval_params(state, params), params) < 1e-6
    assert _max_difference(before, params) > 1e-5  # the last step still moved the average


def test_eval_params_is_the_identity_without_averaging():
    params = _params()
    l3rs = L3RS(L3RSConfig(), LayerLayout.from_params(params))
    opt = l3rs.opt_fn(l3rs.init(jax.random.key(0)), 10)
    state = opt.init(params)
    updates, state = opt.update(_grads(params, 0), state, params, value=1.0)
    params = optax.apply_updates(params, updates)
    assert eval_params(state, params) is params


@pytest.mark.parametrize("poison", ["loss_nan", "loss_inf", "grad_nan", "grad_inf"])
def test_a_non_finite_step_changes_nothing_but_the_skip_count(config, poison):
    params = _params()
    l3rs = L3RS(config, LayerLayout.from_params(params))
    opt = l3rs.opt_fn(l3rs.init(jax.random.key(0)), num_steps=60)
    update = jax.jit(opt.update)
    state = opt.init(params)
    for step in range(5):
        updates, state = update(_grads(params, step), state, params, value=jnp.float32(1.0))
        params = optax.apply_updates(params, updates)
    grads, loss = _grads(params, 5), jnp.float32(1.0)
    if poison.startswith("loss"):
        loss = jnp.float32(np.nan if poison == "loss_nan" else np.inf)
    else:
        bad = np.nan if poison == "grad_nan" else np.inf
        grads = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(bad), grads)
    updates, skipped = update(grads, state, params, value=loss)
    assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))
    assert int(skipped.skipped_steps) == int(state.skipped_steps) + 1
    unchanged = skipped._replace(skipped_steps=state.skipped_steps)
    assert all(
        bool(jnp.array_equal(a, b)) for a, b in zip(jax.tree.leaves(unchanged), jax.tree.leaves(state))
    )
    state = skipped
    for step in range(6, 60):  # past several refreshes of the controller
        updates, state = update(_grads(params, step), state, params, value=jnp.float32(1.0))
        params = optax.apply_updates(params, updates)
    assert all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(params))


@pytest.mark.parametrize("num_steps", [0, -3, 2.7, True, "400", None, 2**31])
def test_the_horizon_must_be_a_positive_int(num_steps):
    params = _params()
    l3rs = L3RS(L3RSConfig(), LayerLayout.from_params(params))
    with pytest.raises(ValueError, match="positive int"):
        l3rs.opt_fn(l3rs.init(jax.random.key(0)), num_steps)


@pytest.mark.parametrize("control_interval", [1, 4])
def test_scale_free_adam_direction_is_adams_own_update(control_interval):
    """With scale-free normalization the Adam direction keeps Adam's magnitude (bias-corrected
    m̂ / √v̂), which shrinks when the gradient is noisy, instead of being scaled to unit RMS."""
    params = _params()
    config = L3RSConfig(
        normalization="scale_free", base_learning_rate=0.01, schedule="constant",
        horizon_exponent=0.0, control_interval=control_interval,
    )
    l3rs = L3RS(config, LayerLayout.from_params(params))
    mine = l3rs.opt_fn(constant_meta_params(l3rs, "adam"), num_steps=10)
    adam = optax.adam(0.01)
    s_mine, s_adam = mine.init(params), adam.init(params)
    for step in range(7):
        # A gradient that shrinks: no step exceeds the refresh's, so the cap never binds.
        grads = jax.tree.map(lambda g: g / (1.0 + step), _grads(params, step))
        u_mine, s_mine = mine.update(grads, s_mine, params, value=1.0)
        u_adam, s_adam = adam.update(grads, s_adam, params)
        assert _max_difference(u_mine, u_adam) < 1e-6
    assert max(_rms(u) for u in jax.tree.leaves(u_adam)) < 0.01 * 0.9  # not unit RMS


def test_unit_rms_normalization_scales_the_adam_direction_to_the_step_size():
    params = _params()
    config = L3RSConfig(
        base_learning_rate=0.01, schedule="constant", horizon_exponent=0.0, control_interval=1
    )
    l3rs = L3RS(config, LayerLayout.from_params(params))
    opt = l3rs.opt_fn(constant_meta_params(l3rs, "adam"), num_steps=10)
    state = opt.init(params)
    for step in range(3):
        updates, state = opt.update(_grads(params, step), state, params, value=1.0)
    assert all(abs(_rms(u) - 0.01) < 1e-4 for u in jax.tree.leaves(updates))
