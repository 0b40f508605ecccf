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
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import optax

from lopt import registry, serialization
from lopt.l3rs import L3RS, MetaParams, check_horizon
from lopt.models import ModelFn, ModelSpec, Params, model_fn, with_fresh_head

OPTIMIZER_PREFIX = "l3rs-"
CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous"


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


def fetch_files(uri: str, out_dir: str | Path, tracking_uri: str | None = None) -> Path:
    """Copies the registered version's files (e.g. ``optimizer.json``, ``meta_params.msgpack``:
    JSON and msgpack, for consumers outside Python) into ``out_dir``; returns it."""
    out = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(registry.download(uri, tracking_uri, Path(tmp)), out, dirs_exist_ok=True)
    return out


def fetch_optimizer(
    uri: str, num_steps: int | None = None, tracking_uri: str | None = None
) -> optax.GradientTransformationExtraArgs:
    """A registered learned optimizer as a drop-in optax optimizer.

    ``num_steps`` is the planned length of the fine-tuning run (the schedule stretches to
    it); by default, the horizon the optimizer was meta-trained for. ``opt.init(params)``
    raises a ``LayoutMismatchError`` naming the layers when ``params`` belong to another
    architecture. Nothing is unpickled: θ is msgpack, the rest JSON.
    """
    if num_steps is not None:  # checked before anything is downloaded
        num_steps = check_horizon(num_steps)
    l3rs, theta, header = load_optimizer(uri, tracking_uri)
    return l3rs.opt_fn(theta, int(header["horizon"]) if num_steps is None else num_steps)


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
    tags: Mapping[str, str],
    description: str,
    report: Mapping[str, Any] | None = None,
    tracking_uri: str | None = None,
) -> tuple[str, int]:
    """Registers θ as a new version of ``l3rs-<base model>`` with alias ``challenger``.

    Returns the registered name and version. Promotion is a separate, later step
    (:func:`promote_optimizer`): a version is complete, and fetchable, before any alias that
    consumers follow by default points at it.
    """
    name = optimizer_name(base_model.name)
    lineage = {"base_model": base_model.name, "base_model_version": str(base_model.version)}
    with tempfile.TemporaryDirectory() as tmp:
        directory = serialization.save_optimizer(Path(tmp) / "optimizer", l3rs, theta, horizon, lineage)
        if report is not None:
            (directory / "validation_report.json").write_text(json.dumps(report, indent=1))
        version = registry.register_directory(
            name,
            directory,
            run_id=run_id,
            artifact_path="optimizer",
            tags={"lopt.kind": "optimizer", **lineage, **tags},
            description=description,
            aliases=(CHALLENGER,),
            tracking_uri=tracking_uri,
        )
    return name, version


def promote_optimizer(
    name: str, version: int, expected_champion: int | None, tracking_uri: str | None = None
) -> dict[str, Any]:
    """Makes ``version`` the ``champion``; the version it replaces becomes ``previous``.

    Compare-and-set: ``expected_champion`` is the champion version the candidate was
    validated against (None: there was none). If ``champion`` points elsewhere now (another
    run promoted meanwhile), nothing moves and the result says why: the candidate was never
    compared with the new champion. Each alias update is one atomic registry write;
    ``previous`` moves first, so ``champion`` and ``previous`` are valid versions at every
    moment and a consumer of ``@champion`` sees either the old or the new version. The
    read-compare-write runs under :func:`lopt.registry.exclusive`.
    """
    with registry.exclusive(name, tracking_uri):
        current = (
            registry.resolve(f"models:/{name}@{CHAMPION}", tracking_uri).version
            if registry.alias_exists(name, CHAMPION, tracking_uri) else None
        )
        if current != expected_champion:
            reason = (
                f"not promoted: {CHAMPION} moved to v{current} while this version was validated "
                f"against {'v' + str(expected_champion) if expected_champion else 'no champion'}; "
                "rerun to compare with the new champion"
            )
            registry.set_version_tags(name, version, {"promoted": "false", "promotion_note": reason}, tracking_uri)
            return {"promoted": False, "reason": reason, "champion": current}
        if current is not None:
            registry.set_alias(name, PREVIOUS, current, tracking_uri)
        registry.set_alias(name, CHAMPION, version, tracking_uri)
        note = f"promoted to {CHAMPION}" + (f"; v{current} is now {PREVIOUS}" if current is not None else "")
        registry.set_version_tags(name, version, {"promoted": "true", "promotion_note": note}, tracking_uri)
        return {"promoted": True, "reason": note, "previous": current}
