"""The public contract with other programs: load a registered model, fetch an optimizer.

::

    model_fn, params, info = lopt.load_pretrained("models:/cnn-mnist@champion", num_classes=k)
    opt = lopt.fetch_optimizer("models:/l3rs-cnn-mnist@champion", num_steps=T)
    state = opt.init(params)
    updates, state = opt.update(grads, state, params, value=loss)

This module also registers what the pipeline produces. All MLflow access goes through
:mod:`lopt.store.registry`; here only files are read and written (see :mod:`lopt.store.serialization`).

Every read checks what it reads, in two layers, and names the version and the file when a
check fails, with what to do:

* :func:`lopt.store.registry.download` compares each file with the size and sha256 recorded on the
  version when it was registered (:class:`lopt.store.registry.IntegrityError`);
* the reader checks the format: headers and their fields, msgpack that parses, arrays of the
  right names, shapes, dtype (float32) and finite values (:class:`FormatError`).

Versions registered before lopt recorded the hashes are read with the second layer only.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

import jax
import optax

from lopt.store import registry, serialization
from lopt.optim.l3rs import L3RS, MetaParams, check_horizon
from lopt.inner.models import ModelFn, ModelSpec, Params, model_fn, with_fresh_head
from lopt.store.serialization import FormatError

T = TypeVar("T")

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
    from ``rng``; the rest of the network keeps its pretrained weights. The files are checked
    as :func:`load_optimizer` checks an optimizer's (params: float32, finite, the spec's shapes).
    """
    version, (spec, params, _) = _read_version(uri, tracking_uri, serialization.read_model)
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
    """The registered L3RS optimizer's architecture, θ and header (horizon, lineage).

    Raises :class:`lopt.store.registry.IntegrityError` or :class:`FormatError` (both ``ValueError``)
    naming the version and the file when the version's files are not the registered ones or
    not a readable optimizer (see the module docstring).
    """
    return _read_version(uri, tracking_uri, serialization.read_optimizer)[1]


def fetch_files(
    uri: str, out_dir: str | Path, tracking_uri: str | None = None, *, overwrite: bool = False
) -> Path:
    """Copies the registered version's files (e.g. ``optimizer.json``, ``meta_params.msgpack``:
    JSON and msgpack, for consumers outside Python) into ``out_dir``; returns it.

    The files are checked as :func:`load_optimizer` checks them (a base model's as
    :func:`load_pretrained` does) before anything is written. ``out_dir`` must be absent or
    empty, else ``FileExistsError``: files already there would stay and look like part of the
    version. ``overwrite=True`` replaces its content instead (only once the download passed).
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory; give a directory to fetch into.")
    if not overwrite and out.is_dir() and any(out.iterdir()):
        raise FileExistsError(
            f"{out} is not empty: the files already there would stay next to the version's and look "
            f"like part of it. Give an empty or new directory, or replace its content "
            f"(overwrite=True; lopt fetch --force)."
        )
    with tempfile.TemporaryDirectory() as tmp:
        _, downloaded = _read_version(uri, tracking_uri, _check_readable, Path(tmp))
        if out.is_dir():
            for entry in out.iterdir():  # none unless overwrite=True
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        shutil.copytree(downloaded, out, dirs_exist_ok=True)
    return out


def _check_readable(directory: Path) -> Path:
    """``directory`` once it reads as an optimizer or a base model (:class:`FormatError` if not)."""
    if (directory / "optimizer.json").is_file():
        serialization.read_optimizer(directory)
    elif (directory / "model.json").is_file():
        serialization.read_model(directory)
    else:
        raise FormatError(directory / "optimizer.json", "is missing: not a lopt optimizer or model.")
    return directory


def _read_version(
    uri: str, tracking_uri: str | None, read: Callable[[Path], T], tmp: Path | None = None
) -> tuple[registry.ModelVersionInfo, T]:
    """``read`` applied to a checked download of version ``uri`` (pinned first: an alias moving
    meanwhile cannot mix two versions), and the version.

    A :class:`FormatError` from ``read`` is raised again naming the version and the file
    relative to the version, not the temporary directory it was downloaded to.
    """
    version = registry.resolve(uri, tracking_uri)
    label = version.uri if uri == version.uri else f"{version.uri} ({uri})"
    with tempfile.TemporaryDirectory() if tmp is None else contextlib.nullcontext(tmp) as where:
        directory = registry.download(version.uri, tracking_uri, Path(where))
        try:
            return version, read(directory)
        except FormatError as e:
            try:
                file = Path(e.path).relative_to(directory).as_posix()
            except ValueError:
                file = os.fspath(e.path)
            raise FormatError(
                f"{label}: {file}",
                f"{e.problem} The version cannot be used: register a new one (rerun `lopt run`) "
                f"or use another version of {version.name!r} (e.g. @previous).",
            ) from None


def fetch_optimizer(
    uri: str, num_steps: int | None = None, tracking_uri: str | None = None
) -> optax.GradientTransformationExtraArgs:
    """A registered learned optimizer as a drop-in optax optimizer.

    ``num_steps`` is the planned length of the fine-tuning run (the schedule stretches to
    it); by default, the horizon the optimizer was meta-trained for. ``opt.init(params)``
    raises a ``LayoutMismatchError`` naming the layers when ``params`` belong to another
    architecture. Nothing is unpickled: θ is msgpack, the rest JSON. A version whose files
    are not the registered ones, or not a readable optimizer, raises (see :func:`load_optimizer`).
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
        directory = serialization.write_model(Path(tmp) / "model", spec, params, {"metrics": dict(metrics)})
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
        directory = serialization.write_optimizer(Path(tmp) / "optimizer", l3rs, theta, horizon, lineage)
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
    read-compare-write runs under :func:`lopt.store.registry.exclusive`.
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
