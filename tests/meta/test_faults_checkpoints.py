"""Faults around meta-training checkpoints (#16, item 7), tried as a user and an operator would.

- the checkpoint directory is keyed on the code and the data, not only the base model and the
  config: an upgrade of lopt or changed data starts over instead of resuming a stale θ;
- two meta-trainings on one directory cannot both write it: the second fails at once;
- a damaged (truncated, altered, non-finite) newest checkpoint falls back to the previous one
  with a warning, and with none intact meta-training starts over with a warning;
- a diverged θ is never saved.

The meta-trainings are test_checkpointing's small ES runs on a noisy quadratic (seconds).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lopt.store import lineage
from lopt.meta.checkpointing import (
    LOCK_FILE,
    UNREADABLE,
    CheckpointInUseError,
    CheckpointWarning,
    MetaTrainCheckpoints,
    MetaTrainState,
    checkpoint_key,
)
from lopt.meta.estimator import Estimate
from test_checkpointing import ESTIMATOR, NUM_STEPS, _assert_same_theta, _initial_theta, run

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(TESTS))  # tests/meta/ -> the checkout


@pytest.fixture(scope="module")
def full():
    """What an uninterrupted run ends with, without checkpoints."""
    return run(None)


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A directory holding the checkpoints of meta-steps 5 and 10 of the run."""
    directory = tmp_path_factory.mktemp("ten")
    run(directory, num_steps=10)
    assert sorted(p for p in os.listdir(directory) if p.isdigit()) == ["10", "5"]
    return directory


@pytest.fixture
def checkpoints(two_checkpoints, tmp_path):
    directory = tmp_path / "checkpoints"
    shutil.copytree(two_checkpoints, directory)
    return directory


# ---------------------------------------------------------------------------------------------
# The key: code and data, besides the base model and the config.


def test_the_checkpoint_key_depends_on_config_code_and_data():
    key = checkpoint_key("config-a", "data-a")
    assert key == checkpoint_key("config-a", "data-a")  # a rerun finds its checkpoints
    assert len({key, checkpoint_key("config-b", "data-a"), checkpoint_key("config-a", "data-b")}) == 3
    # The code is lopt's version and a hash of its sources, the function benchmarks/quality.py
    # keys its cache of trained optimizers on too (one function, not two copies).
    version, sources = lineage.code_fingerprint().removeprefix("lopt==").split("+")
    assert version == __import__("lopt").__version__ and sources == lineage.source_hash()
    quality = Path(REPO, "benchmarks", "quality.py").read_text()
    assert "from lopt.store.lineage import source_hash" in quality and "def _source_hash" not in quality


_KEY_OF_SOURCES = "import lopt, lopt.meta.checkpointing as c; print(lopt.__file__, c.checkpoint_key('cfg', 'data'))"


def test_an_edit_of_the_lopt_sources_changes_the_key(tmp_path):
    """What an upgrade of lopt does to the key, with the real sources: a copy of the package,
    once as it is and once with one line changed, each imported by a process of its own."""

    def key_of(root: Path) -> str:
        out = subprocess.run(
            [sys.executable, "-c", _KEY_OF_SOURCES], capture_output=True, text=True, timeout=120,
            env={**os.environ, "PYTHONPATH": str(root)}, cwd=tmp_path, check=True,
        ).stdout.split()
        assert out[0] == str(root / "lopt" / "__init__.py")  # the copy, not the checkout
        return out[1]

    for name in ("same", "edited"):
        shutil.copytree(Path(REPO, "lopt"), tmp_path / name / "lopt", ignore=shutil.ignore_patterns("__pycache__"))
    with open(tmp_path / "edited" / "lopt" / "optim" / "l3rs.py", "a") as f:
        f.write("\n# lopt 0.1.1: a fix that changes the updates\n")
    assert key_of(tmp_path / "same") == checkpoint_key("cfg", "data")
    assert key_of(tmp_path / "edited") != checkpoint_key("cfg", "data")


