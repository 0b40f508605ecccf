"""Validation of a meta-trained optimizer on a held-out suite, and the promotion gate.

Like TFX's Evaluator "blessing" a model before it is pushed, nothing becomes ``champion``
unless this module says it earned it, and the report says why. The suite
(:class:`lopt.config.ValidationConfig`) fine-tunes the pretrained model on held-out tasks at
1×, 2× and 4× the meta-training horizon T, over several fresh-head seeds and additional
pretrained checkpoints, with the learned optimizer and with every configured baseline tuned
over its learning-rate grid on that very task and horizon (:mod:`lopt.optim.baselines`, the same
implementation the quality benchmark uses).

Selection and reporting are kept apart: a baseline's learning rate is chosen on the
validation split; every number the gate reads is on the test split. Each row's *target* is
the best tuned baseline's final test loss, and **steps-to-target** is ``horizon / s`` where
``s`` is the first step at which the learned optimizer's mean test-loss curve reaches that
loss (:func:`lopt.eval.evaluation.steps_to_target`; per seed too, against the same baseline's
per-seed loss).

Every baseline is tuned by one rule (:func:`lopt.eval.evaluation.search_grid`): its grid grows
past an edge that holds the best point until the best is interior, so a learned optimizer
never wins against an under-tuned baseline without the report saying so.

The gate (:func:`decide`) checks three things, each printed with its threshold: a median
steps-to-target over the held-out rows at T, no regression at the longest horizon, and a
lower mean log test loss than the current champion optimizer on the same rows. It decides on
the point estimates; each comes with a paired bootstrap interval (:mod:`lopt.eval.bootstrap`, over
seeds, and test examples when the runs recorded per-example losses) and a "within noise"
flag when that interval contains the threshold, and so does each row's loss ratio.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import statistics
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from lopt.optim.baselines import get_baseline
from lopt.eval.bootstrap import Interval, Paired, Statistic, bootstrap_interval
from lopt.config import GateConfig, ValidationConfig
from lopt.eval.evaluation import RunResult, evaluate_l3rs, steps_to_target, tune
from lopt.optim.l3rs import L3RS, MetaParams
from lopt.inner.models import ModelSpec, Params
from lopt.paths import safe_name
from lopt.inner.tasks import Task, TaskSpec, load_task

PRIMARY = "base"  # the checkpoint name of the registered base model in reports


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A pretrained starting point: the registered base model, or another pretraining seed."""

    name: str
    params: Params


@dataclasses.dataclass(frozen=True)
class SuiteRow:
    """One task, checkpoint and horizon: the learned optimizer against the tuned baselines."""

    task: str
    held_out: bool
    checkpoint: str
    multiple: int
    horizon: int
    learned: RunResult
    baselines: Mapping[str, RunResult]  # name -> the grid point chosen on validation loss
    grids: Mapping[str, tuple[RunResult, ...]]
    champion: RunResult | None = None

    @property
    def best_baseline(self) -> RunResult:
        """The target: the tuned baseline with the lowest final test loss."""
        return min(self.baselines.values(), key=lambda r: r.test_loss)

    @property
    def steps_to_target(self) -> float | None:
        best = self.best_baseline
        return steps_to_target(
            self.learned.curve_steps, self.learned.test_loss_curve, best.test_loss, self.horizon
        )

    @property
    def steps_to_target_per_seed(self) -> tuple[float | None, ...]:
        best = self.best_baseline
        return tuple(
            steps_to_target(self.learned.curve_steps, curve, target, self.horizon)
            for curve, target in zip(self.learned.test_loss_curve_per_seed, best.test_loss_per_seed)
        )

    @property
    def loss_ratio(self) -> float:
        """The best baseline's test loss over the learned optimizer's (> 1: learned wins)."""
        return self.best_baseline.test_loss / self.learned.test_loss

    def to_json(self) -> dict[str, Any]:
        best = self.best_baseline
        return {
            "task": self.task,
            "held_out": self.held_out,
            "checkpoint": self.checkpoint,
            "multiple": self.multiple,
            "horizon": self.horizon,
            "best_baseline": best.optimizer,
            "best_baseline_learning_rate": best.learning_rate,
            "target_test_loss": best.test_loss,
            "steps_to_target": self.steps_to_target,
            "steps_to_target_per_seed": list(self.steps_to_target_per_seed),
            "loss_ratio": self.loss_ratio,
            "learned": self.learned.to_json(),
            "baselines": {name: r.to_json() for name, r in self.baselines.items()},
            "grids": {name: [r.to_json() for r in grid] for name, grid in self.grids.items()},
            "champion": None if self.champion is None else self.champion.to_json(),
        }


