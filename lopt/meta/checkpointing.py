"""Checkpoints of meta-training, so that a killed run resumes where it left off.

Meta-training runs for many minutes on machines that can go away (an evicted pod, a preempted
node). :func:`lopt.meta.loop.meta_train` saves its state here every few meta-steps and,
started again with the same directory, continues from the newest checkpoint; because each
meta-step's key is ``fold_in(key, step)``, the resumed run ends with the θ a whole run would.

Why orbax: a step is written into a temporary directory that is renamed into place only when
complete (on GCS, marked complete by a commit file), so a process killed mid-save leaves at
most a temporary directory, which is never taken for a checkpoint (and is removed when the
directory is next opened); resume can only see whole checkpoints. It also prunes old steps
and stores JAX pytrees natively (tensorstore).

What one checkpoint holds; its orbax step number is the count of meta-steps done, i.e. the
next step to run:

- ``theta``: θ, a pytree of float32 arrays;
- ``outer_state``: the outer optimizer's state (Adam's count and moments). Orbax stores
  NamedTuples as lists and dicts, so it is restored into the structure of a freshly
  ``init``-ed state;
- ``history``: the per-step metrics so far, as JSON.

Saves run in a background thread so the meta-loop goes on while files are written; ``close()``
(or leaving the ``with`` block, also through an exception) waits for the save in flight.

What can go wrong, and what happens then:

- **Stale code or data.** A directory is keyed (:func:`checkpoint_key`) on everything that
  determines θ besides the base model and config: the code (lopt's version and a hash of its
  sources, :func:`lopt.store.lineage.code_fingerprint`) and the meta-training data (the task family's
  content hash). After an upgrade of lopt or with changed data, a rerun gets a fresh directory
  instead of resuming a θ that the new code would not have made.
- **Two runs at once.** Opening a local directory takes an exclusive ``flock`` on its
  ``lopt.lock``, held until ``close()``; a second run on the same directory fails at once with
  :class:`CheckpointInUseError` (naming the holder's pid and host) rather than clean up the
  first one's save in flight or interleave steps with it. The kernel drops the lock when its
  process dies, so a killed run never leaves a stale lock. Directories on object stores
  (``gs://...``) cannot be locked; a warning says so.
- **A damaged checkpoint** (truncated or altered files, a θ or outer state that is not finite):
  resuming moves it aside into ``unreadable/`` with a :class:`CheckpointWarning` and falls back
  to the previous one (orbax keeps two); with none intact, meta-training starts over with a
  warning. Checkpoints of another meta-training (θ or outer state of other shapes) are still
  refused: they are intact, only not this run's.
- **A diverged θ** is never saved: ``save`` raises, and the newest finite checkpoint stays.
"""

from __future__ import annotations

import datetime
import fcntl
import hashlib
import json
import logging
import os
import socket
import time
import warnings
from types import TracebackType
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from etils import epath

from lopt.optim.l3rs import MetaParams
from lopt.store.lineage import code_fingerprint
from lopt.store.serialization import check_theta_values

_ARRAY_ITEMS = ("theta", "outer_state")
LOCK_FILE = "lopt.lock"
UNREADABLE = "unreadable"  # where checkpoints that cannot be resumed are moved
_ORBAX_SOURCE = os.path.dirname(ocp.__file__)


