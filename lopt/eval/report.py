"""The quality benchmark's arithmetic: steps-to-target records, their medians, the summary
per optimizer, the goals and the break-even count (``benchmarks/quality.py`` measures the runs;
everything here is pure and testable on synthetic curves).

Terms, per task and horizon (a :class:`Cell`):

* a **tuning** is how a baseline's learning rate was chosen: ``oracle`` (best validation loss on
  this task at this horizon) or ``practitioner`` (the reference task's best learning rate at the
  same horizon, used unchanged).
* the **best baseline** of a tuning is its tuned baseline with the lowest final *test* loss.
* **steps-to-target** of a run against a target is ``horizon / s``, where ``s`` is the first step
  at which the run's mean test-loss curve reaches the target's mean final test loss
  (:func:`lopt.eval.evaluation.steps_to_target`): 2.0 means "the same loss in half the steps";
  ``None`` when never reached, ``inf`` when the initial model already meets the target.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from typing import Any, Sequence

from lopt.eval.evaluation import RunResult, steps_to_target


# The specialized optimizer's name in the results: the one the goals and break-even are about.
MAIN = "l3rs"
ORACLE, PRACTITIONER = "oracle", "practitioner"
TUNINGS = (ORACLE, PRACTITIONER)

# Issue #3's goals, (goal, budget it is for, threshold): a threshold is the least steps-to-target
# that meets the goal; ``None`` marks the yes/no goal. The first four are for the `full` budget.
GOALS = (
    ("practitioner median steps-to-target on held-out tasks at T", "full", 2.5),
    ("steps-to-target on the meta-training task at T", "full", 3.0),
    ("oracle median steps-to-target on held-out tasks at T", "full", 1.5),
    ("final loss at 4T no worse than the best oracle baseline on held-out tasks", "full", None),
    ("practitioner median steps-to-target on held-out tasks at T (parity)", "default", 1.0),
)

# The rules and formulas in words, written into every report's JSON under "notes".
NOTES = {
    "selection": (
        "Baselines select their learning rate on the validation split (mean final loss over "
        "seeds); every reported number is on the test split. The learned optimizers are not "
        "tuned at all. Meta-training never sees the held-out datasets nor any test split."
    ),
    "best_baseline": (
        "At each task and horizon, the tuned baseline with the lowest final test loss (oracle "
        "and practitioner tunings separately); choosing it on the test split only makes the "
        "target harder for the learned optimizer."
    ),
    "steps_to_target": (
        "horizon / s, where s is the first step at which the learned optimizer's mean test-loss "
        "curve at that horizon reaches the best baseline's mean final test loss, interpolated "
        "linearly between evaluation points. null with status 'not reached' when it never does "
        "(final_loss_gap = learned minus target); status 'at start' (value null, meaning "
        "infinite) when the initial model already meets the target. Medians over tasks are "
        "null when a middle value is not reached."
    ),
    "practitioner": (
        "Each baseline at the learning rate that was best (validation split) on the "
        "meta-training reference task at the same horizon, unchanged on the held-out tasks; "
        "on the reference task itself it equals the oracle."
    ),
    "break_even": (
        "seconds_saved_per_run = (T - T / steps_to_target) * seconds_per_step of tuned Adam on "
        "that task (an unroll of max(T, 200) steps without evaluations, fastest of 3); runs = "
        "meta_training_seconds "
        "/ seconds_saved_per_run. runs_crediting_search = meta_training_seconds / "
        "(seconds_saved_per_run + grid_points * T * seconds_per_step): the learning-rate search "
        "a baseline needs on each new task and the learned optimizer does not. null: never "
        "repays (not reached, or no steps saved). Ignores the learned optimizer's per-step "
        "overhead (benchmarks/step_cost.py measures it)."
    ),
    "curves": (
        "Learned optimizers are measured at ~eval_points evenly spaced steps, baselines at "
        "~baseline_eval_points (their final losses are exact either way; baseline rows' "
        "steps-to-target read off the coarser curve)."
    ),
}


@dataclasses.dataclass
class Cell:
    """Everything measured on one task at one horizon (``multiple`` times the meta-training
    horizon T): every baseline's grid, the grid point each tuning selected, each learned
    optimizer's run, the seconds each took, and (filled in by :func:`cell_speedups`) the
    steps-to-target records."""

    task: str
    held_out: bool
    horizon: int
    multiple: int
    grids: dict[str, list[RunResult]]
    selected: dict[str, dict[str, RunResult]]  # tuning -> baseline -> the chosen grid point
    learned: dict[str, RunResult]
    seconds: dict[str, float]
    # name (a learned optimizer, or "<baseline>@<tuning>") -> tuning of the target -> record
    speedups: dict[str, dict[str, dict[str, Any]]] = dataclasses.field(default_factory=dict)

    def best_baseline(self, tuning: str) -> RunResult | None:
        chosen = self.selected.get(tuning)
        return min(chosen.values(), key=lambda r: r.test_loss) if chosen else None



def add_practitioner(cells: Sequence[Cell], reference: str) -> None:
    """Sets ``selected[PRACTITIONER]`` in every cell: each baseline's grid point at the learning
    rate its oracle tuning chose on the ``reference`` task at the same horizon (so on the
    reference task itself the practitioner equals the oracle)."""
    chosen = {
        c.horizon: {name: r.learning_rate for name, r in c.selected[ORACLE].items()}
        for c in cells
        if c.task == reference
    }
    for c in cells:
        c.selected[PRACTITIONER] = {
            name: next(r for r in grid if r.learning_rate == chosen[c.horizon][name])
            for name, grid in c.grids.items()
        }



def speedup(result: RunResult, target: RunResult) -> dict[str, Any]:
    """Steps-to-target of ``result`` against ``target``'s final test loss: ``value`` on the mean
    curves, ``per_seed`` on each seed's curve against the target's loss on that seed, each with
    its status ("reached", "not reached", "at start"), and ``final_loss_gap`` = result's final
    test loss minus the target's (positive: the result ended worse)."""
    value = steps_to_target(result.curve_steps, result.test_loss_curve, target.test_loss, result.horizon)
    per_seed = [
        steps_to_target(result.curve_steps, curve, loss, result.horizon)
        for curve, loss in zip(result.test_loss_curve_per_seed, target.test_loss_per_seed)
    ]
    return {
        "value": value,
        "status": _status(value),
        "target": {
            "optimizer": target.optimizer,
            "learning_rate": target.learning_rate,
            "test_loss": target.test_loss,
        },
        "final_loss_gap": result.test_loss - target.test_loss,
        "per_seed": per_seed,
        "per_seed_status": [_status(v) for v in per_seed],
    }