@dataclasses.dataclass(frozen=True)
class Check:
    """One gate figure: decided on ``value``; ``interval`` is its paired bootstrap interval,
    and ``within_noise`` says whether it contains the threshold (the decision could flip on
    another draw of seeds and test examples)."""

    name: str
    value: float | None
    threshold: str
    passed: bool
    interval: Interval | None = None
    within_noise: bool | None = None

    def describe(self) -> str:
        value = "n/a" if self.value is None else f"{self.value:.3f}"
        text = f"{self.name}: {value} (needs {self.threshold})"
        if self.interval is not None:
            text += f", {self.interval.level:.0%} CI {self.interval}"
            text += " — within noise" if self.within_noise else " — outside noise"
        return text


@dataclasses.dataclass(frozen=True)
class GateDecision:
    passed: bool
    reason: str
    checks: tuple[Check, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"passed": self.passed, "reason": self.reason, "checks": [dataclasses.asdict(c) for c in self.checks]}


@dataclasses.dataclass(frozen=True)
class ValidationReport:
    meta_horizon: int
    rows: tuple[SuiteRow, ...]
    gate: GateDecision
    config: ValidationConfig
    champion: Mapping[str, Any] | None = None  # the champion compared against: name, version
    datasets: tuple[Mapping[str, str], ...] = ()

    def held_out(self, horizon: int | None = None) -> list[SuiteRow]:
        return [r for r in self.rows if r.held_out and (horizon is None or r.horizon == horizon)]

    @functools.cached_property
    def ratio_intervals(self) -> tuple[Interval, ...]:
        """Each row's loss-ratio interval (computed once: table, JSON and metrics share it)."""
        return tuple(loss_ratio_interval(r, self.config.gate) for r in self.rows)

    @property
    def resampled(self) -> str:
        """What the bootstrap resamples, in words."""
        examples = all(row_sample(r).axes == 2 for r in self.rows) if self.rows else False
        units = "seeds × test examples" if examples else "seeds (per-example losses not recorded)"
        return f"paired bootstrap over {len(self.config.seeds)} {units}"

    def to_json(self) -> dict[str, Any]:
        rows = []
        for r, interval in zip(self.rows, self.ratio_intervals):
            rows.append({**r.to_json(), "loss_ratio_interval": dataclasses.asdict(interval)})
        return {
            "meta_horizon": self.meta_horizon,
            "gate": self.gate.to_json(),
            "gate_config": dataclasses.asdict(self.config.gate),
            "suite": {
                "seeds": list(self.config.seeds),
                "horizon_multiples": list(self.config.horizon_multiples),
                "baselines": list(self.config.baselines),
                "grid_size": self.config.grid_size,
                "grid_extensions": self.config.grid_extensions,
                "checkpoint_seeds": list(self.config.checkpoint_seeds),
                "intervals": self.resampled,
            },
            "champion": dict(self.champion) if self.champion else None,
            "datasets": [dict(d) for d in self.datasets],
            "rows": rows,
            "table": self.table(),
        }

    def metrics(self) -> dict[str, float]:
        """Flat metrics for MLflow, e.g. ``val/sklearn_digits/base/T400/l3rs_test_loss``."""
        out: dict[str, float] = {"val/gate_passed": float(self.gate.passed)}
        for check in self.gate.checks:
            name = f"val/gate/{safe_name(check.name).strip('_')}"
            if check.value is not None and math.isfinite(check.value):
                out[name] = check.value
            if check.interval is not None:
                out[f"{name}/ci_low"] = check.interval.low
                out[f"{name}/ci_high"] = check.interval.high
                out[f"{name}/within_noise"] = float(bool(check.within_noise))
        for r, interval in zip(self.rows, self.ratio_intervals):
            prefix = f"val/{safe_name(r.task).strip('_')}/{r.checkpoint}/T{r.horizon}"
            best = r.best_baseline
            out[f"{prefix}/l3rs_test_loss"] = r.learned.test_loss
            out[f"{prefix}/l3rs_test_accuracy"] = r.learned.test_accuracy
            out[f"{prefix}/best_baseline_test_loss"] = best.test_loss
            out[f"{prefix}/best_baseline_test_accuracy"] = best.test_accuracy
            out[f"{prefix}/loss_ratio"] = r.loss_ratio
            out[f"{prefix}/loss_ratio_ci_low"] = interval.low
            out[f"{prefix}/loss_ratio_ci_high"] = interval.high
            stt = r.steps_to_target
            out[f"{prefix}/steps_to_target"] = 0.0 if stt is None else min(stt, 1e6)
            for name, result in r.baselines.items():
                out[f"{prefix}/{name}_test_loss"] = result.test_loss
                out[f"{prefix}/{name}_learning_rate"] = float(result.learning_rate or 0.0)
                out[f"{prefix}/{name}_grid_points"] = float(result.grid_points)
                if result.grid_interior is not None:
                    out[f"{prefix}/{name}_grid_interior"] = float(result.grid_interior)
            for seed, loss in zip(self.config.seeds, r.learned.test_loss_per_seed):
                out[f"{prefix}/seed{seed}/l3rs_test_loss"] = loss
            if r.champion is not None:
                out[f"{prefix}/champion_test_loss"] = r.champion.test_loss
        return {k: v for k, v in out.items() if math.isfinite(v)}

    def table(self) -> str:
        level = f"{self.config.gate.interval_level:.0%} CI"
        header = (
            f"{'task':<32} {'ckpt':<6} {'T':>5} {'L3RS loss':>10} {'acc':>6} "
            f"{'best baseline':>28} {'loss':>8} {'acc':>6} {'ratio':>6} {level:>16} "
            f"{'steps-to-target':>16}"
        )
        lines = [header, "-" * len(header)]
        for r, interval in zip(self.rows, self.ratio_intervals):
            best = r.best_baseline
            edge = "" if best.grid_interior is not False else "*"
            name = f"{best.optimizer}@{best.learning_rate:.0e}{edge}"
            task = r.task + ("" if r.held_out else " (ref)")
            lines.append(
                f"{task:<32} {r.checkpoint:<6} {r.horizon:>5} {r.learned.test_loss:>10.4f} "
                f"{r.learned.test_accuracy:>6.3f} {name:>28} {best.test_loss:>8.4f} "
                f"{best.test_accuracy:>6.3f} {r.loss_ratio:>6.2f} {str(interval):>16} "
                f"{_times(r.steps_to_target):>16}"
            )
        lines.append("")
        lines.append(
            f"ratio: best baseline / L3RS test loss (> 1: L3RS better); {level}: {self.resampled}."
        )
        lines.extend(self.grid_lines())
        lines.append("")
        lines.append(f"gate: {'PASSED' if self.gate.passed else 'not passed'} — {self.gate.reason}")
        for c in self.gate.checks:
            lines.append(f"  [{'x' if c.passed else ' '}] {c.describe()}")
        return "\n".join(lines)

    def grid_lines(self) -> list[str]:
        """How far the learning-rate grids went, and every selected point left at an edge
        (``*`` in the table): there the baseline may be better than reported."""
        tuned = [(r, name, b) for r in self.rows for name, b in r.baselines.items() if b.grid_points]
        if not tuned:
            return []
        points = [b.grid_points for _, _, b in tuned]
        extended = sum(1 for _, _, b in tuned if any(b.grid_extensions))
        lines = [
            f"learning-rate grids: {self.config.grid_size} points, {min(points)}–{max(points)} "
            f"run after extension (up to {self.config.grid_extensions} per side; "
            f"{extended} of {len(tuned)} extended)."
        ]
        for r, name, b in tuned:
            if b.grid_interior is False:
                lines.append(f"  * {name} on {r.task} ({r.checkpoint}, T={r.horizon}) at lr {b.learning_rate:.3g}: {b.grid_note}")
        if len(lines) == 1:
            lines[0] = lines[0][:-1] + "; every best point interior."
        return lines


