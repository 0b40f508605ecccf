"""Meta-training checkpoints: a killed run, started again, ends with an uninterrupted run's θ."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lopt.meta.checkpointing import MetaTrainCheckpoints
from lopt.meta.es import AntitheticES
from lopt.meta.loop import meta_train

NUM_STEPS = 25
CHECKPOINT_EVERY = 5
KILL_AT = 12  # checkpoints at 5 and 10 exist when the run dies


def _noisy_quadratic(theta, key):
    # The noise makes every meta-step depend on its key: a resume that drew other keys would
    # end elsewhere.
    flat = jnp.concatenate([leaf.ravel() for leaf in jax.tree.leaves(theta)])
    return jnp.sum(jnp.square(flat - 1.0)) + 0.1 * jax.random.normal(key)


def _initial_theta(num_layers: int = 3):
    return {
        "layer_embeddings": jnp.zeros((num_layers, 4)),
        "mlp": {"w1": jnp.zeros((5, 2)), "b1": jnp.zeros(2)},
    }


# One instance, so that its compiled estimate is shared by all runs in this process.
ESTIMATOR = AntitheticES(_noisy_quadratic, num_pairs=4, sigma=0.05)


def run(checkpoint_dir, *, on_step=None, num_layers=3, num_steps=NUM_STEPS):
    """The one meta-training every test (and the killed subprocess) runs."""
    return meta_train(
        ESTIMATOR,
        _initial_theta(num_layers),
        num_steps=num_steps,
        learning_rate=0.05,
        key=jax.random.key(0),
        on_step=on_step,
        progress=False,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=CHECKPOINT_EVERY,
    )


def _assert_same_theta(actual, expected):
    jax.tree.map(np.testing.assert_array_equal, actual, expected)


def _objectives(result):
    return [metrics["objective"] for metrics in result.history]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    directory = tmp_path_factory.mktemp("full")
    return directory, run(directory)


def test_an_uninterrupted_run_saves_without_changing_the_result(full_run):
    directory, full = full_run
    assert full.resumed_from is None and len(full.history) == NUM_STEPS
    with MetaTrainCheckpoints(directory) as checkpoints:
        assert checkpoints.latest_step() == NUM_STEPS
    assert sorted(int(p) for p in os.listdir(directory) if p.isdigit()) == [20, 25]  # 2 kept
    _assert_same_theta(run(None).theta, full.theta)

    # Started again on a finished run: nothing to do, the saved θ comes back.
    seen = []
    again = run(directory, on_step=lambda step, metrics: seen.append(step))
    assert again.resumed_from == NUM_STEPS and seen == []
    _assert_same_theta(again.theta, full.theta)


class Killed(Exception):
    pass


def _kill(step, metrics):
    if step == KILL_AT:
        raise Killed


def test_a_run_stopped_by_an_exception_resumes_from_its_last_checkpoint(full_run, tmp_path):
    _, full = full_run
    with pytest.raises(Killed):
        run(tmp_path, on_step=_kill)

    seen = []
    resumed = run(tmp_path, on_step=lambda step, metrics: seen.append(step))
    assert resumed.resumed_from == 10
    assert seen == list(range(10, NUM_STEPS))  # on_step only for the steps run again
    _assert_same_theta(resumed.theta, full.theta)
    assert _objectives(resumed) == _objectives(full)  # the same draws, step by step
    seconds = [metrics["seconds"] for metrics in resumed.history]
    assert seconds == sorted(seconds)


def test_a_killed_process_resumes_to_the_same_theta(full_run, tmp_path):
    _, full = full_run
    script = textwrap.dedent(
        f"""
        import os, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_checkpointing import KILL_AT, run

        def die(step, metrics):
            if step == KILL_AT:
                os._exit(1)  # no cleanup, no waiting for a save in flight

        run(sys.argv[1], on_step=die)
        """
    )
    killed = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert killed.returncode == 1, killed.stderr

    resumed = run(tmp_path)
    # The save at 10 runs in the background and may not have been committed at the kill.
    assert resumed.resumed_from in (5, 10)
    assert len(resumed.history) == NUM_STEPS
    _assert_same_theta(resumed.theta, full.theta)
    # A save cut short by the kill left a temporary directory at most; opening removed it.
    assert sorted(os.listdir(tmp_path)) == ["20", "25", "lopt.lock"]


def test_a_checkpoint_of_another_meta_training_is_refused(full_run):
    directory, _ = full_run
    with pytest.raises(ValueError, match=r"does not match this .*.*fresh checkpoint_dir"):
        run(directory, num_layers=7)
    with pytest.raises(ValueError, match="past num_steps=20"):
        run(directory, num_steps=20)
