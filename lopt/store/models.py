"""The MLflow model registry, as a store of plain-file directories: model URIs, lookup
(:func:`resolve`, :func:`get_version`, aliases), :func:`download` with its integrity check, and
:func:`register_directory` with its rollback. Built on :mod:`lopt.store.tracking`.


* No pickle. A pyfunc model is a cloudpickled Python object; loading one runs arbitrary code from
  the registry. What we register is data (JSON metadata plus msgpack-serialized arrays), and
  downloading it only copies files.
* Consumers outside Python, or outside this package's version, can read the files: the format is
  ours and documented, not whatever cloudpickle produced under one interpreter.
* A downstream fine-tuning job needs ``lopt`` and ``mlflow`` only to *fetch*; it never has to
  reconstruct the training environment a pyfunc wrapper would capture.

How a directory becomes a registered model version: the files are logged as artifacts of a run
under ``artifact_path``, and a model version is created with the source
``runs:/<run_id>/<artifact_path>``. (``mlflow.register_model`` refuses plain run artifacts in
MLflow 3; ``MlflowClient.create_model_version`` with an explicit source does not.) The ``runs:/``
form is the one an MLflow tracking server validates against the ``run_id`` it is given, and it is
resolved at download time through the run, with the tracking URI we pass explicitly, so the same
code works for an embedded SQLite store with a local artifact root and for an HTTP server that
proxies its artifact store.

What a version's files are is recorded on the version: the tag ``lopt.files`` holds
``{"<relative path>": {"bytes": n, "sha256": "<hex>"}}`` for every file, set in the same request
that creates the version, and :func:`download` checks the copy against it (see there). It is a
version tag, not a file logged next to the others, so that it lives in the registry's database
rather than in the artifact store it vouches for, and is visible in the MLflow UI and through
``MlflowClient().get_model_version(name, version).tags["lopt.files"]``.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

# First: it sets MLflow's environment defaults before mlflow is imported.
from lopt.store.tracking import (
    _NOT_FOUND_CODES,
    _checked_artifact_path,
    _client,
    _name_filter,
    _redacted,
    _translated,
    resolve_tracking_uri,
)

import mlflow.artifacts  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from mlflow.entities.model_registry import ModelVersion  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository  # noqa: E402

from lopt.store.locks import LOCK_MODEL_PREFIX  # noqa: E402

__all__ = [
    "FILES_TAG",
    "IntegrityError",
    "ModelRef",
    "ModelVersionInfo",
    "RegistrationError",
    "RegistryError",
    "alias_exists",
    "delete_alias",
    "download",
    "get_version",
    "model_exists",
    "parse_model_uri",
    "register_directory",
    "resolve",
    "set_alias",
    "set_version_tags",
]

# The store's public namespace (lopt.store.registry): what the store's log records are filed under.
_logger = logging.getLogger("lopt.store.registry")

# Alias rules of the MLflow registry, checked before anything is written so that a bad alias
# fails fast instead of after a version was created (and then rolled back).
_ALIAS_PATTERN = re.compile(r"[\w\-]+")
_RESERVED_ALIAS_PATTERN = re.compile(r"latest|[vV]\d+", re.IGNORECASE)
_ACCEPTED_URI_FORMS = (
    "'models:/<name>/<version>', 'models:/<name>@<alias>' or 'models:/<name>/latest'"
)
_READY = "READY"
_PENDING = "PENDING_REGISTRATION"
# The version tag recording every registered file's size and sha256 (see the module docstring).
FILES_TAG = "lopt.files"


class RegistryError(LookupError):
    """A registered model, version or alias that was asked for does not exist.

    The message names what is missing, what does exist and the tracking URI searched.
    """


class RegistrationError(RuntimeError):
    """Registering a directory failed; nothing half-registered was left behind."""


class IntegrityError(ValueError):
    """The files of a model version are not the files that were registered: one is missing,
    changed or truncated in the artifact store, or an unregistered one appeared.

    The message names the version, the file and what to do.
    """



class ModelRef(NamedTuple):
    """A parsed ``models:/`` URI: exactly one of ``version`` / ``alias``, or neither for latest."""

    name: str
    version: int | None = None
    alias: str | None = None

    @property
    def uri(self) -> str:
        if self.version is not None:
            return f"models:/{self.name}/{self.version}"
        if self.alias is not None:
            return f"models:/{self.name}@{self.alias}"
        return f"models:/{self.name}/latest"


@dataclasses.dataclass(frozen=True)
class ModelVersionInfo:
    """What the registry knows about one model version, detached from MLflow's entity types."""

    name: str
    version: int
    aliases: tuple[str, ...]
    tags: dict[str, str]
    description: str
    run_id: str | None
    source: str

    @property
    def uri(self) -> str:
        """The version-pinned URI: stable even after aliases move."""
        return f"models:/{self.name}/{self.version}"


