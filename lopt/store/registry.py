"""The MLflow registry, as a store of plain-file directories.

This is the only module of ``lopt`` that imports :mod:`mlflow`. Everything else (loading a
pretrained model, fetching a learned optimizer, the pipeline steps) goes through the small, typed
API below, so the rest of the library knows nothing about MLflow and this module knows nothing
about JAX.

Why plain directories instead of MLflow "models" (pyfunc and friends):

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

Tracking URIs: every function takes ``tracking_uri``; ``None`` means ``$MLFLOW_TRACKING_URI``,
else an embedded SQLite store under ``$LOPT_HOME`` (default ``.lopt`` in the working directory).
Every call builds an explicit ``MlflowClient`` for that URI; nothing here sets MLflow's global
tracking or registry URI, so calls against different stores never leak into each other.
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
import socket
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, NamedTuple

# Before mlflow is imported: MLflow 3 reports usage to a remote endpoint unless told not to, and
# its per-file progress bars only clutter pipeline logs for the few small files we move.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# Bounded waits on a tracking server that is down or unreachable. MLflow's own defaults (120 s per
# request, 7 retries with backoff factor 2) keep a command silent for minutes before it fails.
# These apply only where the user set nothing; MLflow reads them at every request, and the
# pipeline's steps inherit them. Against a closed port a call now fails after ~7 s (four attempts,
# waits of 0, 2 and 4 s plus jitter); against a host that drops packets after ~1.5 min (4 x 20 s).
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}
for _name, _value in HTTP_DEFAULTS.items():
    os.environ.setdefault(_name, _value)

import mlflow.artifacts  # noqa: E402
import requests  # noqa: E402  (MLflow's HTTP client: its errors say why a server was unreachable)
from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.entities.model_registry import ModelVersion  # noqa: E402
from mlflow.exceptions import MlflowException, RestException  # noqa: E402
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository  # noqa: E402

from lopt import paths  # noqa: E402
from lopt.redaction import redact, split_credentials  # noqa: E402

__all__ = [
    "FILES_TAG",
    "IntegrityError",
    "ModelRef",
    "ModelVersionInfo",
    "RegistrationError",
    "RegistryError",
    "RunInfo",
    "RunLogger",
    "TrackingServerError",
    "alias_exists",
    "delete_alias",
    "download",
    "end_run",
    "ensure_experiment",
    "exclusive",
    "failure_message",
    "find_runs",
    "get_version",
    "log_artifacts",
    "log_metrics",
    "log_params",
    "log_text",
    "model_exists",
    "parse_model_uri",
    "ping",
    "read_text",
    "redact",
    "register_directory",
    "resolve",
    "resolve_tracking_uri",
    "run_logger",
    "set_alias",
    "set_run_tags",
    "split_credentials",
    "start_run",
]

_logger = logging.getLogger(__name__)

RunStatus = Literal["FINISHED", "FAILED", "KILLED"]

# MLflow's own limits per log_batch request (mlflow.utils.validation).
_MAX_METRICS_PER_BATCH = 1000
_MAX_PARAMS_PER_BATCH = 100
# Alias rules of the MLflow registry, checked before anything is written so that a bad alias
# fails fast instead of after a version was created (and then rolled back).
_ALIAS_PATTERN = re.compile(r"[\w\-]+")
_RESERVED_ALIAS_PATTERN = re.compile(r"latest|[vV]\d+", re.IGNORECASE)
_ACCEPTED_URI_FORMS = (
    "'models:/<name>/<version>', 'models:/<name>@<alias>' or 'models:/<name>/latest'"
)
# Error codes MLflow uses for "no such model / version / alias" (a missing alias is reported as
# INVALID_PARAMETER_VALUE, not as RESOURCE_DOES_NOT_EXIST).
_NOT_FOUND_CODES = frozenset({"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"})
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


class TrackingServerError(RuntimeError):
    """The tracking store could not be reached, or kept failing, after MLflow's bounded retries.

    The message is one line: the tracking URI (password redacted), why, and what to do.
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
# Tracking URI and store locations