def _times(value: float | None) -> str:
    if value is None:
        return "not reached"
    return "at start" if math.isinf(value) else f"{value:.2f}x"


def _mean_log_loss(results: Sequence[RunResult]) -> float:
    return statistics.fmean(math.log(max(r.test_loss, 1e-12)) for r in results)


# ---------------------------------------------------------------------------------------------
# The gate's figures as statistics of paired samples, for their bootstrap intervals. A row's
# sample is (learned test-loss curves, every selected baseline's final test loss), per seed
# ([S, E+1], [S, B]) or per seed and test example ([S, N, E+1], [S, N, B]) when every run
# recorded per-example losses; the champion's is (learned final, champion final).


def _per_seed(result: RunResult) -> tuple[np.ndarray, np.ndarray]:
    """Per-seed test-loss curves ``[S, E+1]`` and final losses ``[S]`` (the mean as one seed
    when a result kept no per-seed numbers)."""
    curves = result.test_loss_curve_per_seed or (result.test_loss_curve,)
    return np.asarray(curves, float), np.asarray(curves, float)[:, -1]


def row_sample(row: SuiteRow) -> Paired:
    """The row's paired sample: resampled over seeds, and test examples when recorded."""
    runs = list(row.baselines.values())
    if all(r.test_example_loss_curves is not None for r in [row.learned, *runs]):
        finals = np.stack([r.test_example_loss_curves[..., -1] for r in runs], axis=-1)
        return Paired((row.learned.test_example_loss_curves, finals), axes=2)
    finals = np.stack([_per_seed(r)[1] for r in runs], axis=-1)
    return Paired((_per_seed(row.learned)[0], finals), axes=1)


