"""The meta-objective's options: its bounds, the speed term, ES normalizations, task
augmentation and horizon sampling (issue #15), each against an independent computation."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lopt.inner import models
from lopt.config import get_config
from lopt.meta.es import AntitheticES, _combine_ranked
from lopt.meta.estimator import MIN_LOG_LOSS, Estimate, FinalValidationLoss, clipped_log
from lopt.optim.l3rs import L3RS, L3RSConfig, eval_params
from lopt.optim.layout import LayerLayout
from lopt.meta.loop import RandomHorizon, log_uniform_weights, make_estimator
from lopt.inner.task_augmentation import (
    TaskAugmentation,
    log_uniform,
    reparameterize,
    reparameterized_eval,
    reparameterized_factory,
)
from lopt.inner.tasks import TaskFamily, TaskFamilySpec
from lopt.inner.training import Split, unroll

SPEC = models.ModelSpec(num_classes=3, input_shape=(8, 8, 1), conv_features=(4,), hidden_size=8)
HORIZON = 8


def _family() -> TaskFamily:
    rng = np.random.default_rng(0)
    labels = np.arange(3)[:, None, None, None, None]
    images = rng.uniform(size=(3, 16, 8, 8, 1)) * 0.3 + labels * 0.3
    return TaskFamily(
        TaskFamilySpec("synthetic", classes_per_task=3, contrast=(0.8, 1.2), brightness=0.1, max_shift=1),
        train=jnp.asarray(images, jnp.float32), val=jnp.asarray(images[:, :6], jnp.float32),
        content_hash="synthetic",
    )


@pytest.fixture(scope="module")
def setup():
    pretrained = models.init_params(SPEC, jax.random.key(0))
    l3rs = L3RS(L3RSConfig(), LayerLayout.from_params(pretrained))
    return l3rs, pretrained, _family(), l3rs.init(jax.random.key(1))


# --- Bounds ---------------------------------------------------------------------------------


def test_clipped_log_is_bounded_both_ways_and_nan_safe():
    losses = jnp.array([0.0, 1e-30, 1e-4, 0.5, 1e9, jnp.inf, jnp.nan, -1.0])
    logs = np.asarray(clipped_log(losses, 3.0))
    assert np.all(np.isfinite(logs)) and logs.min() >= MIN_LOG_LOSS and logs.max() <= 3.0
    assert logs[0] == logs[1] == np.float32(MIN_LOG_LOSS)  # a perfect fit is the floor, not -3e38
    np.testing.assert_allclose(logs[2:4], np.log([1e-4, 0.5]), rtol=1e-6)
    assert logs[4] == logs[5] == logs[6] == logs[7] == 3.0  # diverged or undefined: the ceiling
    assert float(clipped_log(jnp.float32(0.0), 3.0, min_log_loss=-2.0)) == -2.0


def test_a_zero_loss_on_one_side_of_a_pair_leaves_theta_finite():
    # θ+ fits exactly (loss 0), θ- does not: before the floor, the difference was ~3e38 and
    # the estimate (and θ after one outer step) not finite.
    def objective(theta, key):
        del key
        return clipped_log(jnp.where(theta["x"][0] > 0, 0.0, 0.3), 3.0)

    estimate = AntitheticES(objective, num_pairs=4, sigma=0.1)({"x": jnp.zeros(3)}, jax.random.key(0))
    flat = jnp.concatenate([g.ravel() for g in jax.tree.leaves(estimate.gradient)])
    assert bool(jnp.all(jnp.isfinite(flat))) and float(jnp.max(jnp.abs(flat))) > 0


# --- The objective --------------------------------------------------------------------------


def _plain_final(l3rs, pretrained, family, theta, key, eval_every=HORIZON):
    """The objective as it was before its options: the reference the default must equal."""
    task_key, head_key, data_key = jax.random.split(key, 3)
    train, val = family.sample(task_key)
    params = models.starting_params(SPEC, pretrained, 3, head_key)
    trajectory = unroll(
        theta, params, train, (val,), data_key, model_fn=models.model_fn(SPEC),
        make_optimizer=l3rs.opt_fn, num_steps=HORIZON, batch_size=8, eval_every=eval_every,
        eval_params=eval_params,
    )
    return trajectory


def test_default_objective_is_the_plain_final_loss_bit_for_bit(setup):
    l3rs, pretrained, family, theta = setup
    objective = jax.jit(FinalValidationLoss(l3rs, SPEC, pretrained, family, HORIZON, 8))
    for seed in range(2):
        key = jax.random.key(seed)
        loss = _plain_final(l3rs, pretrained, family, theta, key).eval_loss[0, -1]
        expected = jnp.clip(jnp.nan_to_num(jnp.log(loss), nan=3.0), max=3.0)  # the old clip
        assert np.asarray(objective(theta, key)) == np.asarray(expected)


def test_speed_objective_mixes_the_losses_along_the_run(setup):
    l3rs, pretrained, family, theta = setup
    key = jax.random.key(3)
    curve = _plain_final(l3rs, pretrained, family, theta, key, eval_every=HORIZON // 4).eval_loss[0]
    logs = np.log(np.asarray(curve))
    for weight in (0.5, 1.0):
        objective = FinalValidationLoss(
            l3rs, SPEC, pretrained, family, HORIZON, 8, speed_weight=weight, speed_points=4
        )
        expected = (1 - weight) * logs[-1] + weight * logs[1:].mean()  # step 0 left out
        np.testing.assert_allclose(float(objective(theta, key)), expected, rtol=1e-5)
    # Early progress counts: the mean over the run is above the final loss of a descending run.
    assert logs[1:].mean() > logs[-1]
    with pytest.raises(ValueError, match="divide the horizon"):
        FinalValidationLoss(l3rs, SPEC, pretrained, family, HORIZON, 8, speed_weight=0.5, speed_points=3)


# --- ES normalization -----------------------------------------------------------------------

G = {"x": jnp.array([3.0, -2.0, 1.0, -1.5])}


def _linear(theta, key):
    del key
    return jnp.sum(G["x"] * theta["x"])


def _task_scaled(theta, key):
    """The same objective with a per-task scale spanning ~10 orders of magnitude."""
    return jnp.exp(4.0 * jax.random.normal(jax.random.fold_in(key, 99))) * _linear(theta, key)


def _flat(tree):
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


@pytest.mark.parametrize("normalization", ["sign", "rank"])
def test_normalized_es_points_along_the_gradient_of_a_linear_objective(normalization):
    # Δ = 2σ εᵀg; E[sign(εᵀg) ε] = sqrt(2/π) g/|g|, so with many pairs every coordinate of the
    # estimate has the sign of g's, and its direction is g's.
    theta = {"x": jnp.zeros(4)}
    estimate = AntitheticES(
        _linear, num_pairs=2000, sigma=0.1, samples_per_program=500, normalization=normalization
    )(theta, jax.random.key(0)).gradient
    got, g = _flat(estimate), _flat(G)
    assert np.all(np.sign(got) == np.sign(g))
    assert got @ g / (np.linalg.norm(got) * np.linalg.norm(g)) > 0.97
    if normalization == "sign":  # |E| = sqrt(2/π) / (2σ), per unit of ε's direction
        np.testing.assert_allclose(np.linalg.norm(got), math.sqrt(2 / math.pi) / 0.2, rtol=0.08)


def test_sign_normalization_ignores_each_tasks_scale_and_none_does_not():
    theta = {"x": jnp.zeros(4)}
    key = jax.random.key(1)
    make = lambda f, n: AntitheticES(f, num_pairs=16, sigma=0.1, normalization=n)  # noqa: E731
    np.testing.assert_array_equal(
        _flat(make(_linear, "sign")(theta, key).gradient),
        _flat(make(_task_scaled, "sign")(theta, key).gradient),
    )
    raw = _flat(make(_linear, "none")(theta, key).gradient)
    scaled = _flat(make(_task_scaled, "none")(theta, key).gradient)
    assert not np.allclose(raw / np.linalg.norm(raw), scaled / np.linalg.norm(scaled), atol=0.05)


def test_rank_normalization_weights_signs_by_the_rank_of_each_magnitude():
    # Four samples whose gradients are ±unit vectors; the magnitudes 5, 0.1, 2, 40 rank 3, 1, 2, 4.
    results = [
        ({"x": jnp.array([1.0, 0.0])}, (jnp.float32(0.0), jnp.float32(5.0))),
        ({"x": jnp.array([0.0, 1.0])}, (jnp.float32(1.0), jnp.float32(0.1))),
        ({"x": jnp.array([-1.0, 0.0])}, (jnp.float32(2.0), jnp.float32(2.0))),
        ({"x": jnp.array([0.0, -1.0])}, (jnp.float32(3.0), jnp.float32(40.0))),
    ]
    estimate = _combine_ranked(results, batched=False)
    np.testing.assert_allclose(estimate.gradient["x"], [(3 - 2) / 4 / 4, (1 - 4) / 4 / 4], rtol=1e-6)
    np.testing.assert_allclose(estimate.metrics["objective"], 1.5)
    # The same as a rank estimator on a linear objective scaled 1000×: magnitudes' order only.
    theta, key = {"x": jnp.zeros(4)}, jax.random.key(2)
    rank = lambda f: AntitheticES(f, num_pairs=12, sigma=0.1, normalization="rank")(theta, key)  # noqa: E731
    np.testing.assert_array_equal(
        _flat(rank(_linear).gradient), _flat(rank(lambda t, k: 1000.0 * _linear(t, k)).gradient)
    )


@pytest.mark.parametrize("normalization", ["sign", "rank"])
def test_vectorized_normalized_es_gives_the_per_pair_estimate(normalization):
    theta = {"x": jnp.zeros(4)}
    def es(per_program):
        return AntitheticES(
            _task_scaled, num_pairs=7, sigma=0.1, samples_per_program=per_program, normalization=normalization
        )

    a, b = es(1)(theta, jax.random.key(4)), es(3)(theta, jax.random.key(4))
    np.testing.assert_allclose(_flat(a.gradient), _flat(b.gradient), rtol=1e-5, atol=1e-6)


def test_es_rejects_an_unknown_normalization():
    with pytest.raises(ValueError, match="normalization"):
        AntitheticES(_linear, num_pairs=2, sigma=0.1, normalization="zscore")


# --- Task augmentation ----------------------------------------------------------------------


def _split(seed):
    key_x, key_y = jax.random.split(jax.random.key(seed))
    labels = jax.random.randint(key_y, (64,), 0, 3)
    return Split(jax.random.uniform(key_x, (64, 8, 8, 1)) * 0.3 + labels[:, None, None, None] * 0.3, labels)


def _run(hparams, make_optimizer, params, measure=None):
    return unroll(
        hparams, params, _split(0), (_split(1),), jax.random.key(5), model_fn=models.model_fn(SPEC),
        make_optimizer=make_optimizer, num_steps=6, batch_size=16, eval_every=3, eval_params=measure,
    )


def _sgd(lr, num_steps):
    del num_steps
    return optax.sgd(lr)


def test_reparameterized_unroll_at_unit_scale_is_the_plain_one(setup):
    l3rs, pretrained, _, theta = setup
    ones = jax.tree.map(lambda _: jnp.float32(1.0), pretrained)
    plain = _run(theta, l3rs.opt_fn, pretrained, eval_params)
    wrapped = _run(
        (theta, ones), reparameterized_factory(l3rs.opt_fn), pretrained, reparameterized_eval(eval_params)
    )
    # Every product with s = 1 is exact; XLA fuses the wrapped step differently, ~1 ulp.
    pairs = zip(jax.tree.leaves((plain.params, plain.eval_loss)), jax.tree.leaves((wrapped.params, wrapped.eval_loss)))
    for a, b in pairs:
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    assert reparameterized_factory(l3rs.opt_fn) is reparameterized_factory(l3rs.opt_fn)  # one compilation


def test_reparameterization_is_a_change_of_variables():
    # SGD on p' = p/s: Δp = s·Δp' = -lr·s²·g, i.e. plain SGD at lr·s² (here s = 2 on every tensor).
    params = models.init_params(SPEC, jax.random.key(0))
    twos = jax.tree.map(lambda _: jnp.float32(2.0), params)
    wrapped = _run((jnp.float32(0.01), twos), reparameterized_factory(_sgd), params)
    plain = _run(jnp.float32(0.04), _sgd, params)
    for a, b in zip(jax.tree.leaves(wrapped.params), jax.tree.leaves(plain.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    unscaled = _run(jnp.float32(0.01), _sgd, params)
    assert not np.allclose(_flat(unscaled.params), _flat(plain.params), rtol=1e-3)
    # Evaluation maps the wrapped state's parameters back to the model's.
    state = reparameterize(optax.sgd(0.1), twos).init(params)
    back = reparameterized_eval(lambda s, p: p)(state, params)
    np.testing.assert_allclose(_flat(back), _flat(params), rtol=1e-6)


def test_augmentation_draws_are_per_key_within_range_and_off_by_default(setup):
    l3rs, pretrained, family, theta = setup
    assert not TaskAugmentation().active
    draws = np.asarray(log_uniform(jax.random.key(0), 2.0, (4000,)))
    assert draws.min() >= 0.5 and draws.max() <= 2.0
    assert abs(np.mean(np.log(draws))) < 0.03 and abs(np.mean(np.log(draws) > 0) - 0.5) < 0.03
    augmentation = TaskAugmentation(weight_scale=2.0, tensor_scale=1.5, head_init_scale=3.0)
    run = augmentation(jax.random.key(7), pretrained, theta, l3rs.opt_fn, eval_params)
    again = augmentation(jax.random.key(7), pretrained, theta, l3rs.opt_fn, eval_params)
    other = augmentation(jax.random.key(8), pretrained, theta, l3rs.opt_fn, eval_params)
    scales = _flat(run.hparams[1])
    np.testing.assert_array_equal(scales, _flat(again.hparams[1]))  # both members of a pair
    assert not np.array_equal(scales, _flat(other.hparams[1]))
    assert np.all((scales >= 1 / 3) & (scales <= 3)) and len(set(scales.tolist())) == len(scales)
    # The head's initialization is scaled, the pretrained body untouched.
    ratio = np.asarray(run.params["head"]["kernel"]) / np.asarray(pretrained["head"]["kernel"])
    assert np.allclose(ratio, ratio.flat[0]) and 1 / 3 <= ratio.flat[0] <= 3 and ratio.flat[0] != 1
    np.testing.assert_array_equal(run.params["Dense_0"]["kernel"], pretrained["Dense_0"]["kernel"])
    with pytest.raises(ValueError, match="range factor"):
        TaskAugmentation(weight_scale=0.5)


def test_augmented_objective_is_finite_and_differs_from_the_plain_one(setup):
    l3rs, pretrained, family, theta = setup
    plain = FinalValidationLoss(l3rs, SPEC, pretrained, family, HORIZON, 8)
    augmented = FinalValidationLoss(
        l3rs, SPEC, pretrained, family, HORIZON, 8,
        augmentation=TaskAugmentation(weight_scale=4.0, tensor_scale=2.0, head_init_scale=3.0),
    )
    a, b = float(plain(theta, jax.random.key(0))), float(augmented(theta, jax.random.key(0)))
    assert math.isfinite(b) and a != b


# --- Horizons and the config ----------------------------------------------------------------


def test_log_uniform_weights():
    np.testing.assert_allclose(log_uniform_weights([100, 200, 400, 800, 1600]), [0.2] * 5)
    # [100, 300]: 200's cell is (log 100 + log 200)/2 .. (log 200 + log 300)/2.
    logs = np.log([100, 200, 300])
    cells = np.array([logs[1] - logs[0], (logs[2] - logs[0]) / 2, logs[2] - logs[1]])
    np.testing.assert_allclose(log_uniform_weights([300, 100, 200]), cells / cells.sum())
    assert log_uniform_weights([200]) == (1.0,)


class _Constant:
    def __call__(self, theta, key):
        return Estimate(theta, {"objective": jnp.float32(0.0)})


def test_random_horizon_draws_with_the_weights_and_uniformly_as_before():
    horizons = [100, 200, 300]
    weights = log_uniform_weights(horizons)
    estimators = {h: _Constant() for h in horizons}
    weighted = RandomHorizon(estimators, weights=weights)
    counts = {h: 0 for h in horizons}
    draws = 1500
    for i in range(draws):
        counts[int(weighted({}, jax.random.key(i)).metrics["horizon"])] += 1
    for h, w in zip(horizons, weights):
        assert abs(counts[h] / draws - w) < 4 * math.sqrt(w * (1 - w) / draws), (counts, weights)
    # Without weights: the draw it always was, jax.random.randint over the sorted horizons.
    uniform = RandomHorizon(estimators)
    for i in range(20):
        choice_key, _ = jax.random.split(jax.random.key(i))
        expected = horizons[int(jax.random.randint(choice_key, (), 0, 3))]
        assert uniform({}, jax.random.key(i)).metrics["horizon"] == expected


def test_config_wires_the_options_into_the_estimator(setup):
    l3rs, pretrained, family, _ = setup
    cfg = get_config("tiny", {"meta_train": {
        "objective": "final+speed", "speed_weight": 0.25, "es_normalization": "rank",
        "horizons": [10, 20, 40], "horizon_sampling": "log_uniform", "batch_sizes": [8, 16],
        "weight_scale": 2.0, "tensor_scale": 1.5, "head_init_scale": 3.0, "speed_points": 2,
    }}).meta_train
    made = make_estimator(cfg, l3rs, SPEC, pretrained, family)
    np.testing.assert_allclose(made.weights, [1 / 3] * 3)
    es = made.estimators[20].estimators[16]
    assert es.normalization == "rank"
    objective = es.objective
    settings = (objective.horizon, objective.batch_size, objective.speed_weight, objective.speed_points)
    assert settings == (20, 16, 0.25, 2)
    assert objective.augmentation == TaskAugmentation(2.0, 1.5, 3.0)
    default = make_estimator(get_config("tiny").meta_train, l3rs, SPEC, pretrained, family)
    es = default.estimators[20]
    assert default.weights is None and es.normalization == "none"
    assert es.objective.speed_weight == 0.0 and not es.objective.augmentation.active


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"objective": "auc"}, "objective"),
        ({"es_normalization": "zscore"}, "es_normalization"),
        ({"horizon_sampling": "geometric"}, "horizon_sampling"),
        ({"objective": "final+speed", "speed_points": 3}, "divide every horizon"),
        ({"weight_scale": 0.5}, "range factor"),
        ({"batch_sizes": [0]}, "batch_sizes"),
        ({"estimator": "tbptt", "es_normalization": "sign"}, "ES estimator only"),
    ],
)
def test_config_rejects_bad_options(overrides, message):
    with pytest.raises(ValueError, match=message):
        get_config("tiny", {"meta_train": overrides})
