"""The on-disk optimizer format: round trips, its versions, and the files it refuses."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lopt.inner import models
from lopt.store import serialization
from lopt.optim.l3rs import L3RS, L3RSConfig
from lopt.optim.layout import LayerLayout

SPEC = models.ModelSpec(num_classes=3, input_shape=(8, 8, 1), conv_features=(4,), hidden_size=8)

# Written by lopt at format version 1 (commit a45a8a4): the default L3RSConfig for SPEC's layers,
# θ drawn with key 5, horizon 50, an extra field "x": 1.
VERSION_1 = Path(__file__).parents[1] / "data" / "optimizer_v1"

CONFIGS = {
    "default": L3RSConfig(),
    "three_directions": L3RSConfig(directions=("adam", "momentum", "gradient")),
    "one_decay": L3RSConfig(ema_decays=(0.5,), embedding_dim=2, hidden_size=4),
    "schedule_free": L3RSConfig(
        averaging="schedule_free", schedule="warmup_constant", init_direction="rmsprop"
    ),
}


def _params():
    return models.init_params(SPEC, jax.random.key(0))


def _first_update(l3rs, theta, horizon=50):
    params = _params()
    grads = jax.tree.map(lambda p: jnp.sin(3.0 * p), params)
    optimizer = l3rs.opt_fn(theta, horizon)
    return optimizer.update(grads, optimizer.init(params), params, value=jnp.float32(1.0))[0]


def _header(directory: Path) -> dict:
    return json.loads((directory / "optimizer.json").read_text())


def _rewrite(directory: Path, header: dict) -> None:
    (directory / "optimizer.json").write_text(json.dumps(header))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_serialization_round_trip_gives_identical_updates(tmp_path, name):
    config = CONFIGS[name]
    l3rs = L3RS(config, LayerLayout.from_params(_params()))
    theta = l3rs.init(jax.random.key(5))
    directory = serialization.write_optimizer(tmp_path / "opt", l3rs, theta, horizon=50, extra={"note": "x"})
    header = _header(directory)
    assert header["format"] == "lopt.l3rs" and header["horizon"] == 50 and header["note"] == "x"
    loaded, theta2, _ = serialization.read_optimizer(directory)
    assert loaded == l3rs
    jax.tree.map(np.testing.assert_array_equal, _first_update(l3rs, theta), _first_update(loaded, theta2))


def test_new_saves_are_the_current_version_and_list_every_config_field(tmp_path):
    l3rs = L3RS(L3RSConfig(), LayerLayout.from_params(_params()))
    directory = serialization.write_optimizer(tmp_path, l3rs, l3rs.init(jax.random.key(0)), horizon=10)
    header = _header(directory)
    assert header["format_version"] == serialization.OPTIMIZER_FORMAT_VERSION == 2
    assert set(header["config"]) == {f.name for f in dataclasses.fields(L3RSConfig)}
    model = serialization.write_model(tmp_path / "model", SPEC, _params())
    assert json.loads((model / "model.json").read_text())["format_version"] == 1  # unchanged


def test_a_version_1_optimizer_loads_and_runs_as_it_was_saved():
    l3rs, theta, header = serialization.read_optimizer(VERSION_1)
    saved = L3RS(L3RSConfig(), LayerLayout.from_params(_params()))
    assert l3rs == saved and header["horizon"] == 50 and header["x"] == 1
    assert header["format_version"] == 2  # upgraded: the rest of lopt sees the current version
    jax.tree.map(np.testing.assert_array_equal, theta, saved.init(jax.random.key(5)))
    jax.tree.map(np.testing.assert_array_equal, _first_update(l3rs, theta), _first_update(saved, theta))


def test_a_version_1_optimizer_saved_before_later_fields_keeps_its_behaviour(tmp_path):
    """Fields added after version 1 began mean, when absent, the behaviour from before they
    existed: no priors, a controller refreshed every step, no averaging, unit-RMS directions."""
    directory = Path(shutil.copytree(VERSION_1, tmp_path / "old"))
    header = _header(directory)
    for field in ("schedule", "reference_horizon", "horizon_exponent", "control_interval",
                  "averaging", "interpolation", "warmup_fraction", "normalization"):
        del header["config"][field]
    _rewrite(directory, header)
    l3rs, _, _ = serialization.read_optimizer(directory)
    c = l3rs.config
    assert (c.schedule, c.horizon_exponent, c.control_interval) == ("constant", 0.0, 1)
    assert (c.averaging, c.normalization) == ("none", "unit_rms")
    assert dataclasses.replace(
        c, schedule="cosine", horizon_exponent=1.0, control_interval=16
    ) == L3RSConfig()  # the fields it had are read as written


def test_a_version_2_optimizer_missing_a_config_field_is_an_error(tmp_path):
    l3rs = L3RS(L3RSConfig(), LayerLayout.from_params(_params()))
    directory = serialization.write_optimizer(tmp_path, l3rs, l3rs.init(jax.random.key(0)), horizon=10)
    header = _header(directory)
    del header["config"]["schedule"]
    _rewrite(directory, header)
    with pytest.raises(serialization.FormatError, match=r"Missing L3RS config fields \['schedule'\]"):
        serialization.read_optimizer(directory)


@pytest.mark.parametrize("version", [0, 3, "2", None])
def test_a_version_this_lopt_does_not_read_is_an_error_naming_those_it_reads(tmp_path, version):
    directory = Path(shutil.copytree(VERSION_1, tmp_path / "opt"))
    _rewrite(directory, {**_header(directory), "format_version": version})
    expected = f"format version {re.escape(repr(version))}; this lopt reads versions 1, 2"
    with pytest.raises(serialization.FormatError, match=expected):
        serialization.read_optimizer(directory)


def test_loading_theta_of_another_shape_is_an_error(tmp_path):
    l3rs = L3RS(L3RSConfig(), LayerLayout.from_params(_params()))
    serialization.write_optimizer(tmp_path, l3rs, l3rs.init(jax.random.key(0)), horizon=10)
    header = _header(tmp_path)
    header["config"]["hidden_size"] = 7
    _rewrite(tmp_path, header)
    with pytest.raises(ValueError, match="do not match"):
        serialization.read_optimizer(tmp_path)


def test_a_non_finite_theta_is_never_saved_and_a_recast_one_never_loaded(tmp_path):
    l3rs = L3RS(L3RSConfig(), LayerLayout.from_params(_params()))
    theta = l3rs.init(jax.random.key(0))
    poisoned = jax.tree.map(lambda x: x, theta)
    poisoned["mlp"]["b1"] = poisoned["mlp"]["b1"].at[0].set(jnp.nan)
    with pytest.raises(serialization.FormatError, match="mlp/b1 holds NaN"):
        serialization.write_optimizer(tmp_path / "nan", l3rs, poisoned, horizon=10)
    assert not (tmp_path / "nan" / "meta_params.msgpack").exists()
    directory = serialization.write_optimizer(tmp_path / "ok", l3rs, theta, horizon=10)
    half = jax.tree.map(lambda x: np.asarray(x, np.float16), theta)
    serialization.save_pytree(directory / "meta_params.msgpack", half)
    with pytest.raises(serialization.FormatError, match="float16, expected float32"):
        serialization.read_optimizer(directory)
