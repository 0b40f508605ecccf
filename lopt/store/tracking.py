"""MLflow tracking: clients, tracking URIs, errors, experiments, runs and their logs.

The store's foundation, below :mod:`lopt.store.models` and :mod:`lopt.store.locks`; the rest of
lopt reaches all three through :mod:`lopt.store.registry`. This module sets MLflow's environment
defaults (telemetry off, bounded HTTP waits) before MLflow is first imported, so the other two
import it before they import :mod:`mlflow`.

Tracking URIs: every function takes ``tracking_uri``; ``None`` means ``$MLFLOW_TRACKING_URI``,
else an embedded SQLite store under ``$LOPT_HOME`` (default ``.lopt`` in the working directory).
Every call builds an explicit ``MlflowClient`` for that URI; nothing here sets MLflow's global
tracking or registry URI, so calls against different stores never leak into each other. Every
client call goes through :func:`_translated`: an unreachable store is one
:class:`TrackingServerError`, and no password leaks out in MLflow's messages.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import tempfile
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal


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

import requests  # noqa: E402  (MLflow's HTTP client: its errors say why a server was unreachable)
from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.exceptions import MlflowException, RestException  # noqa: E402

from lopt import paths  # noqa: E402
from lopt.redaction import redact  # noqa: E402

__all__ = [
    "HTTP_DEFAULTS",
    "RunInfo",
    "RunLogger",
    "TrackingServerError",
    "end_run",
    "ensure_experiment",
    "failure_message",
    "find_runs",
    "log_artifacts",
    "log_metrics",
    "log_params",
    "log_text",
    "ping",
    "read_text",
    "resolve_tracking_uri",
    "run_logger",
    "set_run_tags",
    "start_run",
]

# The store's public namespace (lopt.store.registry), as before the store was split in modules:
# what users and tests filter the store's log records by.
_logger = logging.getLogger("lopt.store.registry")

RunStatus = Literal["FINISHED", "FAILED", "KILLED"]

# MLflow's own limits per log_batch request (mlflow.utils.validation).
_MAX_METRICS_PER_BATCH = 1000
_MAX_PARAMS_PER_BATCH = 100
# Error codes MLflow uses for "no such model / version / alias" (a missing alias is reported as
# INVALID_PARAMETER_VALUE, not as RESOURCE_DOES_NOT_EXIST).
_NOT_FOUND_CODES = frozenset({"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"})


class TrackingServerError(RuntimeError):
    """The tracking store could not be reached, or kept failing, after MLflow's bounded retries.

    The message is one line: the tracking URI (password redacted), why, and what to do.
    """



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


def _checked_artifact_path(artifact_path: str) -> str:
    path = artifact_path.strip("/")
    if not path or any(part in {"", ".", ".."} for part in path.split("/")):
        raise ValueError(
            f"artifact_path must be a relative path like 'optimizer', got {artifact_path!r}."
        )
    return path


def _name_filter(name: str) -> str:
    # MLflow's filter grammar has no escape for a quote inside a string: use the other quote.
    quote = '"' if "'" in name else "'"
    return f"name={quote}{name}{quote}"