@pytest.mark.slow  # ~30 s: MLflow store, the base model, the data and one compiled ES meta-training
def test_the_meta_training_step_resumes_only_with_the_same_code_and_data(tmp_path, monkeypatch):
    """``meta_train_optimizer`` (what the pipeline's meta-train component runs) picks its
    checkpoint directory by base model, config, code and data."""
    from lopt.store import registry
    from lopt.config import get_config
    from lopt.hub import register_base_model
    from lopt.inner.models import ModelSpec, init_params
    from lopt.inner.tasks import load_task_family
    from pipeline.steps import StepContext, meta_train_optimizer

    monkeypatch.setenv("LOPT_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spec = ModelSpec(num_classes=10, input_shape=(28, 28, 1), conv_features=(4,), hidden_size=8)
    registry.ensure_experiment("lopt", uri)
    run_id = registry.start_run("lopt", tracking_uri=uri)
    register_base_model("cnn-ckpt", spec, init_params(spec, jax.random.key(0)), run_id=run_id,
                        metrics={}, description="test", tracking_uri=uri)
    base = "models:/cnn-ckpt/1"
    overrides = json.dumps({"meta_train": {"horizon": 4, "meta_steps": 2, "checkpoint_every": 1}})

    ctx = StepContext.create(budget="tiny", overrides=overrides, tracking_uri=uri).for_run(base_model_uri=base, run_id=run_id)

    def meta_train(out: str) -> dict:
        return meta_train_optimizer(ctx=ctx, output_dir=str(tmp_path / out), progress=False)

    assert meta_train("first")["resumed_from"] is None
    config = get_config("tiny", overrides)
    family = load_task_family(config.meta_train.family, spec.input_shape)
    # The base model URI with ":" and "/" made "_", then the hex key: the name existing stores hold.
    expected = f"models__cnn-ckpt_1-{checkpoint_key(config.hash(), family.content_hash)}"
    assert os.listdir(tmp_path / "checkpoints") == [expected]
    assert meta_train("again")["resumed_from"] == 2  # same everything: the finished run comes back

    # lopt upgraded (another version, other sources): the old θ is not resumed.
    monkeypatch.setattr("lopt.meta.checkpointing.code_fingerprint", lambda: "lopt==0.2.0+0123456789ab")
    assert meta_train("upgraded")["resumed_from"] is None
    assert len(os.listdir(tmp_path / "checkpoints")) == 2


# ---------------------------------------------------------------------------------------------
# Two runs at once.


def test_a_second_opener_of_a_directory_in_use_gets_a_clear_error(tmp_path):
    with MetaTrainCheckpoints(tmp_path):
        # Another thread or part of this process opens its own file: flock excludes it too.
        with pytest.raises(CheckpointInUseError, match=rf"pid {os.getpid()} on .* is using the checkpoint directory {tmp_path}.*another checkpoint_dir"):
            MetaTrainCheckpoints(tmp_path)
    with MetaTrainCheckpoints(tmp_path):  # released on close
        pass
    assert LOCK_FILE in os.listdir(tmp_path)


_RACER = textwrap.dedent(
    f"""
    import os, sys, time
    sys.path.insert(0, {TESTS!r})
    from lopt.meta.checkpointing import CheckpointInUseError
    from test_checkpointing import run

    directory, go = sys.argv[1], sys.argv[2]
    while not os.path.exists(go):  # both start at once
        time.sleep(0.005)
    try:
        # Slow steps: the winner holds the directory for seconds, long after the loser tried.
        result = run(directory, on_step=lambda step, metrics: time.sleep(0.3))
    except CheckpointInUseError as error:
        print(error)
        sys.exit(3)
    print("finished", result.resumed_from)
    """
)


def test_two_identical_runs_at_once_cannot_both_write_one_directory(full, tmp_path):
    directory, go = tmp_path / "checkpoints", tmp_path / "go"
    racers = [
        subprocess.Popen([sys.executable, "-c", _RACER, str(directory), str(go)], cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    time.sleep(1.0)
    go.touch()
    outcomes = sorted((racer.wait(timeout=300), racer.communicate()[0], racer.pid) for racer in racers)
    (won, won_out, won_pid), (lost, lost_out, _) = outcomes
    assert (won, lost) == (0, 3), outcomes
    assert won_out.strip() == "finished None"
    assert f"Another meta-training (pid {won_pid} on " in lost_out
    assert "is using the checkpoint directory" in lost_out and "another checkpoint_dir" in lost_out
    # The winner's checkpoints are whole: a rerun resumes its end, the uninterrupted θ.
    again = run(directory)
    assert again.resumed_from == NUM_STEPS
    _assert_same_theta(again.theta, full.theta)


# ---------------------------------------------------------------------------------------------
# A damaged newest checkpoint.


def _truncate(path: str) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _scribble(path: str) -> None:
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        f.write(b"\xff" * 8)


DAMAGES = {
    # θ's array data, cut short or altered (tensorstore: OUT_OF_RANGE, DATA_LOSS) or gone.
    "theta data truncated": ("theta/d/*", _truncate),
    "theta data altered": ("theta/d/*", _scribble),
    "theta data deleted": ("theta/d/*", os.remove),
    "theta index altered": ("theta/manifest.ocdbt", _scribble),
    "theta metadata truncated": ("theta/_METADATA", _truncate),
    "theta metadata deleted": ("theta/_METADATA", os.remove),
    "outer state data altered": ("outer_state/d/*", _scribble),
    "history truncated": ("history/metadata", _truncate),
    "history deleted": ("history/metadata", os.remove),
}


def _damage(directory: Path, step: int, damage: str) -> None:
    pattern, how = DAMAGES[damage]
    files = glob.glob(str(directory / str(step) / pattern))
    assert files, pattern
    for path in files:
        how(path)


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(full, checkpoints, damage):
    _damage(checkpoints, 10, damage)
    with pytest.warns(CheckpointWarning) as warned:
        resumed = run(checkpoints)
    messages = [str(w.message) for w in warned]
    assert f"The checkpoint at meta-step 10 in {checkpoints} cannot be resumed: " in messages[0]
    assert f"Moved it to {checkpoints / UNREADABLE}/10-" in messages[0]
    assert "tensorstore_spec" not in messages[0]  # one short line, not the whole spec
    assert "Resuming meta-training from meta-step 5" in messages[1]
    assert resumed.resumed_from == 5
    _assert_same_theta(resumed.theta, full.theta)  # steps 5..24 again, as an uninterrupted run
    assert len(resumed.history) == NUM_STEPS
    # The damaged step is kept aside for a post-mortem, out of the way of the new saves.
    assert [p.name.split("-")[0] for p in (checkpoints / UNREADABLE).iterdir()] == ["10"]
    assert sorted(p for p in os.listdir(checkpoints) if p.isdigit()) == ["20", "25"]


def test_with_no_intact_checkpoint_meta_training_starts_over(full, checkpoints):
    _damage(checkpoints, 10, "theta data altered")
    _damage(checkpoints, 5, "history deleted")
    with pytest.warns(CheckpointWarning, match="starts over from meta-step 0"):
        resumed = run(checkpoints)
    assert resumed.resumed_from is None
    _assert_same_theta(resumed.theta, full.theta)
    assert sorted(p.name.split("-")[0] for p in (checkpoints / UNREADABLE).iterdir()) == ["10", "5"]


def test_an_intact_checkpoint_of_another_meta_training_is_still_refused_not_discarded(checkpoints):
    with pytest.raises(ValueError, match=r"step 10 .* does not match this meta-training: it holds θ of shapes"):
        run(checkpoints, num_layers=7)
    assert not (checkpoints / UNREADABLE).exists()


# ---------------------------------------------------------------------------------------------
# Non-finite values.


def _write_as_an_older_lopt(directory: Path, step: int, theta, outer_state, history) -> None:
    """A checkpoint written without the finiteness check ``save`` has now (as lopt before it)."""
    import orbax.checkpoint as ocp

    with MetaTrainCheckpoints(directory) as checkpoints:
        checkpoints._manager.save(step, args=ocp.args.Composite(
            theta=ocp.args.StandardSave(theta),
            outer_state=ocp.args.StandardSave(outer_state),
            history=ocp.args.JsonSave(history),
        ))


@pytest.mark.parametrize("poisoned", ["theta", "outer_state"])
def test_a_checkpoint_holding_nan_is_not_resumed(full, checkpoints, poisoned):
    with MetaTrainCheckpoints(checkpoints) as opened:
        state = opened.restore_latest(theta_like=_initial_theta(), outer_state_like=_adam_state())
    assert state.step == 10
    theta, outer_state = state.theta, state.outer_state
    nan = lambda tree: jax.tree.map(lambda x: jnp.full_like(x, jnp.nan) if x.dtype == jnp.float32 else x, tree)  # noqa: E731
    if poisoned == "theta":
        theta = nan(theta)
    else:
        outer_state = nan(outer_state)
    shutil.rmtree(checkpoints / "10")
    _write_as_an_older_lopt(checkpoints, 10, theta, outer_state, state.history)

    with pytest.warns(CheckpointWarning, match=r"meta-step 10 .* cannot be resumed: .*NaN or inf"):
        resumed = run(checkpoints)
    assert resumed.resumed_from == 5
    _assert_same_theta(resumed.theta, full.theta)


def _adam_state():
    import optax

    return optax.adam(0.05).init(_initial_theta())


class _DivergesAt:
    """ESTIMATOR, whose gradient turns NaN from meta-step ``step`` on (a diverged ES step)."""

    def __init__(self, step: int) -> None:
        self.step, self.calls = step, 0

    def __call__(self, theta, key) -> Estimate:
        estimate = ESTIMATOR(theta, key)
        self.calls += 1
        if self.calls <= self.step:
            return estimate
        return Estimate(jax.tree.map(lambda g: g * jnp.nan, estimate.gradient), estimate.metrics)


def test_a_diverged_theta_is_never_saved(tmp_path):
    from lopt.meta.loop import meta_train

    with pytest.raises(ValueError, match=r"Meta-training diverged: θ after meta-step 10: .* NaN or inf.* keeps the checkpoint of meta-step 5.*outer_learning_rate"):
        meta_train(_DivergesAt(7), _initial_theta(), num_steps=NUM_STEPS, learning_rate=0.05,
                   key=jax.random.key(0), progress=False, checkpoint_dir=tmp_path, checkpoint_every=5)
    with MetaTrainCheckpoints(tmp_path) as checkpoints:
        assert checkpoints.latest_step() == 5
        state = checkpoints.restore_latest(theta_like=_initial_theta(), outer_state_like=_adam_state())
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state.theta))