# ---------------------------------------------------------------------------------------------
# Model URIs


def parse_model_uri(uri: str) -> ModelRef:
    """Parse ``models:/name/3``, ``models:/name@alias`` or ``models:/name/latest``.

    Stages (``models:/name/Production``) are not accepted: MLflow 3 replaced them with aliases.
    """
    if not isinstance(uri, str) or not uri.startswith("models:/") or uri.startswith("models://"):
        raise ValueError(f"Not a registered-model URI: {uri!r}. Use {_ACCEPTED_URI_FORMS}.")
    path = uri[len("models:/") :]
    name, slash, suffix = path.partition("/")
    if slash:
        if not name or "@" in name or "/" in suffix:
            raise ValueError(f"Malformed model URI {uri!r}. Use {_ACCEPTED_URI_FORMS}.")
        if suffix.isdigit() and int(suffix) > 0:
            return ModelRef(name, version=int(suffix))
        if suffix == "latest":
            return ModelRef(name)
        raise ValueError(
            f"Model URI {uri!r} ends in {suffix!r}, which is neither a version number nor "
            f"'latest' (registry stages are not supported; use an alias). "
            f"Use {_ACCEPTED_URI_FORMS}."
        )
    name, at, alias = path.rpartition("@")
    if not at or not name or not _ALIAS_PATTERN.fullmatch(alias):
        raise ValueError(
            f"Malformed model URI {uri!r}: a version or an alias is required. "
            f"Use {_ACCEPTED_URI_FORMS}."
        )
    return ModelRef(name, alias=alias)


# ---------------------------------------------------------------------------------------------
# Lookup


def resolve(uri: str, tracking_uri: str | None = None) -> ModelVersionInfo:
    """The model version ``uri`` points to now (aliases and ``latest`` resolved)."""
    return _resolve_ref(parse_model_uri(uri), tracking_uri)


def get_version(
    name: str,
    *,
    version: int | None = None,
    alias: str | None = None,
    tracking_uri: str | None = None,
) -> ModelVersionInfo:
    """A model version by number or by alias; the latest version when neither is given."""
    if version is not None and alias is not None:
        raise ValueError("Give a version or an alias, not both.")
    if alias is not None and not _ALIAS_PATTERN.fullmatch(alias):
        raise ValueError(f"Invalid alias {alias!r}: use letters, digits, '_' and '-'.")
    return _resolve_ref(ModelRef(name, version, alias), tracking_uri)


def download(
    uri: str, tracking_uri: str | None = None, dst: str | os.PathLike[str] | None = None
) -> Path:
    """Download the files of model version ``uri`` and return the directory holding them.

    Only files are copied; nothing is deserialized. The result is always a fresh copy, under
    ``dst`` or a new temporary directory: MLflow would otherwise hand back the store's own
    directory for a local artifact root, where a careless consumer could modify the registry.

    The copy is checked against the version's ``lopt.files`` tag (size and sha256 of every
    registered file): a file missing, changed or truncated in the artifact store, or one that was
    never registered, raises :class:`IntegrityError` naming the version and the file. Versions
    registered before lopt recorded that tag have none; they are downloaded unchecked, and only
    the format checks of their readers (:mod:`lopt.store.serialization`, via :mod:`lopt.hub`) apply.
    """
    info = resolve(uri, tracking_uri)
    client, resolved_uri = _client(tracking_uri)
    label = info.uri if uri == info.uri else f"{info.uri} ({uri})"
    # Resolve the version ourselves and download its underlying location: passing the models:/
    # URI to MLflow would look it up through the global registry URI, not ours.
    location = client.get_model_version_download_uri(info.name, str(info.version))
    target = Path(dst) if dst is not None else Path(tempfile.mkdtemp(prefix="lopt-model-"))
    target.mkdir(parents=True, exist_ok=True)
    try:
        with _translated(resolved_uri):  # a server lost mid-download: one line, no password
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=location,
                dst_path=os.fspath(target),
                tracking_uri=resolved_uri,
                registry_uri=resolved_uri,
            )
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise IntegrityError(
            f"{label}: its files are gone from the artifact store ({info.source} is empty or "
            f"missing). Delete this version and register it again (rerun `lopt run`), or use "
            f"another version of {info.name!r}."
        ) from None
    if FILES_TAG in info.tags:
        try:
            _verify_files(Path(local), info.tags[FILES_TAG], label, info.name)
        except IntegrityError:
            if dst is None:  # our temporary copy: nobody else would delete it
                shutil.rmtree(target, ignore_errors=True)
            raise
    return Path(local)


