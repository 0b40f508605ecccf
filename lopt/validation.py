"""Validation of a meta-trained optimizer on a held-out suite, and the promotion gate.

Like TFX's Evaluator "blessing" a model before it is pushed, nothing becomes ``champion``
unless this module says it earned it, and the report says why. The suite
(:class:`lopt.config.ValidationConfig`) fine-tunes the pretrained model on held-out tasks at
1×, 2× and 4× the meta-training horizon T, over several fresh-head seeds and additional
pretrained checkpoints, with the learned optimizer and with every configured baseline tuned
over its learning-rate grid on that very task and horizon (:mod:`lopt.baselines`, the same
implementation the quality benchmark uses).

Selection and reporting are kept apart: a baseline's learning rate is chosen on the
validation split; every number the gate reads is on the test split. Each row's *target* is
the best tuned baseline's final test loss, and **steps-to-target** is ``horizon / s`` where
``s`` is the first step at which the learned optimizer's mean test-loss curve reaches that
loss (:func:`lopt.evaluation.steps_to_target`; per seed too, against the same baseline's
per-seed loss).

The gate (:func:`decide`) checks three things, each printed with its threshold: a median
steps-to-target over the held-out rows at T, no regression at the longest horizon, and a
lower mean log test loss than the current champion optimizer on the same rows.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
from typing import Any, Callable, Mapping, Sequence

from lopt.baselines import get_baseline
from lopt.config import GateConfig, ValidationConfig
from lopt.evaluation import RunResult, evaluate_l3rs, steps_to_target, tune
from lopt.l3rs import L3RS, MetaParams
from lopt.models import ModelSpec, Params
from lopt.tasks import Task, TaskSpec, load_task

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
    name: str
    value: float | None
    threshold: str
    passed: bool


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

    def to_json(self) -> dict[str, Any]:
        return {
            "meta_horizon": self.meta_horizon,
            "gate": self.gate.to_json(),
            "gate_config": dataclasses.asdict(self.config.gate),
            "suite": {
                "seeds": list(self.config.seeds),
                "horizon_multiples": list(self.config.horizon_multiples),
                "baselines": list(self.config.baselines),
                "grid_size": self.config.grid_size,
                "checkpoint_seeds": list(self.config.checkpoint_seeds),
            },
            "champion": dict(self.champion) if self.champion else None,
            "datasets": [dict(d) for d in self.datasets],
            "rows": [r.to_json() for r in self.rows],
            "table": self.table(),
        }

    def metrics(self) -> dict[str, float]:
        """Flat metrics for MLflow, e.g. ``val/sklearn_digits/base/T400/l3rs_test_loss``."""
        out: dict[str, float] = {"val/gate_passed": float(self.gate.passed)}
        for check in self.gate.checks:
            if check.value is not None and math.isfinite(check.value):
                out[f"val/gate/{_metric_name(check.name)}"] = check.value
        for r in self.rows:
            prefix = f"val/{_metric_name(r.task)}/{r.checkpoint}/T{r.horizon}"
            best = r.best_baseline
            out[f"{prefix}/l3rs_test_loss"] = r.learned.test_loss
            out[f"{prefix}/l3rs_test_accuracy"] = r.learned.test_accuracy
            out[f"{prefix}/best_baseline_test_loss"] = best.test_loss
            out[f"{prefix}/best_baseline_test_accuracy"] = best.test_accuracy
            out[f"{prefix}/loss_ratio"] = r.loss_ratio
            stt = r.steps_to_target
            out[f"{prefix}/steps_to_target"] = 0.0 if stt is None else min(stt, 1e6)
            for name, result in r.baselines.items():
                out[f"{prefix}/{name}_test_loss"] = result.test_loss
                out[f"{prefix}/{name}_learning_rate"] = float(result.learning_rate or 0.0)
            for seed, loss in zip(self.config.seeds, r.learned.test_loss_per_seed):
                out[f"{prefix}/seed{seed}/l3rs_test_loss"] = loss
            if r.champion is not None:
                out[f"{prefix}/champion_test_loss"] = r.champion.test_loss
        return {k: v for k, v in out.items() if math.isfinite(v)}

    def table(self) -> str:
        header = (
            f"{'task':<32} {'ckpt':<6} {'T':>5} {'L3RS loss':>10} {'acc':>6} "
            f"{'best baseline':>26} {'loss':>8} {'acc':>6} {'ratio':>6} {'steps-to-target':>16}"
        )
        lines = [header, "-" * len(header)]
        for r in self.rows:
            best = r.best_baseline
            name = f"{best.optimizer}@{best.learning_rate:.0e}"
            task = r.task + ("" if r.held_out else " (ref)")
            lines.append(
                f"{task:<32} {r.checkpoint:<6} {r.horizon:>5} {r.learned.test_loss:>10.4f} "
                f"{r.learned.test_accuracy:>6.3f} {name:>26} {best.test_loss:>8.4f} "
                f"{best.test_accuracy:>6.3f} {r.loss_ratio:>6.2f} {_times(r.steps_to_target):>16}"
            )
        lines.append("")
        lines.append(f"gate: {'PASSED' if self.gate.passed else 'not passed'} — {self.gate.reason}")
        for c in self.gate.checks:
            value = "n/a" if c.value is None else f"{c.value:.3f}"
            lines.append(f"  [{'x' if c.passed else ' '}] {c.name}: {value} (needs {c.threshold})")
        return "\n".join(lines)


def _times(value: float | None) -> str:
    if value is None:
        return "not reached"
    return "at start" if math.isinf(value) else f"{value:.2f}x"


def _metric_name(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "_-." else "_" for ch in text).strip("_")


def _mean_log_loss(results: Sequence[RunResult]) -> float:
    return statistics.fmean(math.log(max(r.test_loss, 1e-12)) for r in results)


def decide(
    rows: Sequence[SuiteRow], gate: GateConfig, meta_horizon: int, champion: Mapping[str, Any] | None
) -> GateDecision:
    """The gate: every check of :class:`lopt.config.GateConfig` on the held-out rows."""
    held_out = [r for r in rows if r.held_out]
    if not held_out:
        return GateDecision(False, "the suite has no held-out task")
    checks = []

    at_t = [r for r in held_out if r.horizon == meta_horizon]
    speedups = [r.steps_to_target or 0.0 for r in at_t]
    median = statistics.median(speedups) if speedups else None
    checks.append(Check(
        f"median steps-to-target vs best tuned baseline, held out, T={meta_horizon}",
        median, f">= {gate.min_steps_to_target:g}",
        median is not None and median >= gate.min_steps_to_target,
    ))

    longest = max(r.horizon for r in held_out)
    worst = max(r.learned.test_loss / r.best_baseline.test_loss for r in held_out if r.horizon == longest)
    limit = 1.0 + gate.longest_horizon_tolerance
    checks.append(Check(
        f"worst test-loss ratio L3RS / best baseline, held out, T={longest}",
        worst, f"<= {limit:g}", worst <= limit,
    ))

    if gate.beat_champion:
        compared = [r for r in held_out if r.champion is not None]
        if champion is None or not compared:
            checks.append(Check("beats the current champion (none to compare)", None, "lower mean log test loss", True))
        else:
            mine = _mean_log_loss([r.learned for r in compared])
            theirs = _mean_log_loss([r.champion for r in compared])
            checks.append(Check(
                f"mean log test loss minus champion v{champion['version']}'s, held out",
                mine - theirs, "< 0", mine < theirs,
            ))

    failed = [c.name for c in checks if not c.passed]
    if failed:
        return GateDecision(False, "failed: " + "; ".join(failed), tuple(checks))
    return GateDecision(True, f"passed all {len(checks)} checks", tuple(checks))


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
    plan += [(checkpoints[0], t, False, m) for t in config.reference_tasks for m in config.horizon_multiples]
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
            )
            baselines[name], grids[name] = best, tuple(grid)
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
