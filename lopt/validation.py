"""Validation of a meta-trained optimizer against tuned Adam, and the promotion gate.

For every validation task and every horizon multiple (1× and 2× the meta-training horizon by
default) the learned optimizer and Adam — its learning rate tuned on that very task, horizon
and seeds — fine-tune the same pretrained model with the same fresh heads and minibatches.
The report keeps every number; the gate reads only the held-out tasks.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

from lopt.config import ValidationConfig
from lopt.baselines import get_baseline
from lopt.evaluation import RunResult, evaluate_l3rs, tune
from lopt.l3rs import L3RS, MetaParams
from lopt.models import ModelSpec, Params
from lopt.tasks import load_task


@dataclasses.dataclass(frozen=True)
class Comparison:
    held_out: bool
    learned: RunResult
    adam: RunResult
    adam_grid: tuple[RunResult, ...]

    @property
    def loss_ratio(self) -> float:
        """Tuned Adam's test loss over the learned optimizer's (> 1: the learned one wins)."""
        return self.adam.test_loss / self.learned.test_loss

    def to_json(self) -> dict[str, Any]:
        return {
            "task": self.learned.task,
            "horizon": self.learned.horizon,
            "held_out": self.held_out,
            "loss_ratio": self.loss_ratio,
            "learned": self.learned.to_json(),
            "adam": self.adam.to_json(),
            "adam_grid": [r.to_json() for r in self.adam_grid],
        }


@dataclasses.dataclass(frozen=True)
class GateDecision:
    passed: bool
    reason: str


@dataclasses.dataclass(frozen=True)
class ValidationReport:
    meta_horizon: int
    comparisons: tuple[Comparison, ...]
    gate: GateDecision

    def to_json(self) -> dict[str, Any]:
        return {
            "meta_horizon": self.meta_horizon,
            "gate": dataclasses.asdict(self.gate),
            "comparisons": [c.to_json() for c in self.comparisons],
        }

    def metrics(self) -> dict[str, float]:
        """Flat metrics for MLflow, e.g. ``val/sklearn_digits/T400/l3rs_test_loss``."""
        out: dict[str, float] = {"val/gate_passed": float(self.gate.passed)}
        for c in self.comparisons:
            prefix = f"val/{_metric_name(c.learned.task)}/T{c.learned.horizon}"
            out[f"{prefix}/l3rs_test_loss"] = c.learned.test_loss
            out[f"{prefix}/l3rs_test_accuracy"] = c.learned.test_accuracy
            out[f"{prefix}/adam_test_loss"] = c.adam.test_loss
            out[f"{prefix}/adam_test_accuracy"] = c.adam.test_accuracy
            out[f"{prefix}/adam_learning_rate"] = float(c.adam.learning_rate or 0.0)
            out[f"{prefix}/loss_ratio"] = c.loss_ratio
        return out

    def table(self) -> str:
        header = (
            f"{'task':<24} {'held out':>8} {'T':>5} {'L3RS loss':>10} {'acc':>6} "
            f"{'Adam loss':>10} {'acc':>6} {'Adam lr':>8} {'ratio':>6}"
        )
        rows = [header, "-" * len(header)]
        for c in self.comparisons:
            rows.append(
                f"{c.learned.task:<24} {('yes' if c.held_out else 'no'):>8} {c.learned.horizon:>5} "
                f"{c.learned.test_loss:>10.4f} {c.learned.test_accuracy:>6.3f} "
                f"{c.adam.test_loss:>10.4f} {c.adam.test_accuracy:>6.3f} "
                f"{c.adam.learning_rate:>8.0e} {c.loss_ratio:>6.2f}"
            )
        rows.append(f"gate: {'PASSED' if self.gate.passed else 'not passed'} — {self.gate.reason}")
        return "\n".join(rows)


def _metric_name(task: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "_-." else "_" for ch in task).strip("_")


def gate(comparisons: Sequence[Comparison], meta_horizon: int) -> GateDecision:
    """Passes when the learned optimizer's test loss beats tuned Adam on every held-out task
    at the meta-training horizon."""
    at_horizon = [c for c in comparisons if c.held_out and c.learned.horizon == meta_horizon]
    if not at_horizon:
        return GateDecision(False, "no held-out task was validated at the meta-training horizon")
    losing = [c.learned.task for c in at_horizon if not c.loss_ratio > 1.0]
    if losing:
        return GateDecision(False, f"tuned Adam is as good or better on {', '.join(losing)} at T={meta_horizon}")
    return GateDecision(True, f"beats tuned Adam on all {len(at_horizon)} held-out task(s) at T={meta_horizon}")


def validate(
    l3rs: L3RS,
    theta: MetaParams,
    spec: ModelSpec,
    pretrained: Params,
    config: ValidationConfig,
    meta_horizon: int,
    data_dir: str | os.PathLike | None = None,
) -> ValidationReport:
    comparisons = []
    suites = [(t, True) for t in config.tasks] + [(t, False) for t in config.reference_tasks]
    for task_spec, held_out in suites:
        task = load_task(task_spec, spec.input_shape, data_dir)
        for multiple in config.horizon_multiples:
            horizon = multiple * meta_horizon
            best, grid = tune(
                get_baseline("adam"), spec, pretrained, task, horizon, config.seeds,
                config.batch_size, config.adam_learning_rates,
            )
            learned = evaluate_l3rs(
                l3rs, theta, spec, pretrained, task, horizon, config.seeds, config.batch_size
            )
            comparisons.append(Comparison(held_out, learned, best, tuple(grid)))
    return ValidationReport(meta_horizon, tuple(comparisons), gate(comparisons, meta_horizon))