def champion_sample(row: SuiteRow) -> Paired:
    """The learned optimizer's and the champion's final test losses on the row's units
    (``row.champion`` must be set)."""
    if row.champion is None:
        raise ValueError(f"Row {row.task} T={row.horizon} has no champion run to compare with.")
    mine, theirs = row.learned.test_example_loss_curves, row.champion.test_example_loss_curves
    if mine is not None and theirs is not None:
        return Paired((mine[..., -1], theirs[..., -1]), axes=2)
    return Paired((_per_seed(row.learned)[1], _per_seed(row.champion)[1]), axes=1)


def _means(learned: np.ndarray, finals: np.ndarray) -> tuple[np.ndarray, float]:
    """The learned mean curve and the target (best baseline's mean final loss) of a draw;
    every axis but the last is a unit axis (seeds, examples)."""
    units = tuple(range(learned.ndim - 1))
    return learned.mean(axis=units), float(finals.mean(axis=units).min())


def _steps_statistic(row: SuiteRow) -> Callable[[np.ndarray, np.ndarray], float]:
    """Steps-to-target of one draw of ``row``'s sample; not reached counts 0, as in the gate."""

    def statistic(learned: np.ndarray, finals: np.ndarray) -> float:
        curve, target = _means(learned, finals)
        stt = steps_to_target(row.learned.curve_steps, curve, target, row.horizon)
        return 0.0 if stt is None else stt

    return statistic


def _loss_ratio(learned: np.ndarray, finals: np.ndarray) -> float:
    """The learned optimizer's final test loss over the best baseline's (< 1: learned wins)."""
    curve, target = _means(learned, finals)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = float(curve[-1] / target)
    return math.inf if math.isnan(ratio) else ratio  # inf / inf: both diverged, count as worst