def resolve_tracking_uri(tracking_uri: str | None = None, *, create_home: bool = True) -> str:
    """The argument if non-empty, else ``$MLFLOW_TRACKING_URI``, else ``<LOPT_HOME>/mlflow.db``.

    ``create_home=False`` for read-only commands: the default store's directory is not created
    (a lookup in a store that does not exist then says so, see :func:`resolve`).
    """
    if tracking_uri:
        return tracking_uri
    if from_env := os.environ.get("MLFLOW_TRACKING_URI"):
        return from_env
    return f"sqlite:///{paths.tracking_database(create_home=create_home)}"


def _client(tracking_uri: str | None) -> tuple[MlflowClient, str]:
    uri = resolve_tracking_uri(tracking_uri)
    # The registry URI is passed too: otherwise MLflow falls back to its *global* registry URI,
    # which may point at another store than the one we were asked to use.
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    return _GuardedClient(client, uri), uri  # type: ignore[return-value]  # same methods


class _GuardedClient:
    """An :class:`MlflowClient` whose every call goes through :func:`_translated`.

    So every function of this module reports an unreachable store as one
    :class:`TrackingServerError` and never lets a password out in MLflow's messages, without
    a try/except of its own around each call.
    """

    def __init__(self, client: MlflowClient, uri: str) -> None:
        self._mlflow_client = client
        self._uri = uri

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._mlflow_client, name)
        if not callable(attribute):
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            with _translated(self._uri):
                return attribute(*args, **kwargs)

        return call


@contextmanager
def _translated(tracking_uri: str) -> Iterator[None]:
    """Turns a failure to reach ``tracking_uri`` into :class:`TrackingServerError`, and scrubs
    credentials from any other MLflow error (MLflow puts the request URL in its messages)."""
    try:
        yield
    except (MlflowException, requests.exceptions.RequestException) as error:
        reason = _unreachable_reason(error)
        if reason is not None:
            raise TrackingServerError(_unreachable_message(tracking_uri, reason)) from None
        if isinstance(error, MlflowException) and redact(error.message) != error.message:
            error.message = redact(error.message)
            error.args = (error.message,)
            raise error from None  # the chained cause repeats the URL with its password
        raise


def _unreachable_reason(error: BaseException) -> str | None:
    """Why the store could not be reached (a few words), or None when the error is another
    kind: a missing model, a request the server refused, a bug."""
    if isinstance(error, RestException):
        return None  # the server answered, with an error of its own
    timeout = os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", "120")
    cause: BaseException | None = error
    seen: set[int] = set()
    while cause is not None and id(cause) not in seen:  # MLflow re-raises inside `except`
        seen.add(id(cause))
        text = "" if isinstance(cause, MlflowException) else str(cause)
        if isinstance(cause, requests.exceptions.ConnectTimeout):
            return f"no connection within {timeout} s"
        if isinstance(cause, requests.exceptions.Timeout) or "Read timed out" in text:
            return f"no answer within {timeout} s"
        if isinstance(cause, requests.exceptions.RetryError) or "too many " in text:
            return "it answered every attempt with a server error (HTTP 5xx or 429)"
        if isinstance(cause, requests.exceptions.ConnectionError):
            if "refused" in text.lower():
                return "connection refused"
            if "resolve" in text or "Name or service not known" in text:
                return "its host name does not resolve"
            return "the connection failed"
        cause = cause.__cause__ or cause.__context__
    if isinstance(error, MlflowException) and re.search(
        r"failed with timeout exception|failed with error code (?:502|503|504)\b", error.message
    ):
        return "the request failed: " + redact(error.message).splitlines()[0][:200]
    return None


def _unreachable_message(tracking_uri: str, reason: str) -> str:
    retries = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7")
    timeout = os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", "120")
    attempts = int(retries) + 1 if retries.isdigit() else "?"
    return (
        f"cannot reach the MLflow tracking server at {redact(tracking_uri)}: {reason} "
        f"({attempts} attempt{'' if attempts == 1 else 's'}; "
        f"MLFLOW_HTTP_REQUEST_MAX_RETRIES={retries}, MLFLOW_HTTP_REQUEST_TIMEOUT={timeout} s). "
        f"Check that the server is running and that --tracking-uri or MLFLOW_TRACKING_URI names "
        f"it; raise those two variables to wait longer."
    )


def ping(tracking_uri: str | None = None) -> str:
    """One cheap request to the tracking store; returns its URI, password redacted.

    Raises :class:`TrackingServerError` (after the bounded retries) when it cannot be reached:
    a command checks this first, so that a server that is down fails it at once, with one line,
    instead of in the middle of its work.
    """
    client, uri = _client(tracking_uri)
    client.search_experiments(max_results=1)
    return redact(uri)