def _status(value: float | None) -> str:
    if value is None:
        return "not reached"
    return "at start" if math.isinf(value) else "reached"


def median_speedup(values: Sequence[float | None]) -> float | None:
    """The median steps-to-target over tasks, counting "not reached" (``None``) as slower than
    every reached value; ``None`` when the median involves a value that was not reached (or
    there are no values). ``inf`` ("at start") counts as the fastest."""
    if not values:
        return None
    median = statistics.median(-math.inf if v is None else v for v in values)
    return None if median == -math.inf or math.isnan(median) else median


def median_runs(values: Sequence[float | None]) -> float | None:
    """The median break-even count over tasks, counting "never" (``None``) as larger than every
    count; ``None`` when the median involves a "never" (or there are no values)."""
    if not values:
        return None
    median = statistics.median(math.inf if v is None else v for v in values)
    return None if math.isinf(median) else median


def cell_speedups(cell: Cell) -> dict[str, dict[str, dict[str, Any]]]:
    """name -> tuning -> :func:`speedup` record against that tuning's best baseline, for every
    learned optimizer (``name``) and every selected baseline (``"<baseline>@<tuning>"``)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for tuning in TUNINGS:
        best = cell.best_baseline(tuning)
        if best is None:
            continue
        for name, result in cell.learned.items():
            out.setdefault(name, {})[tuning] = speedup(result, best)
        for row_tuning in TUNINGS:
            for name, result in cell.selected.get(row_tuning, {}).items():
                out.setdefault(f"{name}@{row_tuning}", {})[tuning] = speedup(result, best)
    return out


def summarize_optimizer(
    cells: Sequence[Cell], name: str, meta_horizon: int
) -> dict[str, Any]:
    """Optimizer ``name``'s summary over ``cells`` (their ``speedups`` filled in):

    * ``held_out_median_<tuning>``: :func:`median_speedup` of its steps-to-target at T
      (``meta_horizon``) on the held-out tasks, and ``held_out_<tuning>`` the values per task;
    * ``meta_task``: its steps-to-target at T on the reference task, against the practitioner's
      best baseline (there the same as the oracle's);
    * ``held_out_mean_test_loss_at_T``: the mean over held-out tasks of its final test loss;
    * ``no_worse_at_longest``: per tuning and task at the longest horizon, whether its final test
      loss is <= the best baseline's.
    """
    at_t = [c for c in cells if c.horizon == meta_horizon]
    longest = max(c.horizon for c in cells)
    summary: dict[str, Any] = {"horizon": meta_horizon}
    for tuning in TUNINGS:
        values = [c.speedups[name][tuning]["value"] for c in at_t if c.held_out and tuning in c.speedups[name]]
        summary[f"held_out_median_{tuning}"] = median_speedup(values)
        summary[f"held_out_{tuning}"] = {
            c.task: c.speedups[name][tuning]["value"] for c in at_t if c.held_out and tuning in c.speedups[name]
        }
    reference = [c for c in at_t if not c.held_out]
    summary["meta_task"] = (
        reference[0].speedups[name][PRACTITIONER]["value"]
        if reference and PRACTITIONER in reference[0].speedups[name]
        else None
    )
    held_out_at_t = [c.learned[name].test_loss for c in at_t if c.held_out]
    summary["held_out_mean_test_loss_at_T"] = statistics.mean(held_out_at_t) if held_out_at_t else None
    summary["longest_horizon"] = longest
    summary["no_worse_at_longest"] = {
        tuning: {
            c.task: {
                "learned": c.learned[name].test_loss,
                "best_baseline": c.best_baseline(tuning).test_loss,
                "best_baseline_name": c.best_baseline(tuning).optimizer,
                "no_worse": c.learned[name].test_loss <= c.best_baseline(tuning).test_loss,
            }
            for c in cells
            if c.horizon == longest and c.best_baseline(tuning) is not None
        }
        for tuning in TUNINGS
    }
    return summary


def goals(summary: dict[str, Any], budget: str) -> list[dict[str, Any]]:
    """Each of :data:`GOALS` against :data:`MAIN`'s ``summary``: ``measured`` is the summary's
    number for it, ``met`` is ``measured >= threshold`` (never met when ``None``, not reached),
    or for the yes/no goal whether the learned optimizer's final loss at the longest horizon is
    no worse than the best oracle baseline on every held-out task. ``applies_to_this_run``:
    the goal is for ``budget``."""
    held_out_longest = [
        v["no_worse"] for task, v in summary["no_worse_at_longest"][ORACLE].items()
        if task in summary["held_out_oracle"]
    ]
    measured = [
        summary["held_out_median_practitioner"],
        summary["meta_task"],
        summary["held_out_median_oracle"],
        all(held_out_longest) if held_out_longest else None,
        summary["held_out_median_practitioner"],
    ]
    out = []
    for (goal, goal_budget, threshold), value in zip(GOALS, measured):
        if threshold is None:
            met = value
        else:
            met = value is not None and value >= threshold
        out.append({
            "goal": goal,
            "threshold": threshold,
            "budget": goal_budget,
            "applies_to_this_run": goal_budget == budget,
            "measured": value,
            "met": met,
            "longest_horizon": summary["longest_horizon"] if threshold is None else None,
        })
    return out


def break_even(
    cells: Sequence[Cell],
    step_seconds: dict[str, float],
    meta_seconds: float | None,
    meta_horizon: int,
    grid_points: int,
) -> dict[str, Any]:
    """How many fine-tuning runs repay :data:`MAIN`'s meta-training, per held-out task at T
    (``meta_horizon``) and tuning, where ``step_seconds`` has the task's seconds per step of
    tuned Adam::

        seconds_saved_per_run = (T - T / steps_to_target) * seconds_per_step
        runs                  = meta_seconds / seconds_saved_per_run
        runs_crediting_search = meta_seconds
                                / (seconds_saved_per_run + grid_points * T * seconds_per_step)

    ``runs`` is ``None`` ("never repays") when the target is not reached, nothing is saved or
    the meta-training seconds are unknown. Only the oracle gets ``runs_crediting_search``: it
    searches ``grid_points`` learning rates on every new task, the practitioner searched once.
    ``median``: :func:`median_runs` over tasks, per tuning.
    """
    per_task = {}
    for c in cells:
        if not c.held_out or c.horizon != meta_horizon or c.task not in step_seconds:
            continue
        step = step_seconds[c.task]
        search = grid_points * c.horizon * step
        entry: dict[str, Any] = {"adam_seconds_per_step": step, "search_seconds": search}
        for tuning in TUNINGS:
            if tuning not in c.speedups[MAIN]:
                continue
            value = c.speedups[MAIN][tuning]["value"]
            saved = None if value is None else (c.horizon - c.horizon / value) * step
            repays = saved is not None and saved > 0 and meta_seconds is not None
            entry[tuning] = {
                "steps_to_target": value,
                "seconds_saved_per_run": saved,
                "runs": meta_seconds / saved if repays else None,
            }
            if tuning == ORACLE:
                # Only the oracle searches on every new task; the practitioner searched once.
                entry[tuning]["runs_crediting_search"] = (
                    meta_seconds / (saved + search)
                    if saved is not None and meta_seconds is not None else None
                )
        per_task[c.task] = entry

    return {
        "meta_training_seconds": meta_seconds,
        "grid_points": grid_points,
        "per_task": per_task,
        "median": {
            tuning: {
                key: median_runs([t[tuning][key] for t in per_task.values() if key in t.get(tuning, {})])
                for key in ("runs", "runs_crediting_search")
                if any(key in t.get(tuning, {}) for t in per_task.values())
            }
            for tuning in TUNINGS
        },
        "formula": NOTES["break_even"],
    }

