"""On-disk formats of models and optimizers: JSON for structure, msgpack for arrays.

Nothing here pickles: a registered artifact is data a consumer in any language can read
(msgpack of nested maps of arrays, as ``flax.serialization`` writes them, plus JSON).

A base model directory::

    model.json        {"format": "lopt.model", "format_version": 1, "spec": ModelSpec}
    params.msgpack    the Flax params pytree

An optimizer directory::

    optimizer.json        {"format": "lopt.l3rs", "format_version": 2, "config": L3RSConfig,
                           "layout": LayerLayout, "horizon": T used in meta-training, ...}
    meta_params.msgpack   θ

The optimizer format's versions, each read explicitly (an older header is upgraded one version
at a time, :data:`_OPTIMIZER_UPGRADES`, so the rest of lopt sees only the current one):

1. ``config`` holds the L3RSConfig fields that existed when it was written: a field added
   later is absent, and means the behaviour from before it existed (:data:`_V1_ADDED_FIELDS`).
2. ``config`` holds every field of L3RSConfig. Adding a field is a new version, with an
   upgrade that says what its absence meant.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

import jax
import numpy as np
from flax import serialization

from lopt.optim.l3rs import L3RS, L3RSConfig, MetaParams
from lopt.optim.layout import LayerLayout
from lopt.inner.models import ModelSpec, Params, init_params

MODEL_FORMAT = "lopt.model"
OPTIMIZER_FORMAT = "lopt.l3rs"
MODEL_FORMAT_VERSION = 1
OPTIMIZER_FORMAT_VERSION = 2

# The L3RSConfig fields added after format version 1 was introduced, with the values that keep
# the behaviour of an optimizer saved before each existed: no step-size priors, a controller
# refreshed every step, no averaging, unit-RMS directions. The others are inert under these.
_V1_ADDED_FIELDS: dict[str, Any] = {
    "schedule": "constant",
    "reference_horizon": 200,
    "horizon_exponent": 0.0,
    "control_interval": 1,
    "averaging": "none",
    "interpolation": 0.9,
    "warmup_fraction": 0.05,
    "normalization": "unit_rms",
}

T = TypeVar("T")


class FormatError(ValueError):
    """A file of a model or optimizer directory that this version of lopt cannot use.

    ``path`` is the offending file (or a description such as "θ to save in …") and ``problem``
    what is wrong with it; the message is ``"<path>: <problem>"``. :mod:`lopt.hub` re-raises it
    naming the registered version instead of the temporary directory it was downloaded to.
    """

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}")


def save_pytree(path: Path, tree: Any) -> None:
    state = jax.tree.map(np.asarray, serialization.to_state_dict(tree))
    path.write_bytes(serialization.msgpack_serialize(state))


def load_pytree(path: Path) -> Any:
    """The nested dict of arrays in msgpack file ``path``; :class:`FormatError` when the file is
    missing, truncated or not such a dict (msgpack's own errors say nothing about the file)."""
    if not path.is_file():
        raise FormatError(path, "is missing.")
    try:
        tree = serialization.msgpack_restore(path.read_bytes())
    except Exception as e:  # msgpack raises ValueError, TypeError or its own errors on bad bytes
        raise FormatError(
            path, f"is not a readable msgpack file, truncated or corrupted ({type(e).__name__}: {e})."
        ) from None
    if not isinstance(tree, dict):
        raise FormatError(path, f"holds a {type(tree).__name__}, expected a map of arrays.")
    return tree


def _read_header(path: Path, expected_format: str, versions: tuple[int, ...]) -> dict[str, Any]:
    """The JSON header at ``path``, checked to be ``expected_format`` at one of ``versions``."""
    if not path.is_file():
        raise FormatError(path, f"is missing: not a {expected_format} directory.")
    try:
        header = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(path, f"is not valid JSON ({e}).") from None
    if not isinstance(header, dict):
        raise FormatError(path, f"holds a JSON {type(header).__name__}, expected an object.")
    if header.get("format") != expected_format:
        raise FormatError(path, f"holds {header.get('format')!r}, expected {expected_format!r}.")
    version = header.get("format_version")
    if version not in versions:
        raise FormatError(
            path,
            f"has format version {version!r}; this lopt reads "
            f"{'version' if len(versions) == 1 else 'versions'} {', '.join(map(str, versions))}. "
            "Upgrade lopt or re-register the artifact.",
        )
    return header


def _config_v1_to_v2(header: dict[str, Any]) -> dict[str, Any]:
    """A version-1 optimizer header as version 2: every config field present, those that
    did not exist yet at the values that keep the saved optimizer's behaviour."""
    config = header.get("config")
    if isinstance(config, dict):  # anything else is reported by the config's parser
        header = {**header, "config": {**_V1_ADDED_FIELDS, **config}}
    return {**header, "format_version": 2}


# Version n's header to version n + 1's.
_OPTIMIZER_UPGRADES: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {1: _config_v1_to_v2}


def _upgraded(header: dict[str, Any]) -> dict[str, Any]:
    """``header`` (of any version :func:`_read_header` accepted) as the current version."""
    while header["format_version"] < OPTIMIZER_FORMAT_VERSION:
        header = _OPTIMIZER_UPGRADES[header["format_version"]](header)
    return header


def _parse_field(path: Path, header: Mapping[str, Any], key: str, parse: Callable[[Any], T]) -> T:
    """``parse(header[key])``, any failure (absent, wrong type, bad value) a :class:`FormatError`
    naming the field: a ``KeyError: 'config'`` alone tells a user nothing."""
    if key not in header:
        raise FormatError(path, f"has no {key!r} field.")
    try:
        return parse(header[key])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        detail = f"missing {e}" if isinstance(e, KeyError) else str(e)
        raise FormatError(path, f"field {key!r} is invalid ({type(e).__name__}: {detail}).") from None


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"expected a positive int, got {value!r}")
    return value


