"""The MLflow tracking and registry store: the one namespace the rest of lopt uses
(``from lopt.store import registry; registry.resolve(...)``). It holds no code; it re-exports
the public names of the three modules that do, the only modules of lopt that import
:mod:`mlflow` (and know nothing about JAX):

* :mod:`lopt.store.tracking` — clients and tracking URIs (:func:`resolve_tracking_uri`,
  :func:`ping`), the translation of an unreachable store into :class:`TrackingServerError`
  (:func:`failure_message`), experiments and runs, their params, metrics, tags and artifacts,
  and :class:`RunLogger`, which keeps a run's metrics through an outage.
* :mod:`lopt.store.models` — registered models as plain-file directories: ``models:/`` URIs
  (:func:`parse_model_uri`), lookup (:func:`resolve`, :func:`get_version`, aliases),
  :func:`download` with its integrity check (:class:`IntegrityError`) and
  :func:`register_directory`, all or nothing.
* :mod:`lopt.store.locks` — :func:`exclusive`, a lock between processes on one store.

Dependencies point one way: ``models`` and ``locks`` build on ``tracking``; ``models`` takes
only the lock models' name prefix from ``locks``.
"""

from __future__ import annotations

from lopt.redaction import redact, split_credentials
from lopt.store.locks import exclusive
from lopt.store.models import (
    FILES_TAG,
    IntegrityError,
    ModelRef,
    ModelVersionInfo,
    RegistrationError,
    RegistryError,
    alias_exists,
    delete_alias,
    download,
    get_version,
    model_exists,
    parse_model_uri,
    register_directory,
    resolve,
    set_alias,
    set_version_tags,
)
from lopt.store.tracking import (
    HTTP_DEFAULTS,
    RunInfo,
    RunLogger,
    TrackingServerError,
    end_run,
    ensure_experiment,
    failure_message,
    find_runs,
    log_artifacts,
    log_metrics,
    log_params,
    log_text,
    ping,
    read_text,
    resolve_tracking_uri,
    run_logger,
    set_run_tags,
    start_run,
)

__all__ = [
    "FILES_TAG",
    "HTTP_DEFAULTS",
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
    "set_version_tags",
    "split_credentials",
    "start_run",
]