def _manifest(directory: Path) -> dict[str, dict[str, Any]]:
    """``{relative posix path: {"bytes": size, "sha256": hex}}`` of every file under
    ``directory``, the value of the ``lopt.files`` tag."""
    manifest = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        manifest[path.relative_to(directory).as_posix()] = {
            "bytes": path.stat().st_size,
            "sha256": digest.hexdigest(),
        }
    return manifest


def _verify_files(directory: Path, recorded_json: str, label: str, name: str) -> None:
    """Raises :class:`IntegrityError` unless ``directory`` holds exactly the recorded files."""
    advice = (
        f"Do not use this version: use another version of {name!r} (e.g. @previous), or "
        f"register a new one (rerun `lopt run`) and delete this one."
    )
    try:
        recorded = json.loads(recorded_json)
        expected = {str(k): (int(v["bytes"]), str(v["sha256"])) for k, v in recorded.items()}
    except (ValueError, TypeError, KeyError, AttributeError):
        raise IntegrityError(
            f"{label}: its {FILES_TAG!r} tag is not a valid file list, so its files cannot be "
            f"checked. {advice}"
        ) from None
    actual = {k: (v["bytes"], v["sha256"]) for k, v in _manifest(directory).items()}
    problems = []
    for file, (size, sha) in sorted(expected.items()):
        if file not in actual:
            problems.append(f"{file} is missing from the artifact store")
        elif actual[file] != (size, sha):
            got_size, got_sha = actual[file]
            how = "truncated" if got_size < size else "changed"
            problems.append(
                f"{file} was {how} after registration ({got_size} bytes, sha256 "
                f"{got_sha[:12]}…; registered: {size} bytes, sha256 {sha[:12]}…)"
            )
    problems += [f"{file} was never registered" for file in sorted(set(actual) - set(expected))]
    if problems:
        more = f" (and {len(problems) - 1} more problem{'s' * (len(problems) > 2)})" if len(problems) > 1 else ""
        raise IntegrityError(f"{label}: {problems[0]}{more}. {advice}")


def model_exists(name: str, tracking_uri: str | None = None) -> bool:
    """Whether a registered model ``name`` exists (False, and nothing created, when the local
    store does not exist)."""
    if _missing_local_store(resolve_tracking_uri(tracking_uri)) is not None:
        return False
    client, _ = _client(tracking_uri)
    return _registered_model_or_none(client, name) is not None


def alias_exists(name: str, alias: str, tracking_uri: str | None = None) -> bool:
    """Whether registered model ``name`` exists and has ``alias``."""
    if _missing_local_store(resolve_tracking_uri(tracking_uri)) is not None:
        return False
    client, _ = _client(tracking_uri)
    model = _registered_model_or_none(client, name)
    return model is not None and alias in model.aliases


def _missing_local_store(uri: str) -> Path | None:
    """Where a local store (SQLite file, ``file:`` directory) would be, if it does not exist.

    MLflow creates a local store (and its directory) as soon as a client for it is made, so this
    is asked before :func:`_client`: a lookup must not leave an empty store behind, and then
    report a model missing from it as if it had looked in the right place. Servers and database
    servers: None, they are asked.
    """
    scheme = urllib.parse.urlsplit(uri).scheme
    if scheme.split("+")[0] == "sqlite":
        database = uri.split(":///", 1)[1].split("?", 1)[0] if ":///" in uri else ""
        if database in ("", ":memory:"):
            return None
        path = Path(database)
    elif scheme == "file":
        path = Path(urllib.request.url2pathname(urllib.parse.urlsplit(uri).path))
    elif scheme == "":
        path = Path(uri)
    else:
        return None
    return None if path.exists() else path.absolute()


def _require_store(uri: str, ref: ModelRef) -> None:
    if (path := _missing_local_store(uri)) is not None:
        raise RegistryError(
            f"There is no MLflow store at {path} (tracking URI {_redacted(uri)}), so no "
            f"{ref.uri}: nothing was ever registered there. Point --tracking-uri / "
            f"$MLFLOW_TRACKING_URI (or --home / $LOPT_HOME for the default store) at the store "
            f"that holds the model, or run `lopt run` first to create it."
        )