def median_steps_statistic(rows: Sequence[SuiteRow]) -> Statistic:
    """The gate's first figure on one draw per row (``row_sample`` order)."""
    per_row = [_steps_statistic(r) for r in rows]
    return lambda *draws: statistics.median(f(*d) for f, d in zip(per_row, draws))


def worst_ratio_statistic(*draws: tuple[np.ndarray, np.ndarray]) -> float:
    """The gate's second figure: the largest learned / best-baseline loss ratio over rows."""
    return max(_loss_ratio(*d) for d in draws)


def champion_gap_statistic(*draws: tuple[np.ndarray, np.ndarray]) -> float:
    """Mean over rows of log(learned mean loss) − log(champion mean loss) (< 0: learned wins)."""
    logs = lambda x: math.log(max(float(x.mean()), 1e-12))
    return statistics.fmean(logs(mine) - logs(theirs) for mine, theirs in draws)


def gate_interval(gate: GateConfig, statistic: Statistic, samples: Sequence[Paired]) -> Interval:
    """The gate's interval settings applied to one figure (seed 0: reproducible reports)."""
    return bootstrap_interval(
        statistic, *samples, num_resamples=gate.bootstrap_resamples, level=gate.interval_level
    )


def loss_ratio_interval(row: SuiteRow, gate: GateConfig) -> Interval:
    """The interval of the row's loss ratio (best baseline / learned: > 1, learned wins)."""
    def inverse(draw: tuple[np.ndarray, np.ndarray]) -> float:
        ratio = _loss_ratio(*draw)
        return math.inf if ratio == 0.0 else 1.0 / ratio

    return gate_interval(gate, inverse, [row_sample(row)])


def _check(
    name: str, value: float | None, threshold: str, limit: float, passed: bool,
    interval: Interval | None,
) -> Check:
    noise = None if interval is None or value is None else interval.contains(limit)
    return Check(name, value, threshold, passed, interval, noise)


def decide(
    rows: Sequence[SuiteRow], gate: GateConfig, meta_horizon: int, champion: Mapping[str, Any] | None
) -> GateDecision:
    """The gate: every check of :class:`lopt.config.GateConfig` on the held-out rows.

    Decided on the point estimates, never on the intervals: the thresholds mean what they
    say. Each check carries its paired bootstrap interval and whether that interval contains
    the threshold ("within noise"), so the reason tells a clear decision from a close one.
    """
    held_out = [r for r in rows if r.held_out]
    if not held_out:
        return GateDecision(False, "the suite has no held-out task")
    checks = []

    at_t = [r for r in held_out if r.horizon == meta_horizon]
    speedups = [r.steps_to_target or 0.0 for r in at_t]
    median = statistics.median(speedups) if speedups else None
    interval = (
        gate_interval(gate, median_steps_statistic(at_t), [row_sample(r) for r in at_t])
        if at_t else None
    )
    checks.append(_check(
        f"median steps-to-target vs best tuned baseline, held out, T={meta_horizon}",
        median, f">= {gate.min_steps_to_target:g}", gate.min_steps_to_target,
        median is not None and median >= gate.min_steps_to_target, interval,
    ))

    longest = max(r.horizon for r in held_out)
    at_longest = [r for r in held_out if r.horizon == longest]
    worst = max(r.learned.test_loss / r.best_baseline.test_loss for r in at_longest)
    limit = 1.0 + gate.longest_horizon_tolerance
    checks.append(_check(
        f"worst test-loss ratio L3RS / best baseline, held out, T={longest}",
        worst, f"<= {limit:g}", limit, worst <= limit,
        gate_interval(gate, worst_ratio_statistic, [row_sample(r) for r in at_longest]),
    ))

    if gate.beat_champion:
        compared = [r for r in held_out if r.champion is not None]
        if champion is None or not compared:
            checks.append(Check("beats the current champion (none to compare)", None, "lower mean log test loss", True))
        else:
            mine = _mean_log_loss([r.learned for r in compared])
            theirs = _mean_log_loss([r.champion for r in compared])
            checks.append(_check(
                f"mean log test loss minus champion v{champion['version']}'s, held out",
                mine - theirs, "< 0", 0.0, mine < theirs,
                gate_interval(gate, champion_gap_statistic, [champion_sample(r) for r in compared]),
            ))

    failed = [c.name + (" (within noise)" if c.within_noise else "") for c in checks if not c.passed]
    if failed:
        return GateDecision(False, "failed: " + "; ".join(failed), tuple(checks))
    close = [c.name for c in checks if c.within_noise]
    note = f" (within noise: {'; '.join(close)})" if close else ""
    return GateDecision(True, f"passed all {len(checks)} checks{note}", tuple(checks))


