"""The validation suite's tuning rule, its bootstrap intervals and the gate's noise flags.

Everything here runs on synthetic results (no training): a fake baseline whose validation
loss is a known function of the learning rate, and suite rows with known per-seed losses.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import numpy as np
import pytest

from lopt.eval import evaluation
from lopt.optim.baselines import BASELINES, get_baseline
from lopt.eval.bootstrap import Interval, Paired, bootstrap_interval
from lopt.config import GateConfig, ValidationConfig, get_config
from lopt.eval.evaluation import RunResult, example_loss_curves, search_grid, summarize, tune
from lopt.inner.training import Trajectory
from lopt.eval.validation import SuiteRow, ValidationReport, decide, row_sample

GRID = (1e-4, 1e-3, 1e-2, 1e-1)  # ratio 10


def _point(lr: float, val_loss: float) -> RunResult:
    return RunResult(
        task="t", horizon=10, optimizer="fake", learning_rate=lr, val_loss=val_loss,
        test_loss=val_loss, test_accuracy=0.5, test_loss_curve=(2.0, val_loss), curve_steps=(0, 10),
    )


class _Bowl:
    """A fake baseline's validation loss: a parabola in log10(lr), minimal at ``best``;
    every learning rate above ``diverge`` diverges. Records the learning rates it ran."""

    def __init__(self, best: float, diverge: float = math.inf):
        self.best, self.diverge, self.ran = best, diverge, []

    def __call__(self, lr: float) -> RunResult:
        self.ran.append(lr)
        loss = math.inf if lr > self.diverge else 1.0 + (math.log10(lr) - math.log10(self.best)) ** 2
        return _point(lr, loss)


# ---------------------------------------------------------------------------------------------
# Grid extension


def test_a_best_point_at_the_high_edge_is_extended_until_interior():
    bowl = _Bowl(best=10.0)  # two decades above the grid
    best, grid = search_grid(bowl, GRID, max_extensions=4)
    assert [r.learning_rate for r in grid] == [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0]
    assert bowl.ran[len(GRID):] == [1.0, 10.0, 100.0]  # one point at a time, same spacing
    assert best.learning_rate == 10.0 and best.grid_interior is True
    assert best.grid_points == 7 and best.grid_extensions == (0, 3) and best.grid_note == ""


def test_a_best_point_at_the_low_edge_is_extended_downwards():
    best, grid = search_grid(_Bowl(best=1e-5), GRID, max_extensions=4)
    assert [r.learning_rate for r in grid][:3] == [1e-6, 1e-5, 1e-4]
    assert (best.learning_rate, best.grid_extensions, best.grid_interior) == (1e-5, (2, 0), True)


def test_an_interior_best_runs_only_the_grid():
    bowl = _Bowl(best=1e-3)
    best, grid = search_grid(bowl, GRID, max_extensions=4)
    assert bowl.ran == list(GRID) and best.grid_points == 4 and best.grid_interior is True


def test_the_extension_cap_stops_the_search_and_says_so():
    best, grid = search_grid(_Bowl(best=1e9), GRID, max_extensions=2)
    assert len(grid) == 6 and best.learning_rate == 10.0
    assert best.grid_interior is False and best.grid_extensions == (0, 2)
    assert "high edge" in best.grid_note and "cap" in best.grid_note


def test_the_bounds_stop_the_search_before_the_cap():
    best, grid = search_grid(_Bowl(best=1e9), GRID, max_extensions=4, bounds=(1e-6, 1.0))
    assert grid[-1].learning_rate == 1.0 and best.grid_extensions == (0, 1)
    assert best.grid_interior is False and "bound 1" in best.grid_note


def test_a_diverged_point_counts_as_inf_and_brackets_the_best():
    best, grid = search_grid(_Bowl(best=1e9, diverge=0.5), GRID, max_extensions=4)
    assert grid[-1].learning_rate == 1.0 and grid[-1].val_loss == math.inf
    assert best.learning_rate == 0.1 and best.grid_interior is True


def test_without_extensions_an_edge_best_is_flagged_not_extended():
    bowl = _Bowl(best=10.0)
    best, grid = search_grid(bowl, GRID)
    assert bowl.ran == list(GRID) and best.grid_interior is False and "extension off" in best.grid_note


def test_grid_spacing_follows_the_configured_grid_at_any_density():
    grid6 = get_baseline("adam").grid(6)
    ratio = grid6[1] / grid6[0]
    _, grid = search_grid(_Bowl(best=1.0), grid6, max_extensions=1)
    assert grid[-1].learning_rate == pytest.approx(grid6[-1] * ratio, rel=1e-2)


def test_every_baseline_has_sane_bounds_around_its_grid():
    for baseline in BASELINES.values():
        low, high = baseline.bounds
        assert low < baseline.learning_rates[0] and baseline.learning_rates[-1] <= high


def test_tune_extends_through_one_compiled_unroll(monkeypatch):
    """Every grid point, extensions included, calls the unroll with the same static
    arguments (factory, eval params) and a traced learning rate: one compilation."""
    calls = []

    def fake_run_seeds(hparams, make_optimizer, spec, pretrained, task, horizon, seeds, batch_size,
                       eval_params=None, eval_points=10):
        calls.append((hparams, make_optimizer, eval_params))
        return ["trajectory"]

    def fake_summarize(trajectories, task, horizon, optimizer, lr):
        return _point(lr, 1.0 - lr)  # the larger the better: always the high edge

    monkeypatch.setattr(evaluation, "run_seeds", fake_run_seeds)
    monkeypatch.setattr(evaluation, "summarize", fake_summarize)
    baseline = get_baseline("schedule_free_adamw")
    best, grid = tune(baseline, None, None, None, 10, (0,), 4, (1e-3, 1e-2), max_extensions=3)
    assert len(calls) == len(grid) == 4  # the cap (and the bound 1.0) stop it
    assert {id(make) for _, make, _ in calls} == {id(baseline.make_optimizer)}
    assert {id(ev) for _, _, ev in calls} == {id(baseline.eval_params)}
    assert all(isinstance(h, jax.Array) and h.shape == () for h, _, _ in calls)
    assert best.grid_interior is False


# ---------------------------------------------------------------------------------------------
# Bootstrap intervals


def _mean(draw: tuple[np.ndarray, ...]) -> float:
    return float(draw[0].mean())


def test_interval_covers_the_statistic_and_narrows_with_more_samples():
    rng = np.random.default_rng(1)
    small = rng.normal(1.0, 0.5, size=10)
    large = rng.normal(1.0, 0.5, size=1000)
    narrow = bootstrap_interval(_mean, Paired((large,)))
    wide = bootstrap_interval(_mean, Paired((small,)))
    assert wide.contains(float(small.mean())) and narrow.contains(float(large.mean()))
    assert narrow.width() < wide.width() / 4  # ~ 1 / sqrt(100) of it
    assert narrow.level == 0.9


def test_a_90_percent_interval_covers_the_true_mean_about_90_percent_of_the_time():
    rng = np.random.default_rng(2)
    covered = [
        bootstrap_interval(_mean, Paired((rng.normal(1.0, 0.5, size=30),)), num_resamples=300, seed=i).contains(1.0)
        for i in range(200)
    ]
    assert 0.8 <= np.mean(covered) <= 0.97


def test_interval_is_deterministic_for_a_seed_and_widens_with_the_level():
    data = Paired((np.arange(20.0),))
    assert bootstrap_interval(_mean, data, seed=3) == bootstrap_interval(_mean, data, seed=3)
    assert bootstrap_interval(_mean, data, seed=3) != bootstrap_interval(_mean, data, seed=4)
    assert bootstrap_interval(_mean, data, level=0.99).width() > bootstrap_interval(_mean, data, level=0.5).width()


def test_pairing_cancels_the_noise_both_arms_share():
    rng = np.random.default_rng(0)
    shared = rng.normal(0.0, 1.0, size=30)  # e.g. a seed's lucky head, for both optimizers
    a, b = shared + 0.1, shared + rng.normal(0.0, 0.01, size=30)
    paired = bootstrap_interval(lambda d: float((d[0] - d[1]).mean()), Paired((a, b)))
    unpaired = bootstrap_interval(
        lambda da, db: float(da[0].mean() - db[0].mean()), Paired((a,)), Paired((b,))
    )
    assert paired.width() < unpaired.width() / 10
    assert not paired.contains(0.0) and unpaired.contains(0.0)


def test_two_axes_resample_seeds_and_examples():
    # 3 seeds that agree exactly, 200 examples that vary: only example resampling moves it.
    examples = np.random.default_rng(0).normal(1.0, 1.0, size=200)
    data = np.tile(examples, (3, 1))
    seeds_only = bootstrap_interval(lambda d: float(d[0].mean()), Paired((data.mean(axis=1),)))
    both = bootstrap_interval(lambda d: float(d[0].mean()), Paired((data,), axes=2))
    assert seeds_only.width() == 0.0 and both.width() > 0.1


def test_infinite_draws_give_infinite_bounds_not_nan():
    values = np.array([1.0, math.inf, math.inf, math.inf])
    interval = bootstrap_interval(lambda d: float(d[0].max()), Paired((values,)))
    assert interval.high == math.inf and not math.isnan(interval.low)


def test_paired_arrays_must_share_their_units():
    with pytest.raises(ValueError, match="share"):
        Paired((np.zeros(3), np.zeros(4)))
    with pytest.raises(ValueError, match="share"):
        Paired((np.zeros(3),), axes=2)


def test_contains_is_the_within_noise_rule():
    assert Interval(0.9, 1.1, 0.9).contains(1.0)
    assert not Interval(1.01, 1.1, 0.9).contains(1.0)
    assert str(Interval(0.9, math.inf, 0.9)) == "[0.900, inf]"


# ---------------------------------------------------------------------------------------------
# The gate's intervals and "within noise"

STEPS = (0, 50, 100)


def _seeds(name: str, finals: Sequence[float], lr: float | None = None, **kw) -> RunResult:
    curves = tuple((2.0, 1.0 + f, f) for f in finals)
    mean = tuple(float(x) for x in np.mean(curves, axis=0))
    return RunResult(
        task="t", horizon=100, optimizer=name, learning_rate=lr, val_loss=mean[-1],
        test_loss=mean[-1], test_accuracy=0.9, test_loss_curve=mean, curve_steps=STEPS,
        val_loss_per_seed=tuple(finals), test_loss_per_seed=tuple(finals),
        test_accuracy_per_seed=(0.9,) * len(finals), test_loss_curve_per_seed=curves, **kw,
    )


def _row(learned: Sequence[float], baseline: Sequence[float], horizon: int = 100, champion=None, **kw) -> SuiteRow:
    return SuiteRow(
        task="t", held_out=True, checkpoint="base", multiple=horizon // 100, horizon=horizon,
        learned=_seeds("l3rs", learned), baselines={"adam": _seeds("adam", baseline, 1e-3, **kw)},
        grids={}, champion=None if champion is None else _seeds("champion", champion),
    )


def test_a_clear_win_is_outside_noise():
    rows = [_row((0.10, 0.11, 0.12, 0.10, 0.11), (0.20, 0.21, 0.22, 0.20, 0.21))]
    decision = decide(rows, GateConfig(), 100, None)
    ratio = decision.checks[1]
    assert ratio.passed and ratio.within_noise is False
    assert ratio.interval.high < 1.0
    assert "within noise" not in decision.reason


def test_a_close_call_is_within_noise_but_decided_on_the_point_estimate():
    # The learned optimizer is better on average (0.195 vs 0.2) but loses on two seeds of five.
    rows = [_row((0.15, 0.24, 0.16, 0.23, 0.195), (0.20, 0.20, 0.20, 0.20, 0.20))]
    decision = decide(rows, GateConfig(), 100, None)
    ratio = decision.checks[1]
    assert ratio.value == pytest.approx(0.975) and ratio.passed  # point estimate decides
    assert ratio.within_noise is True and ratio.interval.contains(1.0)
    assert "within noise" in decision.reason and "within noise" in ratio.describe()


def test_a_close_failure_says_within_noise_in_the_reason():
    rows = [_row((0.25, 0.16, 0.24, 0.17, 0.205), (0.20, 0.20, 0.20, 0.20, 0.20))]
    decision = decide(rows, GateConfig(), 100, None)
    assert not decision.passed
    assert "worst test-loss ratio L3RS / best baseline, held out, T=100 (within noise)" in decision.reason


def test_the_champion_gap_gets_an_interval_over_paired_seeds():
    rows = [_row((0.10, 0.11, 0.12), (0.20, 0.21, 0.22), champion=(0.101, 0.111, 0.121))]
    gap = decide(rows, GateConfig(), 100, {"version": 1}).checks[2]
    assert gap.passed and gap.interval.high < 0.0 and gap.within_noise is False


def test_the_interval_settings_come_from_the_gate_config():
    rows = [_row((0.15, 0.24, 0.16, 0.23, 0.195), (0.20,) * 5)]
    wide = decide(rows, GateConfig(interval_level=0.99), 100, None).checks[1].interval
    narrow = decide(rows, GateConfig(interval_level=0.5), 100, None).checks[1].interval
    assert wide.level == 0.99 and narrow.width() < wide.width()
    with pytest.raises(ValueError, match="interval_level"):
        GateConfig(interval_level=1.0)


def test_per_example_losses_make_the_rows_resample_test_examples():
    rng = np.random.default_rng(0)
    learned_examples = rng.exponential(0.1, size=(3, 50, 3)) + np.array([1.0, 0.5, 0.0])
    row = _row((0.1, 0.1, 0.1), (0.2, 0.2, 0.2))
    assert row_sample(row).axes == 1
    row = dataclasses.replace(
        row,
        learned=dataclasses.replace(row.learned, test_example_loss_curves=learned_examples),
        baselines={"adam": dataclasses.replace(row.baselines["adam"], test_example_loss_curves=learned_examples * 2)},
    )
    sample = row_sample(row)
    assert sample.axes == 2 and sample.units == (3, 50)
    assert sample.arrays[1].shape == (3, 50, 1)  # [seeds, examples, baselines]


def test_summarize_keeps_per_example_losses_when_the_unroll_reports_them():
    n = 3

    def trajectory(example_losses):
        return Trajectory(
            params={}, train_loss=np.zeros(4), eval_steps=np.arange(n) * 2,
            eval_loss=np.ones((2, n), np.float32), eval_accuracy=np.ones((2, n), np.float32),
            eval_example_loss=example_losses,
        )

    val = np.zeros((n, 4))
    test = np.arange(n * 5, dtype=np.float32).reshape(n, 5)  # [E + 1, N]
    test[1, 2] = np.nan
    runs = [trajectory((val, test)), trajectory((val, test + 1))]
    curves = example_loss_curves(runs)
    assert curves.shape == (2, 5, n)  # [seeds, examples, curve points]
    assert curves[0, 2, 1] == math.inf and curves[1, 0, 2] == test[2, 0] + 1
    assert example_loss_curves(runs[:1] + [runs[1]._replace(eval_example_loss=None)]) is None  # a run without them: none
    result = summarize(runs, type("T", (), {"name": "t"})(), 4, "adam", 1e-3)
    assert result.test_example_loss_curves is not None and "test_example_loss_curves" not in result.to_json()


# ---------------------------------------------------------------------------------------------
# The default suite and the report


def test_the_default_suite_includes_schedule_free_adamw_and_extends_grids():
    suite = get_config("default").validation
    assert suite.baselines == ("adam", "adam_cosine", "schedule_free_adamw")
    assert suite.grid_extensions > 0
    assert ValidationConfig().baselines == suite.baselines
    assert get_config("tiny").validation.baselines == ("adam",)  # tests stay seconds
    with pytest.raises(ValueError, match="grid_extensions"):
        get_config("default", {"validation": {"grid_extensions": -1}})


def test_the_report_shows_intervals_and_flags_a_best_point_left_at_an_edge():
    edge = dict(grid_points=10, grid_extensions=(0, 4), grid_interior=False, grid_note="best at the high edge after 4 of 4 extensions (cap)")
    rows = (
        _row((0.10, 0.11, 0.12), (0.20, 0.21, 0.22), grid_points=6, grid_interior=True),
        _row((0.10, 0.11, 0.12), (0.20, 0.21, 0.22), horizon=400, **edge),
    )
    report = ValidationReport(100, rows, decide(rows, GateConfig(), 100, None), ValidationConfig())
    table = report.table()
    assert "adam@1e-03*" in table and table.count("adam@1e-03*") == 1
    assert "adam on t (base, T=400) at lr 0.001: best at the high edge after 4 of 4 extensions (cap)" in table
    assert "90% CI" in table and "paired bootstrap over 3 seeds" in table
    data = report.to_json()
    interval = data["rows"][0]["loss_ratio_interval"]
    assert interval["low"] <= rows[0].loss_ratio <= interval["high"]
    assert data["rows"][1]["baselines"]["adam"]["grid_interior"] is False
    assert data["gate"]["checks"][1]["within_noise"] is False
    metrics = report.metrics()
    assert metrics["val/t/base/T400/adam_grid_interior"] == 0.0
    assert metrics["val/t/base/T100/loss_ratio_ci_low"] <= rows[0].loss_ratio
    assert any(k.endswith("/within_noise") for k in metrics)
