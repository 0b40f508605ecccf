"""The public contract: register → load_pretrained / fetch_optimizer on a temporary store."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lopt
from lopt.store import registry
from lopt.hub import promote_optimizer, register_optimizer
from conftest import store_with_base_model
from lopt.optim.l3rs import L3RS, L3RSConfig
from lopt.optim.layout import LayerLayout
from lopt.inner.models import ModelSpec, init_params, with_fresh_head

SPEC = ModelSpec(num_classes=4, input_shape=(8, 8, 1), conv_features=(4,), hidden_size=8)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    with store_with_base_model(home, "tiny-cnn", SPEC) as (uri, params):
        base = registry.resolve("models:/tiny-cnn@champion", uri)
        layout = LayerLayout.from_params(with_fresh_head(SPEC, params, 3, jax.random.key(0)))
        l3rs = L3RS(L3RSConfig(), layout)
        theta = l3rs.init(jax.random.key(1))
        for promote in (True, False):
            name, version = register_optimizer(
                base, l3rs, theta, horizon=30, run_id=registry.start_run("test", tracking_uri=uri),
                tags={"gate_passed": str(promote).lower()}, description="test optimizer",
                report={"gate": {"passed": promote}}, tracking_uri=uri,
            )
            if promote:
                assert promote_optimizer(name, version, None, tracking_uri=uri)["promoted"]
        yield {"uri": uri, "params": params, "theta": theta, "l3rs": l3rs}


def test_load_pretrained_keeps_weights_and_replaces_the_head_on_request(store):
    model_fn, params, info = lopt.load_pretrained("models:/tiny-cnn@champion", tracking_uri=store["uri"])
    assert info["input_shape"] == (8, 8, 1) and info["num_classes"] == 4
    assert info["uri"] == "models:/tiny-cnn/1"
    jax.tree.map(np.testing.assert_array_equal, params, store["params"])
    model_fn, params, info = lopt.load_pretrained(
        "models:/tiny-cnn@champion", num_classes=6, rng=3, tracking_uri=store["uri"]
    )
    assert model_fn(params, jnp.zeros((2, 8, 8, 1))).shape == (2, 6)
    np.testing.assert_array_equal(params["PatchConv_0"]["Dense_0"]["kernel"], store["params"]["PatchConv_0"]["Dense_0"]["kernel"])


def test_fetch_optimizer_is_a_working_optax_optimizer(store):
    model_fn, params, _ = lopt.load_pretrained("models:/tiny-cnn/1", num_classes=3, tracking_uri=store["uri"])
    opt = lopt.fetch_optimizer("models:/l3rs-tiny-cnn@champion", num_steps=50, tracking_uri=store["uri"])
    assert isinstance(opt, optax.GradientTransformationExtraArgs)
    images = jax.random.uniform(jax.random.key(0), (16, 8, 8, 1))
    labels = jnp.arange(16) % 3

    def loss_fn(p):
        return optax.softmax_cross_entropy_with_integer_labels(model_fn(p, images), labels).mean()

    state = opt.init(params)
    first = float(loss_fn(params))
    for _ in range(20):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = opt.update(grads, state, params, value=loss)
        params = optax.apply_updates(params, updates)
    assert float(loss_fn(params)) < first
    # The same θ as registered: identical updates to the in-memory optimizer.
    ref = store["l3rs"].opt_fn(store["theta"], 50)
    grads = jax.grad(loss_fn)(params)
    a = opt.update(grads, opt.init(params), params, value=1.0)[0]
    b = ref.update(grads, ref.init(params), params, value=1.0)[0]
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_registered_versions_carry_aliases_tags_and_only_plain_files(store):
    champion = registry.resolve("models:/l3rs-tiny-cnn@champion", store["uri"])
    challenger = registry.resolve("models:/l3rs-tiny-cnn@challenger", store["uri"])
    assert (champion.version, challenger.version) == (1, 2)
    assert challenger.tags["base_model"] == "tiny-cnn" and challenger.tags["base_model_version"] == "1"
    files = sorted(p.name for p in registry.download("models:/l3rs-tiny-cnn/2", store["uri"]).iterdir())
    assert files == ["meta_params.msgpack", "optimizer.json", "validation_report.json"]


def test_fetch_default_horizon_is_the_meta_training_horizon(store):
    uri = "models:/l3rs-tiny-cnn@champion"
    _, _, header = lopt.load_optimizer(uri, tracking_uri=store["uri"])
    assert header["horizon"] == 30 and header["base_model"] == "tiny-cnn"
    _, params, _ = lopt.load_pretrained("models:/tiny-cnn/1", num_classes=3, tracking_uri=store["uri"])
    grads = jax.tree.map(jnp.ones_like, params)

    def first_update(opt):
        return opt.update(grads, opt.init(params), params, value=1.0)[0]

    def same(a, b) -> bool:
        return all(bool(jnp.array_equal(x, y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

    # The horizon shapes even the first step (time features, step-size prior), so the first
    # update tells horizons apart: the default's is T = 30's and not its neighbours'.
    by_horizon = {t: first_update(store["l3rs"].opt_fn(store["theta"], t)) for t in (29, 30, 31, 120)}
    default = first_update(lopt.fetch_optimizer(uri, tracking_uri=store["uri"]))
    assert [t for t, update in by_horizon.items() if same(default, update)] == [30]
    # Another num_steps gives another horizon's optimizer.
    longer = first_update(lopt.fetch_optimizer(uri, num_steps=120, tracking_uri=store["uri"]))
    assert [t for t, update in by_horizon.items() if same(longer, update)] == [120]


@pytest.mark.parametrize("num_steps", [0, 2.7, True, "400", -1])
def test_fetch_rejects_a_horizon_that_is_not_a_positive_int(store, num_steps):
    with pytest.raises(ValueError, match="positive int"):
        lopt.fetch_optimizer("models:/l3rs-tiny-cnn@champion", num_steps=num_steps, tracking_uri=store["uri"])


def test_fetched_optimizer_on_another_architecture_names_the_layers(store):
    opt = lopt.fetch_optimizer("models:/l3rs-tiny-cnn@champion", num_steps=10, tracking_uri=store["uri"])
    other = init_params(ModelSpec(num_classes=3, input_shape=(8, 8, 1), conv_features=(4,), hidden_size=12), jax.random.key(0))
    with pytest.raises(lopt.LayoutMismatchError, match=r"Dense_0/kernel: expected shape \[64, 8\], got \[64, 12\]"):
        opt.init(other)


@pytest.mark.parametrize(
    "uri, message",
    [
        ("models:/no-such-model@champion", "no-such-model"),
        ("models:/l3rs-tiny-cnn@production", "production"),
        ("models:/l3rs-tiny-cnn/99", "99"),
        ("runs:/abc/model", "models:/"),
    ],
)
def test_unknown_uris_give_clear_errors(store, uri, message):
    with pytest.raises((registry.RegistryError, ValueError), match=message):
        lopt.fetch_optimizer(uri, tracking_uri=store["uri"])
    with pytest.raises((registry.RegistryError, ValueError), match=message):
        lopt.load_pretrained(uri, tracking_uri=store["uri"])