def check_arrays(tree: Any, expected: Any, what: str | Path, dtype: Any = np.float32) -> None:
    """Raises :class:`FormatError` unless ``tree`` holds exactly the arrays of ``expected`` (a
    pytree of anything with ``.shape``, e.g. from :func:`jax.eval_shape`), each of ``dtype``
    and finite. The message names the first array that differs, by its path in the tree."""
    want = _shapes_by_name(expected)
    have = {name: np.asarray(leaf) for name, leaf in _leaves_by_name(tree).items()}
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    if missing or unexpected:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + (
            [f"unexpected {', '.join(unexpected)}"] if unexpected else []
        )
        raise FormatError(
            what, f"arrays do not match the config and layout: {'; '.join(parts)}."
        )
    for name, shape in want.items():
        if have[name].shape != shape:
            raise FormatError(
                what,
                f"{name} has shape {list(have[name].shape)}, expected {list(shape)}: the arrays "
                f"do not match the config and layout (saved with another config?).",
            )
    _check_values(have, what, dtype)


def check_theta_values(theta: MetaParams, what: str | Path) -> None:
    """Raises :class:`FormatError` unless every array of θ is float32 and finite: a θ cast to
    another dtype or poisoned by a diverged meta-step would give silently wrong updates."""
    _check_values({n: np.asarray(leaf) for n, leaf in _leaves_by_name(theta).items()}, what, np.float32)


def _check_values(arrays: Mapping[str, np.ndarray], what: str | Path, dtype: Any) -> None:
    for name, array in arrays.items():
        if array.dtype != dtype:
            raise FormatError(what, f"{name} is {array.dtype}, expected {np.dtype(dtype)}.")
        if not np.all(np.isfinite(array)):
            raise FormatError(what, f"{name} holds NaN or inf values.")


def _leaves_by_name(tree: Any) -> dict[str, Any]:
    return {
        jax.tree_util.keystr(path, simple=True, separator="/"): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def _shapes_by_name(tree: Any) -> dict[str, tuple[int, ...]]:
    return {name: tuple(leaf.shape) for name, leaf in _leaves_by_name(tree).items()}


def write_model(directory: Path, spec: ModelSpec, params: Params, extra: Mapping[str, Any] = {}) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    header = {"format": MODEL_FORMAT, "format_version": MODEL_FORMAT_VERSION, "spec": spec.to_json(), **extra}
    (directory / "model.json").write_text(json.dumps(header, indent=2, sort_keys=True))
    save_pytree(directory / "params.msgpack", params)
    return directory


def read_model(directory: Path) -> tuple[ModelSpec, Params, dict[str, Any]]:
    """Spec, params and header of a model directory. Every failure is a :class:`FormatError`
    naming the file: a missing or malformed ``spec``, params that are missing, truncated, not
    float32, not finite or not the shapes the spec's network has."""
    path = directory / "model.json"
    header = _read_header(path, MODEL_FORMAT, (MODEL_FORMAT_VERSION,))
    spec = _parse_field(path, header, "spec", ModelSpec.from_json)
    params_path = directory / "params.msgpack"
    params = load_pytree(params_path)
    try:
        expected = jax.eval_shape(functools.partial(init_params, spec), jax.random.key(0))
    except Exception as e:  # a spec whose network cannot be built (e.g. a zero-sized layer)
        raise FormatError(path, f"field 'spec' describes no buildable network ({type(e).__name__}: {e}).") from None
    check_arrays(params, expected, params_path)
    return spec, params, header


def write_optimizer(
    directory: Path,
    l3rs: L3RS,
    theta: MetaParams,
    horizon: int,
    extra: Mapping[str, Any] = {},
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    header = {
        "format": OPTIMIZER_FORMAT,
        "format_version": OPTIMIZER_FORMAT_VERSION,
        "config": l3rs.config.to_json(),
        "layout": l3rs.layout.to_json(),
        "horizon": horizon,
        **extra,
    }
    check_theta_values(theta, f"θ to save in {directory}")
    (directory / "optimizer.json").write_text(json.dumps(header, indent=2, sort_keys=True))
    save_pytree(directory / "meta_params.msgpack", theta)
    return directory


def read_optimizer(directory: Path) -> tuple[L3RS, MetaParams, dict[str, Any]]:
    """Architecture, θ and header of an optimizer directory, of any format version this lopt
    reads (the header returned is upgraded to the current version).

    Every failure is a :class:`FormatError` naming the file: a missing or malformed
    ``config``/``layout``/``horizon`` in ``optimizer.json``, a ``meta_params.msgpack`` that is
    missing or truncated, or a θ whose arrays are not exactly those the config and layout call
    for (names and shapes), float32 and finite.
    """
    path = directory / "optimizer.json"
    readable = (*_OPTIMIZER_UPGRADES, OPTIMIZER_FORMAT_VERSION)
    header = _upgraded(_read_header(path, OPTIMIZER_FORMAT, readable))
    config = _parse_field(path, header, "config", L3RSConfig.from_json)
    layout = _parse_field(path, header, "layout", LayerLayout.from_json)
    _parse_field(path, header, "horizon", _positive_int)
    try:
        l3rs = L3RS(config, layout)
        expected = jax.eval_shape(l3rs.init, jax.random.key(0))
    except Exception as e:
        raise FormatError(path, f"'config' and 'layout' do not fit together ({type(e).__name__}: {e}).") from None
    theta_path = directory / "meta_params.msgpack"
    theta = load_pytree(theta_path)
    check_arrays(theta, expected, theta_path)
    return l3rs, theta, header
