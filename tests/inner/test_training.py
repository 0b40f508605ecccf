"""Models, unrolls and the ES estimator on small synthetic problems."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lopt.inner import models
from lopt.optim.baselines import adam
from lopt.meta.es import AntitheticES
from lopt.meta.loop import meta_train
from lopt.inner.training import Split, default_eval_every, unroll

SPEC = models.ModelSpec(num_classes=3, input_shape=(8, 8, 1), conv_features=(4, 8), hidden_size=16)


@pytest.mark.parametrize("size", [7, 8, 14])
def test_patch_conv_equals_a_strided_same_convolution(size):
    x = jax.random.normal(jax.random.key(0), (2, size, size, 3))
    module = models.PatchConv(features=5)
    params = module.init(jax.random.key(1), x)
    kernel = params["params"]["Dense_0"]["kernel"].reshape(3, 3, 3, 5)  # (kh, kw, C_in, C_out)
    expected = jax.lax.conv_general_dilated(
        x, kernel, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    ) + params["params"]["Dense_0"]["bias"]
    np.testing.assert_allclose(module.apply(params, x), expected, rtol=1e-5, atol=1e-5)


def test_fresh_head_replaces_only_the_head():
    params = models.init_params(SPEC, jax.random.key(0))
    fresh = models.with_fresh_head(SPEC, params, 7, jax.random.key(1))
    assert fresh["head"]["kernel"].shape == (16, 7)
    for name in params:
        if name != "head":
            jax.tree.map(np.testing.assert_array_equal, params[name], fresh[name])
    other = models.with_fresh_head(SPEC, params, 7, jax.random.key(2))
    assert not np.allclose(fresh["head"]["kernel"], other["head"]["kernel"])
    logits = models.model_fn(SPEC.with_num_classes(7))(fresh, jnp.zeros((4, 8, 8, 1)))
    assert logits.shape == (4, 7)


def test_starting_params_from_the_checkpoint_or_from_scratch():
    pretrained = models.init_params(SPEC, jax.random.key(0))
    kept = models.starting_params(SPEC, pretrained, 5, jax.random.key(1), "pretrained")
    np.testing.assert_array_equal(kept["Dense_0"]["kernel"], pretrained["Dense_0"]["kernel"])
    scratch = models.starting_params(SPEC, pretrained, 5, jax.random.key(1), "scratch")
    assert not np.allclose(scratch["Dense_0"]["kernel"], pretrained["Dense_0"]["kernel"])
    # Same architecture and head either way, so one L3RS layout serves both.
    assert jax.tree.map(jnp.shape, scratch) == jax.tree.map(jnp.shape, kept)
    np.testing.assert_array_equal(scratch["head"]["kernel"], kept["head"]["kernel"])
    with pytest.raises(ValueError, match="Unknown start 'finetuned'"):
        models.starting_params(SPEC, pretrained, 5, jax.random.key(1), "finetuned")


def test_model_spec_json_round_trip_and_errors():
    assert models.ModelSpec.from_json(SPEC.to_json()) == SPEC
    with pytest.raises(ValueError, match="Unknown architecture"):
        models.ModelSpec(num_classes=3, architecture="vit")


def _toy_split(n=256, seed=0):
    key_x, key_y = jax.random.split(jax.random.key(seed))
    labels = jax.random.randint(key_y, (n,), 0, 3)
    # Class-dependent brightness: learnable in a few dozen steps.
    images = jax.random.uniform(key_x, (n, 8, 8, 1)) * 0.3 + labels[:, None, None, None] * 0.3
    return Split(images, labels)


def test_unroll_trains_and_is_a_pure_function_of_its_key():
    train, val = _toy_split(), _toy_split(seed=1)
    params = models.init_params(SPEC, jax.random.key(0))
    kwargs = dict(
        model_fn=models.model_fn(SPEC), make_optimizer=adam, num_steps=60, batch_size=32,
        eval_every=default_eval_every(60),
    )
    a = unroll(jnp.float32(3e-3), params, train, (val,), jax.random.key(0), **kwargs)
    b = unroll(jnp.float32(3e-3), params, train, (val,), jax.random.key(0), **kwargs)
    assert a.eval_loss.shape == (1, 11) and a.train_loss.shape == (60,)
    assert list(np.asarray(a.eval_steps)) == list(range(0, 61, 6))
    assert float(a.eval_loss[0, -1]) < 0.5 * float(a.eval_loss[0, 0])
    np.testing.assert_array_equal(a.eval_loss, b.eval_loss)


def test_unroll_rejects_a_horizon_that_is_not_a_multiple_of_eval_every():
    with pytest.raises(ValueError, match="multiple of eval_every"):
        unroll(
            jnp.float32(1e-3), models.init_params(SPEC, jax.random.key(0)), _toy_split(), (), jax.random.key(0),
            model_fn=models.model_fn(SPEC), make_optimizer=adam, num_steps=10, batch_size=4,
            eval_every=3,
        )


def _quadratic(theta, key):
    del key
    return jnp.sum(jnp.square(theta["x"] - 1.0)) + jnp.sum(jnp.square(theta["y"]))


def test_antithetic_es_estimates_the_gradient():
    theta = {"x": jnp.zeros(4), "y": jnp.ones((2, 3))}
    # On a quadratic the antithetic difference is exactly 2σ ε·∇f, so the estimate is
    # mean(ε εᵀ)∇f: a few hundred pairs in 10 dimensions give a cosine near 0.98.
    estimator = AntitheticES(_quadratic, num_pairs=300, sigma=0.01)
    estimate = estimator(theta, jax.random.key(0))
    true = jax.grad(_quadratic)(theta, None)
    flat = lambda t: jnp.concatenate([t["x"].ravel(), t["y"].ravel()])
    cosine = jnp.dot(flat(estimate.gradient), flat(true)) / (
        jnp.linalg.norm(flat(estimate.gradient)) * jnp.linalg.norm(flat(true))
    )
    assert float(cosine) > 0.9
    assert set(estimate.metrics) == {"objective", "objective_std", "gradient_norm"}


@pytest.mark.parametrize("per_program", [2, 3, 8])
def test_vectorized_es_gives_the_per_pair_estimate(per_program):
    # The same pairs (keys, noise, tasks) vmap-ed into programs of `per_program` pairs, the
    # last one short when it does not divide: the same estimate and metrics as one per program.
    theta = {"x": jnp.zeros(4), "y": jnp.ones((2, 3))}
    one = AntitheticES(_quadratic, num_pairs=8, sigma=0.05, samples_per_program=1)
    vectorized = AntitheticES(_quadratic, num_pairs=8, sigma=0.05, samples_per_program=per_program)
    assert (one.samples_per_program, vectorized.samples_per_program) == (1, per_program)
    expected, got = one(theta, jax.random.key(3)), vectorized(theta, jax.random.key(3))
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


# A string condition: evaluated when the test runs, so collecting the module does not start
# JAX's backend.
@pytest.mark.skipif("jax.default_backend() != 'cpu'", reason="the CPU default; accelerators vmap")
def test_samples_per_program_is_one_on_cpu_unless_asked():
    from lopt.meta.estimator import samples_per_program

    assert samples_per_program(None, 64) == 1
    assert samples_per_program(16, 64) == 16
    assert samples_per_program(128, 64) == 64
    with pytest.raises(ValueError, match="samples_per_program"):
        samples_per_program(0, 64)


def test_meta_train_descends_and_reports_every_step():
    theta = {"x": jnp.zeros(4), "y": jnp.ones((2, 3))}
    seen = []
    result = meta_train(
        AntitheticES(_quadratic, num_pairs=8, sigma=0.05), theta, num_steps=40, learning_rate=0.1,
        key=jax.random.key(0), on_step=lambda step, metrics: seen.append(step), progress=False,
    )
    assert seen == list(range(40))
    assert float(_quadratic(result.theta, None)) < 0.2 * float(_quadratic(theta, None))
    assert result.history[-1]["objective"] < result.history[0]["objective"]


def test_es_rejects_bad_settings():
    with pytest.raises(ValueError, match="num_pairs"):
        AntitheticES(_quadratic, num_pairs=0, sigma=0.1)


def test_backprop_estimator_differentiates_whole_unrolls_at_every_horizon():
    from lopt.config import get_config
    from lopt.optim.l3rs import L3RS, L3RSConfig
    from lopt.optim.layout import LayerLayout
    from lopt.meta.loop import make_estimator
    from lopt.meta.tbptt import TruncatedBackprop

    pretrained = models.init_params(SPEC, jax.random.key(0))
    l3rs = L3RS(L3RSConfig(), LayerLayout.from_params(pretrained))
    for estimator, expected in (("backprop", {10: 10, 40: 40}), ("tbptt", {10: 10, 40: 20})):
        cfg = get_config("tiny", {"meta_train": {"estimator": estimator, "horizons": [10, 40], "truncation": 20}}).meta_train
        made = make_estimator(cfg, l3rs, SPEC, pretrained, family=None)
        assert all(isinstance(e, TruncatedBackprop) for e in made.estimators.values())
        assert {h: e.truncation for h, e in made.estimators.items()} == expected


def test_truncated_backprop_gives_a_finite_gradient_that_descends():
    import numpy as onp

    from lopt.optim.l3rs import L3RS, L3RSConfig
    from lopt.optim.layout import LayerLayout
    from lopt.inner.tasks import TaskFamily, TaskFamilySpec
    from lopt.meta.tbptt import TruncatedBackprop

    rng = onp.random.default_rng(0)
    labels = onp.arange(3)[:, None, None, None, None]
    images = rng.uniform(size=(3, 24, 8, 8, 1)) * 0.3 + labels * 0.3
    family = TaskFamily(
        TaskFamilySpec("synthetic", classes_per_task=3, contrast=(1.0, 1.0), brightness=0.0, max_shift=0),
        train=jnp.asarray(images, jnp.float32), val=jnp.asarray(images[:, :8], jnp.float32),
        content_hash="synthetic",
    )
    pretrained = models.init_params(SPEC, jax.random.key(0))
    l3rs = L3RS(L3RSConfig(), LayerLayout.from_params(pretrained))
    estimator = TruncatedBackprop(l3rs, SPEC, pretrained, family, horizon=20, batch_size=8, truncation=5, num_tasks=2)
    theta = l3rs.init(jax.random.key(1))
    estimate = estimator(theta, jax.random.key(2))
    flat = jnp.concatenate([g.ravel() for g in jax.tree.leaves(estimate.gradient)])
    assert bool(jnp.all(jnp.isfinite(flat))) and float(jnp.linalg.norm(flat)) > 0
    # A small step against the estimate lowers the same windows' loss.
    stepped = jax.tree.map(lambda t, g: t - 1e-2 * g / jnp.linalg.norm(flat), theta, estimate.gradient)
    assert float(estimator(stepped, jax.random.key(2)).metrics["objective"]) < float(estimate.metrics["objective"])