def _resolve_ref(ref: ModelRef, tracking_uri: str | None) -> ModelVersionInfo:
    _require_store(resolve_tracking_uri(tracking_uri), ref)
    client, uri = _client(tracking_uri)
    try:
        if ref.alias is not None:
            mv = client.get_model_version_by_alias(ref.name, ref.alias)
        elif ref.version is not None:
            mv = client.get_model_version(ref.name, str(ref.version))
        else:
            mv = _latest_version(client, ref.name)
    except MlflowException as e:
        if e.error_code not in _NOT_FOUND_CODES:
            raise
        raise _not_found(client, uri, ref) from None
    if mv is None:
        raise _not_found(client, uri, ref)
    return _info(mv)


def _latest_version(client: MlflowClient, name: str) -> ModelVersion | None:
    versions = client.search_model_versions(
        _name_filter(name), order_by=["version_number DESC"], max_results=1
    )
    if versions:
        return versions[0]
    # An empty search does not tell a missing model from an empty one; this call raises for the
    # former, and the caller turns that into a RegistryError.
    client.get_registered_model(name)
    return None


def _not_found(client: MlflowClient, uri: str, ref: ModelRef) -> RegistryError:
    """A RegistryError saying what is missing and what exists instead (a few more lookups, only
    on this error path)."""
    where = f"in the MLflow registry at {_redacted(uri)}"
    model = _registered_model_or_none(client, ref.name)
    if model is None:
        return RegistryError(
            f"Registered model {ref.name!r} does not exist {where}. "
            f"{_existing_models_hint(client, ref.name)} "
            f"Check the name, or set MLFLOW_TRACKING_URI / tracking_uri to the registry that "
            f"holds it (it may not have been registered yet)."
        )
    versions = _version_numbers(client, ref.name)
    aliases = ", ".join(f"@{a} -> {v}" for a, v in sorted(model.aliases.items())) or "none"
    existing = f"Existing versions (newest first): {versions or 'none'}; aliases: {aliases}."
    if ref.alias is not None:
        return RegistryError(
            f"Registered model {ref.name!r} has no alias {ref.alias!r} {where}. {existing} "
            f"Use one of these, or set the alias first (e.g. lopt.store.registry.set_alias)."
        )
    if ref.version is not None:
        return RegistryError(
            f"Registered model {ref.name!r} has no version {ref.version} {where}. {existing}"
        )
    return RegistryError(f"Registered model {ref.name!r} has no versions yet {where}.")


def _registered_model_or_none(client: MlflowClient, name: str) -> Any:
    try:
        return client.get_registered_model(name)
    except MlflowException as e:
        if e.error_code in _NOT_FOUND_CODES:
            return None
        raise


def _existing_models_hint(client: MlflowClient, name: str, shown: int = 10) -> str:
    names = sorted(
        m.name for m in client.search_registered_models(max_results=1000)
        if not m.name.startswith(LOCK_MODEL_PREFIX)  # exclusive()'s locks are not models
    )
    if not names:
        return "The registry holds no registered models."
    close = difflib.get_close_matches(name, names, n=3)
    listed = close + [n for n in names if n not in close][: max(shown - len(close), 0)]
    more = f" and {len(names) - len(listed)} more" if len(names) > len(listed) else ""
    did_you_mean = f" Did you mean {close[0]!r}?" if close else ""
    return f"Registered models there: {', '.join(listed)}{more}.{did_you_mean}"


def _version_numbers(client: MlflowClient, name: str, shown: int = 10) -> list[int]:
    versions = client.search_model_versions(
        _name_filter(name), order_by=["version_number DESC"], max_results=shown
    )
    return [int(v.version) for v in versions]



def _info(mv: ModelVersion) -> ModelVersionInfo:
    return ModelVersionInfo(
        name=mv.name,
        version=int(mv.version),
        aliases=tuple(mv.aliases or ()),
        tags=dict(mv.tags or {}),
        description=mv.description or "",
        run_id=mv.run_id,
        source=mv.source,
    )


# ---------------------------------------------------------------------------------------------
# Registration and aliases