def failure_message(error: BaseException) -> str | None:
    """One line for a failure of the tracking store (unreachable, or an MLflow error), else
    None. What the command line prints instead of a traceback; credentials redacted."""
    if isinstance(error, TrackingServerError):
        return str(error)
    if isinstance(error, (MlflowException, requests.exceptions.RequestException)):
        reason = _unreachable_reason(error)
        if reason is not None:
            return f"the MLflow tracking server is unreachable: {reason}"
        text = redact(str(error)).strip().splitlines()
        return f"MLflow: {text[0] if text else type(error).__name__}"
    return None


def _client_writes_artifacts(tracking_uri: str) -> bool:
    """True when the client, not a server, picks artifact locations (sqlite, file, postgres…).

    Those stores default an experiment's artifacts to ``./mlruns`` of whatever the working
    directory is at creation time; a server applies its own ``--artifacts-destination``.
    """
    scheme = urllib.parse.urlsplit(tracking_uri).scheme
    return scheme not in {"http", "https"} and not scheme.startswith("databricks")


def _redacted(tracking_uri: str) -> str:
    """The URI without a password, safe to put in an error message (:func:`redact`)."""
    return redact(tracking_uri)


# ---------------------------------------------------------------------------------------------
# Experiments and runs


def ensure_experiment(name: str, tracking_uri: str | None = None) -> str:
    """The id of experiment ``name``, created if absent (restored if it was deleted)."""
    client, uri = _client(tracking_uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            # A deleted experiment still owns its name; restoring is the only way to use it.
            _logger.warning("Restoring deleted MLflow experiment %r to log into it.", name)
            client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id
    artifact_location = None
    if _client_writes_artifacts(uri):
        directory = paths.artifact_root() / paths.safe_name(name, collapse=True)
        directory.mkdir(parents=True, exist_ok=True)
        artifact_location = directory.as_uri()
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException as e:
        # Another step created it between our lookup and our create.
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def start_run(
    experiment: str,
    run_name: str | None = None,
    tracking_uri: str | None = None,
    tags: Mapping[str, Any] | None = None,
) -> str:
    """Create a run in ``experiment`` (created if absent) and return its id.

    The run is not made "active" in MLflow's fluent API: log to it by id, or with
    :class:`RunLogger`, so concurrent runs in one process cannot get mixed up.
    """
    experiment_id = ensure_experiment(experiment, tracking_uri)
    client, _ = _client(tracking_uri)
    run = client.create_run(
        experiment_id, run_name=run_name, tags={k: str(v) for k, v in (tags or {}).items()}
    )
    return run.info.run_id


def log_metrics(
    run_id: str,
    metrics: Mapping[str, float],
    step: int | None = None,
    tracking_uri: str | None = None,
) -> None:
    """Log ``metrics`` at ``step`` in as few requests as MLflow allows.

    Non-finite values are logged, not dropped: a diverging meta-step is worth seeing. MLflow stores
    NaN as NaN and clamps ±inf to ±float max.
    """
    if not metrics:
        return
    _write_metrics(run_id, _metric_entries(metrics, step), tracking_uri)


def _metric_entries(metrics: Mapping[str, float], step: int | None) -> list[Metric]:
    timestamp = int(time.time() * 1000)
    return [
        Metric(key, _as_float(key, value), timestamp, step or 0) for key, value in metrics.items()
    ]


def _write_metrics(run_id: str, entries: list[Metric], tracking_uri: str | None) -> None:
    """Write ``entries`` in batches; on failure, ``entries`` keeps only what was not written."""
    client, _ = _client(tracking_uri)
    while entries:
        batch = entries[:_MAX_METRICS_PER_BATCH]
        client.log_batch(run_id, metrics=batch)
        del entries[: len(batch)]


def log_params(run_id: str, params: Mapping[str, Any], tracking_uri: str | None = None) -> None:
    """Log ``params`` as strings. MLflow params are write-once: re-logging a key with another
    value raises."""
    if not params:
        return
    client, _ = _client(tracking_uri)
    entries = [Param(key, str(value)) for key, value in params.items()]
    for batch in _chunks(entries, _MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=batch)


def set_run_tags(run_id: str, tags: Mapping[str, Any], tracking_uri: str | None = None) -> None:
    """Set (or overwrite) tags on a run."""
    if not tags:
        return
    client, _ = _client(tracking_uri)
    entries = [RunTag(key, str(value)) for key, value in tags.items()]
    for batch in _chunks(entries, _MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, tags=batch)


def log_artifacts(
    run_id: str,
    local_dir: str | os.PathLike[str],
    artifact_path: str | None = None,
    tracking_uri: str | None = None,
) -> None:
    """Copy the files under ``local_dir`` into the run's artifacts, under ``artifact_path``."""
    client, _ = _client(tracking_uri)
    client.log_artifacts(run_id, os.fspath(local_dir), artifact_path)


def end_run(run_id: str, status: RunStatus = "FINISHED", tracking_uri: str | None = None) -> None:
    """Mark the run terminated with ``status``."""
    client, _ = _client(tracking_uri)
    client.set_terminated(run_id, status=status)


def log_text(run_id: str, text: str, artifact_file: str, tracking_uri: str | None = None) -> None:
    """Write ``text`` as the run's artifact ``artifact_file`` (e.g. ``summary.json``)."""
    client, _ = _client(tracking_uri)
    client.log_text(run_id, text, _checked_artifact_path(artifact_file))


def read_text(run_id: str, artifact_file: str, tracking_uri: str | None = None) -> str | None:
    """The run's artifact ``artifact_file`` as text; None when the run has no such file."""
    client, _ = _client(tracking_uri)
    path = _checked_artifact_path(artifact_file)
    parent = path.rpartition("/")[0] or None
    if not any(f.path == path for f in client.list_artifacts(run_id, parent)):
        return None
    with tempfile.TemporaryDirectory(prefix="lopt-run-") as tmp:
        return Path(client.download_artifacts(run_id, path, tmp)).read_text()


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """A run as :func:`find_runs` returns it."""

    run_id: str
    status: str  # RUNNING, SCHEDULED, FINISHED, FAILED or KILLED
    tags: Mapping[str, str]
    start_time_ms: int


def find_runs(
    experiment: str,
    tags: Mapping[str, str] | None = None,
    tracking_uri: str | None = None,
    started_after_ms: int | None = None,
) -> list[RunInfo]:
    """The runs of ``experiment`` whose tags have exactly the values in ``tags`` (and that
    started at or after ``started_after_ms``), newest first; none when there is no such
    experiment. Tag values may not contain quotes (MLflow's filter syntax)."""
    client, _ = _client(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    clauses = []
    for key, value in (tags or {}).items():
        if not re.fullmatch(r"[\w.\-]+", key) or "'" in value or "\\" in value:
            raise ValueError(f"Cannot search runs by tag {key!r}={value!r}: no quotes or backslashes.")
        clauses.append(f"tags.`{key}` = '{value}'")
    if started_after_ms is not None:
        clauses.append(f"attributes.start_time >= {int(started_after_ms)}")
    runs = client.search_runs(
        [found.experiment_id], filter_string=" and ".join(clauses),
        order_by=["attributes.start_time DESC"],
    )
    return [
        RunInfo(r.info.run_id, r.info.status, dict(r.data.tags), int(r.info.start_time or 0))
        for r in runs
    ]


class RunLogger:
    """One run, bound to one tracking URI: a metrics callback for training loops.

    ``logger(step, metrics)`` and ``logger.log_metrics(metrics, step)`` write at once, in one
    MLflow call, while the tracking store answers. When it is unreachable
    (:class:`TrackingServerError`, after MLflow's bounded retries), the metrics are kept in
    memory with their original timestamps and steps, one warning says so, and a later call
    writes them: not before ``retry_s`` has passed (doubling up to ``max_retry_s``), so that a
    training loop does not wait on MLflow's retries at every step of an outage. :meth:`flush`
    (called by :meth:`end`) writes what is kept, trying for up to ``timeout_s``; what it still
    cannot write is reported with a warning, never raised: a metric lost to an outage must not
    cost the training that produced it. At most ``max_pending`` metrics are kept (the oldest
    are dropped first, with a warning). Params, tags, artifacts and the run's end are written at
    once and raise: the registry's lineage depends on them.
    """

    def __init__(
        self,
        run_id: str,
        tracking_uri: str | None = None,
        *,
        retry_s: float = 15.0,
        max_retry_s: float = 120.0,
        max_pending: int = 100_000,
    ) -> None:
        self.run_id = run_id
        # Resolved once, so a later change of $MLFLOW_TRACKING_URI cannot split a run's logs.
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self._retry_s = retry_s
        self._max_retry_s = max_retry_s
        self._max_pending = max_pending
        self._pending: list[Metric] = []
        self._delay = retry_s
        self._next_attempt = 0.0  # time.monotonic() before which no write is tried
        self._outage: TrackingServerError | None = None

    @property
    def pending(self) -> int:
        """How many metrics are kept, waiting for the tracking store to answer again."""
        return len(self._pending)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self._pending += _metric_entries(metrics, step)  # a bad value raises here, at once
        if len(self._pending) > self._max_pending:
            excess = len(self._pending) - self._max_pending
            del self._pending[:excess]
            _logger.warning(
                "Dropped the %d oldest metrics of run %s kept during the outage (more than %d).",
                excess, self.run_id, self._max_pending,
            )
        if time.monotonic() >= self._next_attempt:
            self._write_pending()

    def flush(self, timeout_s: float = 120.0) -> bool:
        """Write the metrics kept during an outage, trying for up to ``timeout_s``; True when
        none is left. Never raises for an unreachable store: it warns what was lost."""
        deadline = time.monotonic() + timeout_s
        while self._pending and not self._write_pending():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            time.sleep(min(self._retry_s, remaining))
        if self._pending:
            _logger.warning(
                "%d metrics of run %s were not written and are lost: %s. The run's params, tags "
                "and artifacts are not affected.",
                len(self._pending), self.run_id, self._outage,
            )
        return not self._pending

    def _write_pending(self) -> bool:
        try:
            _write_metrics(self.run_id, self._pending, self.tracking_uri)
        except TrackingServerError as error:
            if self._outage is None:
                _logger.warning(
                    "%s — keeping %d metrics of run %s in memory; trying again in %.0f s.",
                    error, len(self._pending), self.run_id, self._delay,
                )
            self._outage = error
            self._next_attempt = time.monotonic() + self._delay
            self._delay = min(2 * self._delay, self._max_retry_s)
            return False
        if self._outage is not None:
            _logger.warning(
                "The tracking server at %s answers again; the metrics of run %s kept meanwhile "
                "are written.", redact(self.tracking_uri), self.run_id,
            )
        self._outage, self._delay, self._next_attempt = None, self._retry_s, 0.0
        return True

    def __call__(self, step: int, metrics: Mapping[str, float]) -> None:
        self.log_metrics(metrics, step)

    def log_params(self, params: Mapping[str, Any]) -> None:
        log_params(self.run_id, params, self.tracking_uri)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        set_run_tags(self.run_id, tags, self.tracking_uri)

    def log_artifacts(
        self, local_dir: str | os.PathLike[str], artifact_path: str | None = None
    ) -> None:
        log_artifacts(self.run_id, local_dir, artifact_path, self.tracking_uri)

    def end(self, status: RunStatus = "FINISHED") -> None:
        """Write the metrics kept during an outage (:meth:`flush`; one try when interrupted),
        then end the run."""
        self.flush(timeout_s=0.0 if status == "KILLED" else 120.0)
        end_run(self.run_id, status, self.tracking_uri)


@contextmanager
def run_logger(
    experiment: str,
    run_name: str | None = None,
    tracking_uri: str | None = None,
    tags: Mapping[str, Any] | None = None,
    params: Mapping[str, Any] | None = None,
) -> Iterator[RunLogger]:
    """A new run for the duration of the block: FINISHED on success, FAILED on an exception,
    KILLED on an interrupt."""
    logger = RunLogger(start_run(experiment, run_name, tracking_uri, tags), tracking_uri)
    if params:
        logger.log_params(params)
    try:
        yield logger
    except Exception:
        logger.end("FAILED")
        raise
    except BaseException:
        logger.end("KILLED")
        raise
    logger.end("FINISHED")


def _as_float(key: str, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError) as e:
        raise TypeError(f"metric {key!r} must be a number, got {type(value).__name__}") from e


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


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


def _name_filter(name: str) -> str:
    # MLflow's filter grammar has no escape for a quote inside a string: use the other quote.
    quote = '"' if "'" in name else "'"
    return f"name={quote}{name}{quote}"


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


# Locks on a tracking server: a registered model per locked name, whose versions are tickets.
LOCK_MODEL_PREFIX = "lopt-lock."
_LOCK_HEARTBEAT_TAG = "lopt.lock.heartbeat"
_LOCK_OWNER_TAG = "lopt.lock.owner"


@contextmanager
def exclusive(
    name: str,
    tracking_uri: str | None = None,
    *,
    lease_s: float = 60.0,
    timeout_s: float = 3600.0,
) -> Iterator[None]:
    """Serializes read-decide-write sequences on ``name`` (registering a first base model,
    promotion) between processes, on every kind of store.

    * Embedded SQLite store: an OS file lock (``fcntl``) next to the database file, relative
      paths resolved against the working directory as SQLite does. Released by the OS if the
      process dies.
    * Any other store (an MLflow server, a database URI): a lock held through the registry
      itself, :class:`_RegistryLock` — every contender creates a version ("ticket") of the
      registered model ``lopt-lock.<name>``; the store numbers versions atomically, and the
      lowest live ticket holds the lock. Tickets are kept alive by a heartbeat tag every
      ``lease_s / 4`` seconds; a ticket whose heartbeat has not changed for ``lease_s`` (by the
      waiter's own clock, so clock skew between machines does not matter) belongs to a dead
      process and is deleted by the next waiter.

    Raises :class:`TimeoutError` after ``timeout_s`` without the lock, naming its holder.
    """
    uri = resolve_tracking_uri(tracking_uri)
    if uri.startswith("sqlite:"):
        database = _sqlite_database(uri)
        if database is None:  # in memory: one process, nothing to serialize with
            yield
            return
        with _file_lock(database.with_name(f"{database.name}.{paths.safe_name(name, ascii_only=True)}.lock")):
            yield
        return
    lock = _RegistryLock(name, uri, lease_s)
    lock.acquire(timeout_s)
    try:
        yield
    finally:
        lock.release()


def _sqlite_database(uri: str) -> Path | None:
    """The database file of a SQLAlchemy SQLite URI, absolute; None for an in-memory database.

    ``sqlite:///mlflow.db`` is ``mlflow.db`` in the working directory (three slashes, then a
    relative path) and ``sqlite:////abs/mlflow.db`` is absolute, as SQLAlchemy reads them.
    """
    path = urllib.parse.urlsplit(uri).path
    path = path[1:] if path.startswith("/") else path
    if not path or path == ":memory:":
        return None
    return Path(urllib.parse.unquote(path)).absolute()


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    import fcntl  # POSIX only; the embedded store runs on the user's machine or a pod

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class _RegistryLock:
    """A lock held through the MLflow registry, for stores that several machines share.

    MLflow offers no lock, but it numbers the versions of a registered model atomically (one
    database transaction, unique per model), which is enough for a ticket lock: take a ticket
    (create a version of ``lopt-lock.<name>``), wait until no live ticket has a lower number,
    work, delete the ticket. Waiting is first come, first served. A heartbeat thread keeps the
    ticket's lease; a ticket nobody renews for ``lease_s`` is removed by a waiter, so a crashed
    holder delays the others by at most ``lease_s``. A holder paused for longer than its lease
    (which renewing every ``lease_s / 4`` makes unlikely) loses the lock: it then logs an error.
    """

    def __init__(self, name: str, tracking_uri: str, lease_s: float) -> None:
        self.model = LOCK_MODEL_PREFIX + name
        self.tracking_uri = tracking_uri
        self.lease_s = lease_s
        self.version: int | None = None
        self.lost = False
        self._stop = threading.Event()
        self._heartbeat: Any = None
        # version -> (last heartbeat seen, time.monotonic() when it was first seen)
        self._seen: dict[int, tuple[str, float]] = {}

    def acquire(self, timeout_s: float) -> None:
        client, _ = _client(self.tracking_uri)
        _create_lock_model(client, self.model)
        owner = f"{socket.gethostname()}:{os.getpid()}"
        mv = client.create_model_version(
            self.model,
            # Not a location of files; an absolute path, as an MLflow server requires of a source.
            source=f"lopt-lock:/{paths.safe_name(socket.gethostname(), ascii_only=True)}/{os.getpid()}",
            tags={_LOCK_OWNER_TAG: owner, _LOCK_HEARTBEAT_TAG: "0"},
            description=f"lock ticket of {owner}, taken {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
            await_creation_for=0,
        )
        self.version = int(mv.version)
        self._heartbeat = threading.Thread(
            target=self._beat, name=f"lopt-lock-{self.model}", daemon=True
        )
        self._heartbeat.start()
        try:
            self._wait(client, timeout_s)
        except BaseException:
            self.release()
            raise

    def _wait(self, client: Any, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        delay = 0.1
        while True:
            tickets = client.search_model_versions(_name_filter(self.model))
            if all(int(mv.version) != self.version for mv in tickets):
                raise RuntimeError(
                    f"The lock ticket v{self.version} of {self.model!r} was removed while this "
                    f"process waited (its heartbeat stalled for over {self.lease_s:.0f} s); "
                    f"try again."
                )
            ahead = [mv for mv in tickets if int(mv.version) < (self.version or 0)]
            if not ahead:
                return
            for mv in ahead:
                if self._expired(mv):
                    _logger.warning(
                        "Removing the lock ticket %s of %s: its holder %s has not renewed it "
                        "for %.0f s.", mv.version, self.model,
                        (mv.tags or {}).get(_LOCK_OWNER_TAG, "?"), self.lease_s,
                    )
                    _delete_version_if_present(client, self.model, int(mv.version))
            if time.monotonic() > deadline:
                holder = min(ahead, key=lambda mv: int(mv.version))
                raise TimeoutError(
                    f"Waited {timeout_s:.0f} s for the lock {self.model!r} at "
                    f"{redact(self.tracking_uri)}; it is held by "
                    f"{(holder.tags or {}).get(_LOCK_OWNER_TAG, '?')} (ticket v{holder.version}). "
                    f"If that process is gone, its ticket expires {self.lease_s:.0f} s after its "
                    f"last heartbeat; or delete version {holder.version} of {self.model!r}."
                )
            time.sleep(delay)
            delay = min(delay * 2, max(self.lease_s / 8, 0.1), 2.0)

    def _expired(self, mv: ModelVersion) -> bool:
        beat = (mv.tags or {}).get(_LOCK_HEARTBEAT_TAG, "")
        now = time.monotonic()
        last = self._seen.get(int(mv.version))
        if last is None or last[0] != beat:
            self._seen[int(mv.version)] = (beat, now)
            return False
        return now - last[1] > self.lease_s

    def _beat(self) -> None:
        client, _ = _client(self.tracking_uri)
        count = 0
        while not self._stop.wait(self.lease_s / 4):
            count += 1
            try:
                client.set_model_version_tag(
                    self.model, str(self.version), _LOCK_HEARTBEAT_TAG, str(count)
                )
            except TrackingServerError as error:  # the lease holds a while: try again
                _logger.warning("Could not renew the lock %r: %s", self.model, error)
            except MlflowException as error:
                if error.error_code not in _NOT_FOUND_CODES:
                    _logger.warning("Could not renew the lock %r: %s", self.model, error)
                    continue
                self.lost = True
                _logger.error(
                    "The lock %r was taken from this process (ticket v%s removed after its "
                    "lease of %.0f s ran out); another process may be doing the same work.",
                    self.model, self.version, self.lease_s,
                )
                return

    def release(self) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        if self.version is None:
            return
        try:
            client, _ = _client(self.tracking_uri)
            _delete_version_if_present(client, self.model, self.version)
        except TrackingServerError as error:
            _logger.warning(
                "Could not release the lock %r (%s); the others wait until its lease of %.0f s "
                "runs out.", self.model, error, self.lease_s,
            )


def _create_lock_model(client: Any, model: str) -> None:
    try:
        client.create_registered_model(
            model,
            tags={"lopt.lock": "true"},
            description=(
                "A lock of lopt (lopt.store.registry.exclusive): each version is one process's ticket, "
                "deleted when it is done. Not a model; safe to delete when no lopt run is active."
            ),
        )
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def _delete_version_if_present(client: Any, model: str, version: int) -> None:
    try:
        client.delete_model_version(model, str(version))
    except MlflowException as e:
        if e.error_code not in _NOT_FOUND_CODES:
            raise


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


def _checked_artifact_path(artifact_path: str) -> str:
    path = artifact_path.strip("/")
    if not path or any(part in {"", ".", ".."} for part in path.split("/")):
        raise ValueError(
            f"artifact_path must be a relative path like 'optimizer', got {artifact_path!r}."
        )
    return path


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