def validate(
    l3rs: L3RS,
    theta: MetaParams,
    spec: ModelSpec,
    checkpoints: Sequence[Checkpoint],
    config: ValidationConfig,
    meta_horizon: int,
    data_dir: str | os.PathLike | None = None,
    champion: tuple[L3RS, MetaParams, Mapping[str, Any]] | None = None,
    progress: Callable[[str], Any] = print,
) -> ValidationReport:
    """Runs the suite; ``checkpoints[0]`` is the registered base model (all tasks and
    horizons), the others are validated on the held-out tasks at T only.

    ``champion``: the current champion optimizer (architecture, θ, registry info), evaluated
    on the held-out rows of the base checkpoint for the gate's comparison.
    """
    if not checkpoints:
        raise ValueError("validate needs at least the base model's checkpoint.")
    rows = []
    tasks: dict[str, Task] = {}

    def task_of(task_spec: TaskSpec) -> Task:
        if task_spec.name not in tasks:
            tasks[task_spec.name] = load_task(task_spec, spec.input_shape, data_dir)
        return tasks[task_spec.name]

    plan = [(checkpoints[0], t, True, m) for t in config.tasks for m in config.horizon_multiples]
    plan += [
        (checkpoints[0], t, False, m)
        for t in config.reference_tasks for m in config.reference_horizon_multiples
    ]
    plan += [(c, t, True, 1) for c in checkpoints[1:] for t in config.tasks]
    for checkpoint, task_spec, held_out, multiple in plan:
        task = task_of(task_spec)
        horizon = multiple * meta_horizon
        progress(f"validate: {task.name}, checkpoint {checkpoint.name}, T={horizon}")
        baselines, grids = {}, {}
        for name in config.baselines:
            baseline = get_baseline(name)
            best, grid = tune(
                baseline, spec, checkpoint.params, task, horizon, config.seeds,
                config.batch_size, baseline.grid(config.grid_size),
                max_extensions=config.grid_extensions,
            )
            # Only the selected points' per-example losses feed the intervals: drop the rest.
            baselines[name] = best
            grids[name] = tuple(dataclasses.replace(r, test_example_loss_curves=None) for r in grid)
        learned = evaluate_l3rs(
            l3rs, theta, spec, checkpoint.params, task, horizon, config.seeds, config.batch_size
        )
        champion_result = None
        if champion is not None and held_out and checkpoint is checkpoints[0]:
            champion_l3rs, champion_theta, _ = champion
            champion_result = evaluate_l3rs(
                champion_l3rs, champion_theta, spec, checkpoint.params, task, horizon,
                config.seeds, config.batch_size, name="champion",
            )
        rows.append(SuiteRow(
            task.name, held_out, checkpoint.name, multiple, horizon, learned, baselines, grids,
            champion_result,
        ))
    champion_info = None if champion is None else dict(champion[2])
    return ValidationReport(
        meta_horizon=meta_horizon,
        rows=tuple(rows),
        gate=decide(rows, config.gate, meta_horizon, champion_info),
        config=config,
        champion=champion_info,
        datasets=tuple(t.lineage() for t in tasks.values()),
    )