def register_directory(
    name: str,
    local_dir: str | os.PathLike[str],
    *,
    run_id: str,
    artifact_path: str,
    tags: Mapping[str, str] | None = None,
    description: str = "",
    aliases: Sequence[str] = (),
    tracking_uri: str | None = None,
    ready_timeout_s: float = 300.0,
) -> int:
    """Register the files under ``local_dir`` as a new version of ``name``; return its number.

    The files are logged to run ``run_id`` under ``artifact_path``, the registered model is
    created if absent, and the version gets ``tags``, ``description``, ``aliases`` (moved from
    whichever version held them) and the tag ``lopt.files`` (:data:`FILES_TAG`: size and sha256
    of every file, checked by :func:`download`).

    ``artifact_path`` must not hold the files of a version in that run: a ``runs:/`` source is
    the run's files, so overwriting them would silently change an earlier version
    (``ValueError``). Files there that no version uses are what an earlier, failed attempt left
    (e.g. a process killed between logging and creating the version): they are replaced, so a
    retried step succeeds.

    All or nothing: if logging or creating the version fails, the files logged are deleted again
    and the error is raised; if anything fails once the version exists, the version (and the
    registered model, if this call created it) and its files are deleted again and
    :class:`RegistrationError` is raised. Either way the run and the registry are as they were.
    """
    local = Path(local_dir)
    if not local.is_dir() or not any(p.is_file() for p in local.rglob("*")):
        raise ValueError(f"Nothing to register: {local} is not a directory with files in it.")
    artifact_path = _checked_artifact_path(artifact_path)
    for alias in aliases:
        _check_alias(alias)
    client, uri = _client(tracking_uri)
    _clear_unused_artifacts(client, uri, run_id, artifact_path)
    version_tags = {k: str(v) for k, v in (tags or {}).items()}
    version_tags[FILES_TAG] = json.dumps(_manifest(local), sort_keys=True, separators=(",", ":"))

    created_model = False
    try:
        client.log_artifacts(run_id, os.fspath(local), artifact_path)
        created_model = _create_model_if_absent(client, name)
        mv = client.create_model_version(
            name,
            source=f"runs:/{run_id}/{artifact_path}",
            run_id=run_id,
            tags=version_tags,
            description=description or None,
            # We wait ourselves (below), inside the rollback guard and without MLflow's INFO log.
            await_creation_for=0,
        )
    except BaseException:
        # No version exists: take back the model this call created and the files it logged.
        try:
            if created_model:
                _delete_model_if_empty(client, name)
            _delete_artifacts(client, uri, run_id, artifact_path)
        except Exception:  # The next attempt replaces unused files; report the first error.
            _logger.warning(
                "Could not delete the files logged to run %s under %r after a failed registration; "
                "a retry replaces them.", run_id, artifact_path, exc_info=True,
            )
        raise
    version = int(mv.version)
    try:
        _wait_until_ready(client, mv, ready_timeout_s)
        for alias in aliases:
            client.set_registered_model_alias(name, alias, str(version))
    except BaseException as e:
        rollback = _rollback(client, name, version, created_model, uri, run_id, artifact_path)
        if not isinstance(e, Exception):  # KeyboardInterrupt and friends: clean up, then go.
            raise
        raise RegistrationError(
            f"Registering {local} as version {version} of {name!r} at {_redacted(uri)} failed "
            f"({type(e).__name__}: {e}). {rollback}"
        ) from e
    return version


def set_alias(name: str, alias: str, version: int, tracking_uri: str | None = None) -> None:
    """Point ``alias`` of ``name`` at ``version`` (moving it if another version held it)."""
    _check_alias(alias)
    client, uri = _client(tracking_uri)
    try:
        client.set_registered_model_alias(name, alias, str(int(version)))
    except MlflowException as e:
        if e.error_code not in _NOT_FOUND_CODES:
            raise
        raise _not_found(client, uri, ModelRef(name, version=int(version))) from None


def set_version_tags(
    name: str, version: int, tags: Mapping[str, Any], tracking_uri: str | None = None
) -> None:
    """Set (or overwrite) tags on one model version."""
    client, uri = _client(tracking_uri)
    try:
        for key, value in tags.items():
            client.set_model_version_tag(name, str(int(version)), key, str(value))
    except MlflowException as e:
        if e.error_code not in _NOT_FOUND_CODES:
            raise
        raise _not_found(client, uri, ModelRef(name, version=int(version))) from None


def delete_alias(name: str, alias: str, tracking_uri: str | None = None) -> None:
    """Remove ``alias`` from ``name``; a no-op when the alias is not set. Raises
    :class:`RegistryError` when the model does not exist."""
    client, uri = _client(tracking_uri)
    try:
        client.delete_registered_model_alias(name, alias)
    except MlflowException as e:
        if e.error_code not in _NOT_FOUND_CODES:
            raise
        raise _not_found(client, uri, ModelRef(name, alias=alias)) from None


