"""On-disk formats of models and optimizers: JSON for structure, msgpack for arrays.

Nothing here pickles: a registered artifact is data a consumer in any language can read
(msgpack of nested maps of arrays, as ``flax.serialization`` writes them, plus JSON).

A base model directory::

    model.json        {"format": "lopt.model", "format_version": 1, "spec": ModelSpec}
    params.msgpack    the Flax params pytree

An optimizer directory::

    optimizer.json        {"format": "lopt.l3rs", "format_version": 1, "config": L3RSConfig,
                           "layout": LayerLayout, "horizon": T used in meta-training, ...}
    meta_params.msgpack   θ
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
from flax import serialization

from lopt.l3rs import L3RS, L3RSConfig, LayerLayout, MetaParams
from lopt.models import ModelSpec, Params

MODEL_FORMAT = "lopt.model"
OPTIMIZER_FORMAT = "lopt.l3rs"
FORMAT_VERSION = 1


class FormatError(ValueError):
    """A directory does not hold a model or optimizer this version of lopt can read."""


def save_pytree(path: Path, tree: Any) -> None:
    state = jax.tree.map(np.asarray, serialization.to_state_dict(tree))
    path.write_bytes(serialization.msgpack_serialize(state))


def load_pytree(path: Path) -> Any:
    return serialization.msgpack_restore(path.read_bytes())


def _read_header(path: Path, expected_format: str) -> dict[str, Any]:
    if not path.is_file():
        raise FormatError(f"{path} is missing: not a {expected_format} directory.")
    header = json.loads(path.read_text())
    if header.get("format") != expected_format:
        raise FormatError(f"{path} holds {header.get('format')!r}, expected {expected_format!r}.")
    if header.get("format_version") != FORMAT_VERSION:
        raise FormatError(
            f"{path} has format version {header.get('format_version')}; this lopt reads "
            f"version {FORMAT_VERSION}. Upgrade lopt or re-register the artifact."
        )
    return header


def save_model(directory: Path, spec: ModelSpec, params: Params, extra: Mapping[str, Any] = {}) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    header = {"format": MODEL_FORMAT, "format_version": FORMAT_VERSION, "spec": spec.to_json(), **extra}
    (directory / "model.json").write_text(json.dumps(header, indent=2, sort_keys=True))
    save_pytree(directory / "params.msgpack", params)
    return directory


def load_model(directory: Path) -> tuple[ModelSpec, Params, dict[str, Any]]:
    header = _read_header(directory / "model.json", MODEL_FORMAT)
    params = load_pytree(directory / "params.msgpack")
    return ModelSpec.from_json(header["spec"]), params, header


def save_optimizer(
    directory: Path,
    l3rs: L3RS,
    theta: MetaParams,
    horizon: int,
    extra: Mapping[str, Any] = {},
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    header = {
        "format": OPTIMIZER_FORMAT,
        "format_version": FORMAT_VERSION,
        "config": l3rs.config.to_json(),
        "layout": l3rs.layout.to_json(),
        "horizon": horizon,
        **extra,
    }
    check_theta_values(theta, f"θ to save in {directory}")
    (directory / "optimizer.json").write_text(json.dumps(header, indent=2, sort_keys=True))
    save_pytree(directory / "meta_params.msgpack", theta)
    return directory


def check_theta_values(theta: MetaParams, what: str) -> None:
    """Raises :class:`FormatError` unless every array of θ is float32 and finite: a θ cast to
    another dtype or poisoned by a diverged meta-step would give silently wrong updates."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(theta):
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        array = np.asarray(leaf)
        if array.dtype != np.float32:
            raise FormatError(f"{what}: {name} is {array.dtype}, expected float32.")
        if not np.all(np.isfinite(array)):
            raise FormatError(f"{what}: {name} holds NaN or inf values.")


def load_optimizer(directory: Path) -> tuple[L3RS, MetaParams, dict[str, Any]]:
    header = _read_header(directory / "optimizer.json", OPTIMIZER_FORMAT)
    l3rs = L3RS(L3RSConfig.from_json(header["config"]), LayerLayout.from_json(header["layout"]))
    theta = load_pytree(directory / "meta_params.msgpack")
    l3rs.check_meta_params(theta)
    check_theta_values(theta, f"{directory / 'meta_params.msgpack'}")
    return l3rs, theta, header
