"""Locks between processes on one store: :func:`exclusive`, a file lock next to an embedded
SQLite store, and on any other store a ticket lock held through the registry itself
(:class:`_RegistryLock`). Built on :mod:`lopt.store.tracking`."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# First: it sets MLflow's environment defaults before mlflow is imported.
from lopt.store.tracking import (
    _NOT_FOUND_CODES,
    TrackingServerError,
    _client,
    _name_filter,
    resolve_tracking_uri,
)

from mlflow.entities.model_registry import ModelVersion  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402

from lopt import paths  # noqa: E402
from lopt.redaction import redact  # noqa: E402

__all__ = ["LOCK_MODEL_PREFIX", "exclusive"]

# The store's public namespace (lopt.store.registry): what the store's log records are filed under.
_logger = logging.getLogger("lopt.store.registry")

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
