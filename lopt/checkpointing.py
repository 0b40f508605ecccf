"""Checkpoints of meta-training, so that a killed run resumes where it left off.

Meta-training runs for many minutes on machines that can go away (an evicted pod, a preempted
node). :func:`lopt.meta_training.meta_train` saves its state here every few meta-steps and,
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
"""

from __future__ import annotations

import logging
import os
from types import TracebackType
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from lopt.l3rs import MetaParams

_ARRAY_ITEMS = ("theta", "outer_state")
_ORBAX_SOURCE = os.path.dirname(ocp.__file__)


class _WithoutOrbaxInfo(logging.Filter):
    """Drops orbax's records below WARNING (it logs through absl's logger).

    KFP's executor sets the root logger to INFO, and orbax then writes some 70 lines per
    save into the step's log. Other absl users (TFDS) keep their INFO records.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not record.pathname.startswith(_ORBAX_SOURCE)


logging.getLogger("absl").addFilter(_WithoutOrbaxInfo())


class MetaTrainState(NamedTuple):
    """What a resumed meta-training needs besides the arguments it was started with."""

    step: int  # meta-steps done: the next one to run
    theta: MetaParams
    outer_state: optax.OptState
    history: list[dict[str, float]]


def _shapes(tree: Any) -> Any:
    return jax.tree.map(lambda x: tuple(x.shape), tree)


def _host_template(tree: Any) -> Any:
    """NumPy leaves of ``tree``'s shapes and dtypes: orbax restores into host memory.

    From there ``jnp.asarray`` gives uncommitted arrays, placed by jit like a freshly
    initialized θ. Arrays restored onto a device would be committed to it, and a θ committed
    to one device cannot enter a computation over several (AntitheticES' ``shard_map``).
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
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        for item in _ARRAY_ITEMS:
            registry.add(item, ocp.args.StandardSave)
            registry.add(item, ocp.args.StandardRestore)
        registry.add("history", ocp.args.JsonSave)
        registry.add("history", ocp.args.JsonRestore)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                preservation_policy=ocp.checkpoint_managers.LatestN(n=max_to_keep),
                cleanup_tmp_directories=True,
            ),
            handler_registry=registry,
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, state: MetaTrainState) -> None:
        """Starts writing ``state``; returns once the arrays are copied off the device."""
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
        """The newest checkpoint, restored into the structures of the given θ and outer state.

        Returns None when the directory holds no checkpoint. Raises ``ValueError`` when it
        holds one of another meta-training (θ of other shapes, another outer optimizer).
        """
        step = self._manager.latest_step()
        if step is None:
            return None
        try:
            saved = _shapes(self._manager.item_metadata(step)["theta"].tree)
        except (TypeError, KeyError, AttributeError) as error:  # another program's checkpoint
            raise self._mismatch(step, "it holds no θ") from error
        if saved != _shapes(theta_like):
            raise self._mismatch(step, f"it holds θ of shapes {saved}, not {_shapes(theta_like)}")
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    theta=ocp.args.StandardRestore(_host_template(theta_like)),
                    outer_state=ocp.args.StandardRestore(_host_template(outer_state_like)),
                    history=ocp.args.JsonRestore(),
                ),
            )
        except (ValueError, KeyError, TypeError) as error:
            raise self._mismatch(step, f"restoring it failed: {error}") from error
        theta, outer_state = jax.tree.map(jnp.asarray, (restored.theta, restored.outer_state))
        return MetaTrainState(step, theta, outer_state, restored.history)

    def _mismatch(self, step: int, reason: str) -> ValueError:
        return ValueError(
            f"The checkpoint at step {step} in {self.directory} does not match this "
            f"meta-training: {reason}. Use a fresh checkpoint_dir (or delete this one)."
        )

    def close(self) -> None:
        """Waits for the save in flight, then releases orbax's threads."""
        self._manager.close()

    def __enter__(self) -> MetaTrainCheckpoints:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