class _WithoutOrbaxInfo(logging.Filter):
    """Drops orbax's records below WARNING (it logs through absl's logger).

    KFP's executor sets the root logger to INFO, and orbax then writes some 70 lines per
    save into the step's log. Other absl users (TFDS) keep their INFO records.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not record.pathname.startswith(_ORBAX_SOURCE)


logging.getLogger("absl").addFilter(_WithoutOrbaxInfo())


class CheckpointWarning(UserWarning):
    """A checkpoint could not be resumed (or locked); meta-training goes on without it."""


class CheckpointInUseError(RuntimeError):
    """Another meta-training holds the checkpoint directory."""


def checkpoint_key(config_hash: str, data_hash: str) -> str:
    """A short hash naming a meta-training's checkpoints, besides its base model.

    θ is a function of the base model, the config, the code and the data; a checkpoint is
    resumed only when all four are the same, so the key hashes the config hash, the code
    (:func:`lopt.store.lineage.code_fingerprint`: package version and source hash) and the data
    hash (the task family's content hash) together.
    """
    parts = {"config": config_hash, "code": code_fingerprint(), "data": data_hash}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


class _Unreadable(Exception):
    """A checkpoint that cannot be resumed: damaged files, or values that are not finite."""


class _LockUnsupported(Exception):
    """The file system of a checkpoint directory does not support ``flock``."""


class _DirectoryLock:
    """An exclusive ``flock`` on ``<directory>/lopt.lock``, held by this object until ``release``.

    ``flock`` belongs to the open file, so it excludes other threads of this process as well
    as other processes, and the kernel releases it when the process dies: a killed run never
    leaves a stale lock behind. The file records its holder, for the error the next one gets;
    it is left in place on release (deleting it would let a waiting opener lock a file that no
    longer has a name).
    """

    def __init__(self, directory: str) -> None:
        path = os.path.join(directory, LOCK_FILE)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(self._fd)
            os.close(self._fd)
            raise CheckpointInUseError(
                f"Another meta-training ({holder}) is using the checkpoint directory {directory}. "
                "Wait for it to finish (a rerun then resumes from its checkpoints), or give this "
                "run another checkpoint_dir."
            ) from None
        except OSError as error:  # a file system without flock (some network mounts)
            os.close(self._fd)
            raise _LockUnsupported(str(error)) from error
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps(holder).encode(), 0)

    def release(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)


def _read_holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0))
        return f"pid {holder['pid']} on {holder['host']}, since {holder['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


class MetaTrainState(NamedTuple):
    """What a resumed meta-training needs besides the arguments it was started with."""

    step: int  # meta-steps done: the next one to run
    theta: MetaParams
    outer_state: optax.OptState
    history: list[dict[str, float]]


def _shapes(tree: Any) -> Any:
    return jax.tree.map(lambda x: tuple(x.shape), tree)


def _leaf_shapes(tree: Any) -> list[tuple[int, ...]]:
    """The shapes of a tree's arrays, sorted: orbax stores an optimizer state's NamedTuples as
    lists and dicts, so only the arrays, not the structure, can be compared with the saved one."""
    return sorted(tuple(x.shape) for x in jax.tree.leaves(tree))


def _first_line(error: BaseException) -> str:
    """An error in one short line: tensorstore's messages go on with the whole spec."""
    text = str(error).strip().splitlines()
    first = (text[0] if text else "").split(" [tensorstore_spec=")[0]
    return f"{type(error).__name__}: {first}"[:300]


def _host_template(tree: Any) -> Any:
    """NumPy leaves of ``tree``'s shapes and dtypes: orbax restores into host memory.

    From there ``jnp.asarray`` gives uncommitted arrays, placed by jit like a freshly
    initialized θ. Arrays restored onto a device would be committed to it, where a fresh θ is
    not: a resumed run places θ as an uninterrupted one does.
    """
    return jax.tree.map(lambda x: np.empty(x.shape, x.dtype), tree)


class MetaTrainCheckpoints:
    """The newest ``max_to_keep`` meta-training checkpoints in ``directory``.

    Use as a context manager, so that the last save is complete when the block is left.
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 2) -> None:
        directory = os.fspath(directory)
        # Tensorstore wants absolute local paths; URLs (gs://...) are absolute already.
        self.directory = directory if "://" in directory else os.path.abspath(directory)
        # Locked before orbax opens the directory: opening it removes temporary directories,
        # which would be another run's save in flight.
        self._lock = None
        if "://" in directory:
            warnings.warn(
                f"Checkpoints in {directory} are not locked (only local directories can be): "
                "two meta-trainings with this checkpoint_dir at once would overwrite each other.",
                CheckpointWarning,
                stacklevel=2,
            )
        else:
            os.makedirs(self.directory, exist_ok=True)
            try:
                self._lock = _DirectoryLock(self.directory)
            except _LockUnsupported as error:
                warnings.warn(
                    f"Checkpoints in {directory} are not locked: the file system refused a lock "
                    f"({error}). Two meta-trainings with this checkpoint_dir at once would "
                    "overwrite each other.",
                    CheckpointWarning,
                    stacklevel=2,
                )
        try:
            self._manager = self._open_manager(max_to_keep)
        except BaseException:
            self._release()
            raise

    def _open_manager(self, max_to_keep: int) -> ocp.CheckpointManager:
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        for item in _ARRAY_ITEMS:
            registry.add(item, ocp.args.StandardSave)
            registry.add(item, ocp.args.StandardRestore)
        registry.add("history", ocp.args.JsonSave)
        registry.add("history", ocp.args.JsonRestore)
        return ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                preservation_policy=ocp.checkpoint_managers.LatestN(n=max_to_keep),
                cleanup_tmp_directories=True,
            ),
            handler_registry=registry,
        )

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, state: MetaTrainState) -> None:
        """Starts writing ``state``; returns once the arrays are copied off the device.

        Raises ``ValueError`` when θ is not finite (meta-training diverged): such a θ is never
        saved, so the newest finite checkpoint stays and is what a rerun resumes.
        """
        try:
            check_theta_values(state.theta, f"θ after meta-step {state.step}")
        except ValueError as error:
            latest = self.latest_step()
            kept = "no checkpoint" if latest is None else f"the checkpoint of meta-step {latest}"
            raise ValueError(
                f"Meta-training diverged: {error} It was not saved; {self.directory} keeps "
                f"{kept}. A rerun with the same config diverges again: lower "
                "meta_train.outer_learning_rate (or sigma)."
            ) from None
        self._manager.save(
            state.step,
            args=ocp.args.Composite(
                theta=ocp.args.StandardSave(state.theta),
                outer_state=ocp.args.StandardSave(state.outer_state),
                # Written in the background: a copy, so later appends do not race the writer.
                history=ocp.args.JsonSave([dict(metrics) for metrics in state.history]),
            ),
        )

    def restore_latest(
        self, *, theta_like: MetaParams, outer_state_like: optax.OptState
    ) -> MetaTrainState | None:
        """The newest intact checkpoint, restored into the structures of the given θ and
        outer state.

        A checkpoint that cannot be read whole, or holds values that are not finite, is moved
        into ``unreadable/`` with a :class:`CheckpointWarning`, and the previous one is tried.
        Returns None when no checkpoint is left (a fresh directory, or none intact: then with a
        warning that meta-training starts over). Raises ``ValueError`` when the newest readable
        metadata is of another meta-training (θ or outer state of other shapes).
        """
        skipped = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                state = self._restore(step, theta_like, outer_state_like)
            except _Unreadable as error:
                aside = self._set_aside(step)
                warnings.warn(
                    f"The checkpoint at meta-step {step} in {self.directory} cannot be resumed: "
                    f"{error}. Moved it to {aside}; trying the previous one.",
                    CheckpointWarning,
                    stacklevel=3,
                )
                skipped.append(step)
                continue
            if skipped:
                warnings.warn(
                    f"Resuming meta-training from meta-step {step} in {self.directory}, not from "
                    f"{skipped[0]}: the newer checkpoints could not be resumed.",
                    CheckpointWarning,
                    stacklevel=3,
                )
            return state
        if skipped:
            warnings.warn(
                f"No checkpoint in {self.directory} could be resumed: meta-training starts over "
                "from meta-step 0.",
                CheckpointWarning,
                stacklevel=3,
            )
        return None

    def _restore(self, step: int, theta_like: MetaParams, outer_state_like: optax.OptState) -> MetaTrainState:
        """One checkpoint; raises :class:`_Unreadable` when it is damaged, ``ValueError`` when
        it is intact but of another meta-training."""
        try:
            metadata = self._manager.item_metadata(step)
            saved_theta, saved_outer = metadata["theta"].tree, metadata["outer_state"].tree
            shapes = _shapes(saved_theta), _leaf_shapes(saved_outer)
        except Exception as error:  # noqa: BLE001 - whatever the damage, the step is unreadable
            raise _Unreadable(f"its metadata cannot be read ({_first_line(error)})") from error
        if shapes[0] != _shapes(theta_like):
            raise self._mismatch(step, f"it holds θ of shapes {shapes[0]}, not {_shapes(theta_like)}")
        if shapes[1] != _leaf_shapes(outer_state_like):
            raise self._mismatch(step, "its outer optimizer state has other arrays")
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    theta=ocp.args.StandardRestore(_host_template(theta_like)),
                    outer_state=ocp.args.StandardRestore(_host_template(outer_state_like)),
                    history=ocp.args.JsonRestore(),
                ),
            )
        except Exception as error:  # noqa: BLE001 - tensorstore's DATA_LOSS, a bad JSON, ...
            raise _Unreadable(f"reading it failed ({_first_line(error)})") from error
        try:
            check_theta_values(restored.theta, "θ")
        except ValueError as error:
            raise _Unreadable(str(error).rstrip(".")) from None
        for leaf in jax.tree.leaves(restored.outer_state):
            if np.issubdtype(leaf.dtype, np.floating) and not np.all(np.isfinite(leaf)):
                raise _Unreadable("its outer optimizer state holds NaN or inf values")
        if not isinstance(restored.history, list) or len(restored.history) != step:
            raise _Unreadable(f"its history does not hold {step} meta-steps")
        theta, outer_state = jax.tree.map(jnp.asarray, (restored.theta, restored.outer_state))
        return MetaTrainState(step, theta, outer_state, restored.history)

    def _set_aside(self, step: int) -> str:
        """Moves a step out of orbax's sight, into ``unreadable/<step>-<time>``, and returns
        where: kept for a post-mortem (delete it at will), and no longer in the way of saving
        that step again."""
        source = epath.Path(self.directory) / str(step)
        target = epath.Path(self.directory) / UNREADABLE / f"{step}-{time.strftime('%Y%m%dT%H%M%S')}"
        target.parent.mkdir(parents=True, exist_ok=True)
        source.rename(target)
        self._manager.reload()
        return os.fspath(target)

    def _mismatch(self, step: int, reason: str) -> ValueError:
        return ValueError(
            f"The checkpoint at step {step} in {self.directory} does not match this "
            f"meta-training: {reason}. Use a fresh checkpoint_dir (or delete this one)."
        )

    def close(self) -> None:
        """Waits for the save in flight, releases orbax's threads, then the directory's lock."""
        try:
            self._manager.close()
        finally:
            self._release()

    def __enter__(self) -> MetaTrainCheckpoints:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
