"""The public contract with other programs: load a registered model, fetch an optimizer.

::

    model_fn, params, info = lopt.load_pretrained("models:/cnn-mnist@champion", num_classes=k)
    opt = lopt.fetch_optimizer("models:/l3rs-cnn-mnist@champion", num_steps=T)
    state = opt.init(params)
    updates, state = opt.update(grads, state, params, value=loss)

This module also registers what the pipeline produces. All MLflow access goes through
:mod:`lopt.registry`; here only files are read and written (see :mod:`lopt.serialization`).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import optax

from lopt import registry, serialization
from lopt.l3rs import L3RS, MetaParams
from lopt.models import ModelFn, ModelSpec, Params, model_fn, with_fresh_head

OPTIMIZER_PREFIX = "l3rs-"
CHAMPION, CHALLENGER = "champion", "challenger"


def optimizer_name(base_model: str) -> str:
    """The registered name of the optimizer specialized to ``base_model``."""
    return f"{OPTIMIZER_PREFIX}{base_model}"


def load_pretrained(
    uri: str,
    num_classes: int | None = None,
    rng: int | jax.Array = 0,
    tracking_uri: str | None = None,
) -> tuple[ModelFn, Params, dict[str, Any]]:
    """Loads a registered classifier by ``models:/`` URI.

    Returns ``(model_fn, params, info)`` where ``model_fn(params, images) -> logits`` takes
    float32 images ``[N, H, W, C]`` in [0, 1] and ``info["input_shape"] == (H, W, C)``. When
    ``num_classes`` differs from the registered head, the head is replaced by a fresh one drawn
    from ``rng``; the rest of the network keeps its pretrained weights.
    """
    version = registry.resolve(uri, tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        # The pinned URI: an alias moving meanwhile cannot mix two versions.
        spec, params, _ = serialization.load_model(registry.download(version.uri, tracking_uri, Path(tmp)))
    pretrained_classes = spec.num_classes
    if num_classes is not None and num_classes != spec.num_classes:
        key = jax.random.key(rng) if isinstance(rng, int) else rng
        params = with_fresh_head(spec, params, num_classes, key)
        spec = spec.with_num_classes(num_classes)
    info = {
        "input_shape": tuple(spec.input_shape),
        "num_classes": spec.num_classes,
        "pretrained_num_classes": pretrained_classes,
        "spec": spec,
        "name": version.name,
        "version": version.version,
        "uri": f"models:/{version.name}/{version.version}",
    }
    return model_fn(spec), params, info


def load_optimizer(uri: str, tracking_uri: str | None = None) -> tuple[L3RS, MetaParams, dict[str, Any]]:
    """The registered L3RS optimizer's architecture, θ and header (horizon, lineage)."""
    with tempfile.TemporaryDirectory() as tmp:
        return serialization.load_optimizer(registry.download(uri, tracking_uri, Path(tmp)))


def fetch_optimizer(
    uri: str, num_steps: int | None = None, tracking_uri: str | None = None
) -> optax.GradientTransformationExtraArgs:
    """A registered learned optimizer as a drop-in optax optimizer.

    ``num_steps`` is the planned length of the fine-tuning run (the schedule stretches to
    it); by default, the horizon the optimizer was meta-trained for. ``opt.init(params)``
    raises a ``LayoutMismatchError`` naming the layers when ``params`` belong to another
    architecture. Nothing is unpickled: θ is msgpack, the rest JSON.
    """
    l3rs, theta, header = load_optimizer(uri, tracking_uri)
    return l3rs.opt_fn(theta, int(num_steps or header["horizon"]))


def register_base_model(
    name: str,
    spec: ModelSpec,
    params: Params,
    *,
    run_id: str,
    metrics: Mapping[str, float],
    description: str,
    aliases: Sequence[str] = (CHAMPION,),
    tracking_uri: str | None = None,
) -> int:
    """Registers a classifier (spec + params) as a new version of ``name``."""
    with tempfile.TemporaryDirectory() as tmp:
        directory = serialization.save_model(Path(tmp) / "model", spec, params, {"metrics": dict(metrics)})
        return registry.register_directory(
            name,
            directory,
            run_id=run_id,
            artifact_path="model",
            tags={"lopt.kind": "base-model", "architecture": spec.architecture},
            description=description,
            aliases=aliases,
            tracking_uri=tracking_uri,
        )


def register_optimizer(
    base_model: registry.ModelVersionInfo,
    l3rs: L3RS,
    theta: MetaParams,
    horizon: int,
    *,
    run_id: str,
    promote: bool,
    tags: Mapping[str, str],
    description: str,
    report: Mapping[str, Any] | None = None,
    tracking_uri: str | None = None,
) -> tuple[str, int, tuple[str, ...]]:
    """Registers θ as ``l3rs-<base model>``; ``challenger`` always, ``champion`` if promoted.

    Returns the registered name, the version and the aliases set.
    """
    name = optimizer_name(base_model.name)
    aliases = (CHALLENGER, CHAMPION) if promote else (CHALLENGER,)
    lineage = {"base_model": base_model.name, "base_model_version": str(base_model.version)}
    with tempfile.TemporaryDirectory() as tmp:
        directory = serialization.save_optimizer(Path(tmp) / "optimizer", l3rs, theta, horizon, lineage)
        if report is not None:
            (directory / "validation_report.json").write_text(json.dumps(report, indent=2))
        version = registry.register_directory(
            name,
            directory,
            run_id=run_id,
            artifact_path="optimizer",
            tags={"lopt.kind": "optimizer", **lineage, **tags},
            description=description,
            aliases=aliases,
            tracking_uri=tracking_uri,
        )
    return name, version, aliases