def _check_alias(alias: str) -> None:
    if not _ALIAS_PATTERN.fullmatch(alias) or _RESERVED_ALIAS_PATTERN.fullmatch(alias):
        raise ValueError(
            f"Invalid alias {alias!r}: use letters, digits, '_' and '-'; 'latest' and 'v<number>' "
            f"are reserved by MLflow."
        )


def _create_model_if_absent(client: MlflowClient, name: str) -> bool:
    """Create registered model ``name``; True if this call created it."""
    try:
        client.create_registered_model(name)
        return True
    except MlflowException as e:
        if e.error_code == "RESOURCE_ALREADY_EXISTS":
            return False
        raise


def _wait_until_ready(client: MlflowClient, mv: ModelVersion, timeout_s: float) -> None:
    # Local stores answer READY at once; a server with an asynchronous registry may not.
    deadline = time.monotonic() + timeout_s
    delay = 0.1
    while mv.status == _PENDING:
        if time.monotonic() > deadline:
            raise TimeoutError(f"version {mv.version} still {_PENDING} after {timeout_s:.0f} s")
        time.sleep(delay)
        delay = min(delay * 2, 3.0)
        mv = client.get_model_version(mv.name, str(mv.version))
    if mv.status != _READY:
        raise RuntimeError(f"version {mv.version} ended {mv.status}: {mv.status_message}")


def _rollback(
    client: MlflowClient,
    name: str,
    version: int,
    created_model: bool,
    uri: str,
    run_id: str,
    artifact_path: str,
) -> str:
    """Delete the half-registered version, then its files; return a sentence saying what was
    undone. The files go only once the version is gone: a version must never lose its files."""
    try:
        client.delete_model_version(name, str(version))
        if created_model:
            _delete_model_if_empty(client, name)
    except Exception as cleanup_error:  # Report both failures rather than hide the first.
        _logger.exception("Rolling back version %s of %r failed", version, name)
        return (
            f"Rolling back failed too ({cleanup_error}); delete version {version} of {name!r} "
            f"by hand."
        )
    try:
        _delete_artifacts(client, uri, run_id, artifact_path)
    except Exception:  # Unused files: the next registration into this run replaces them.
        _logger.warning("Could not delete the files of rolled-back version %s", version, exc_info=True)
        return (
            f"Version {version} was deleted again; its files stay in run {run_id} under "
            f"{artifact_path!r} until a retry replaces them."
        )
    return f"Version {version} and its files were deleted again; the registry is as it was before."


def _clear_unused_artifacts(client: MlflowClient, uri: str, run_id: str, artifact_path: str) -> None:
    """Refuse if a version uses the run's files under ``artifact_path``; delete them if none does.

    Unused files there are left by a registration that failed without cleaning up (killed, or
    the store went away mid-way); they are no version's files, so replacing them changes
    nothing anyone can fetch. A version deleted since is not in the search either: its files
    are free as well.
    """
    if not client.list_artifacts(run_id, artifact_path):
        return
    source = f"runs:/{run_id}/{artifact_path}"
    users = [
        v for v in client.search_model_versions(f"run_id='{run_id}'")
        if v.source.rstrip("/") == source or v.source.rstrip("/").endswith(f"/{artifact_path}")
    ]
    if users:
        used_by = ", ".join(f"models:/{v.name}/{v.version}" for v in users)
        raise ValueError(
            f"Run {run_id} already has artifacts under {artifact_path!r}, the files of {used_by}; "
            f"registering there would overwrite the files of an earlier version. Use a fresh "
            f"artifact_path or run."
        )
    _logger.warning(
        "Run %s has files under %r that no model version uses (left by a failed registration); "
        "replacing them.", run_id, artifact_path,
    )
    _delete_artifacts(client, uri, run_id, artifact_path)


def _delete_artifacts(client: MlflowClient, uri: str, run_id: str, artifact_path: str) -> None:
    """Delete the run's files under ``artifact_path`` (local store, or a server that proxies
    its artifact store, which deletes on request)."""
    repository = get_artifact_repository(client.get_run(run_id).info.artifact_uri, tracking_uri=uri)
    repository.delete_artifacts(artifact_path)


def _delete_model_if_empty(client: MlflowClient, name: str) -> None:
    if not client.search_model_versions(_name_filter(name), max_results=1):
        client.delete_registered_model(name)
