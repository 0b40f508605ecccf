"""ES with many pairs per meta-step, on an accelerator: does a cleaner estimate buy progress?

On this project's 2-core machines, an 8-pair antithetic ES estimate of the ~400-dimensional
meta-gradient is nearly pure noise (``estimators.py``: two independent estimates have a cosine
of 0.007), and 1,500 s of it random-walked around the start. The noise falls as 1/pairs. On a
GPU, hundreds of pairs ``vmap``-ed into one program (``lopt.meta.estimator.samples_per_program``)
cost little more than one, so this benchmark meta-trains with ``--pairs`` pairs per step and
measures the meta-validation loss along the way:

    meta-val loss at H = mean over N fixed task draws of the meta-training family (classes,
                         transform, head, minibatch order; keys meta-training never uses) of
                         the task's validation loss after an H-step unroll with θ,

at H = T (the meta-training horizon) and 4T. Everything is selected on the family alone; the
held-out datasets are never seen here. The θ with the lowest mean log meta-val loss over both
horizons is written as ``best/``, the last one as ``last/``: optimizer directories that
``quality.py --optimizer DIR`` evaluates on the held-out tasks (on CPU, against tuned
baselines).

The accelerator machine has JAX, optax, flax and orbax but neither MLflow nor TFDS, so the
inputs travel as arrays:

    .venv/bin/python benchmarks/es_pairs.py export .device/es_inputs     # here: registry + TFDS
    python3 benchmarks/es_pairs.py train .device/es_inputs --pairs 512 --seconds 300 --output $OUT

``train`` also times the budget's own config (``--time-pairs``, 8 for ``full``) for a few
meta-steps at each of its horizons, to project that config's meta-training time on the device.
It stops meta-training after ``--seconds`` of meta-training clock or when ``--stop-by``
seconds have passed since it started, whichever comes first, and rewrites its JSON and the
optimizer directories after every evaluation, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

STARTED = time.perf_counter()
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))  # The device machine runs the checkout, not an installed lopt.

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402
import numpy as np  # noqa: E402

from lopt.config import get_config, merge_overrides, parse_overrides  # noqa: E402
from lopt.meta.es import AntitheticES  # noqa: E402
from lopt.meta.estimator import FinalValidationLoss  # noqa: E402
from lopt.optim.l3rs import L3RS, MetaParams  # noqa: E402
from lopt.optim.layout import LayerLayout  # noqa: E402
from lopt.meta.loop import make_estimator, meta_train  # noqa: E402
from lopt.inner.models import with_fresh_head  # noqa: E402
from lopt.store.serialization import read_model, write_model, write_optimizer  # noqa: E402
from lopt.inner.tasks import TaskFamily, TaskFamilySpec  # noqa: E402

EVAL_SEED = 20_261_129  # the meta-validation draws of estimators.py
BASE_MODEL = "cnn-mnist"


def export(args: argparse.Namespace) -> None:
    """Writes the benchmark home's base model and the budget's meta-training family."""
    from lopt import paths

    paths.pin_home(args.home, create=False)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from lopt.store import registry
    from lopt.hub import load_pretrained
    from lopt.inner.tasks import load_task_family
    from pipeline.steps import StepContext, prepare_base_model

    base = prepare_base_model(ctx=StepContext.create(budget="default"), base_model=BASE_MODEL)
    registry.end_run(base["run_id"], "FINISHED")
    _, pretrained, info = load_pretrained(base["base_model_uri"])
    spec = info["spec"]
    cfg = get_config(args.budget, args.overrides).meta_train
    family = load_task_family(cfg.family, spec.input_shape)
    write_model(args.inputs / "model", spec, pretrained, {"base_model_uri": base["base_model_uri"]})
    np.savez_compressed(args.inputs / "family.npz", train=np.asarray(family.train), val=np.asarray(family.val))
    (args.inputs / "family.json").write_text(json.dumps(
        {"spec": family.spec.to_json(), "content_hash": family.content_hash, "version": family.version,
         "train_counts": None if family.train_counts is None else list(family.train_counts)},
        indent=1,
    ))
    print(f"wrote {args.inputs}: {base['base_model_uri']}, family {family.spec.name} "
          f"train {family.train.shape} val {family.val.shape}")


def load_inputs(inputs: Path) -> tuple[Any, Any, TaskFamily, str]:
    spec, pretrained, header = read_model(inputs / "model")
    meta = json.loads((inputs / "family.json").read_text())
    arrays = np.load(inputs / "family.npz")
    family_spec = TaskFamilySpec(**{
        k: tuple(v) if isinstance(v, list) else v for k, v in meta["spec"].items()
    })
    # A multi-source family's slots repeat a smaller source's examples: the counts say how many
    # are distinct, so a task drawn here samples as one drawn where the family was loaded.
    counts = meta.get("train_counts")
    family = TaskFamily(
        family_spec, jnp.asarray(arrays["train"]), jnp.asarray(arrays["val"]),
        meta["content_hash"], meta["version"], None if counts is None else tuple(counts),
    )
    return spec, jax.tree.map(jnp.asarray, pretrained), family, header["base_model_uri"]


def with_spec(family: TaskFamily, spec: TaskFamilySpec) -> TaskFamily:
    """The exported family's arrays sampled as the config's ``spec`` says: overrides of how
    tasks are drawn (classes per task, transforms, train_per_class) apply; what the arrays
    hold (dataset, class pool, validation fraction) must match the export."""
    data = lambda s: (s.sources, s.classes, s.val_fraction, s.max_per_class)
    if data(spec) != data(family.spec):
        raise SystemExit(
            f"The config's family {spec.name} (val_fraction {spec.val_fraction}) is other data "
            f"than the exported {family.spec.name} (val_fraction {family.spec.val_fraction}): "
            "export again with the same budget and overrides."
        )
    return dataclasses.replace(family, spec=spec)


def remaining(args: argparse.Namespace) -> float:
    return args.stop_by - (time.perf_counter() - STARTED)


@dataclasses.dataclass
class Setup:
    """What ``train`` and ``probe`` share: the config with ``--pairs``, the optimizer's
    architecture, its start θ and the meta-validation of a θ at T and 4T."""

    config: Any
    l3rs: L3RS
    spec: Any
    pretrained: Any
    family: TaskFamily
    base_uri: str
    theta: MetaParams
    train_key: jax.Array
    eval_horizons: tuple[int, ...]
    meta_val: dict[int, Any]
    keys: jax.Array

    @property
    def cfg(self) -> Any:
        return self.config.meta_train

    def evaluate(self, theta: MetaParams) -> dict[str, float]:
        return {f"meta_val_loss@{h}": float(jnp.mean(jnp.exp(f(theta, self.keys)))) for h, f in self.meta_val.items()}

    def score(self, point: dict[str, Any]) -> float:
        """The mean log meta-val loss over the evaluated horizons (lower is better)."""
        return sum(math.log(point[f"meta_val_loss@{h}"]) for h in self.eval_horizons) / len(self.eval_horizons)

    def report(self, args: argparse.Namespace, benchmark: str) -> dict[str, Any]:
        return {
            "benchmark": benchmark,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "argv": sys.argv,
            "budget": args.budget,
            "config": self.config.to_json(),
            "base_model_uri": self.base_uri,
            "family": self.family.spec.name,
            "num_meta_parameters": sum(int(x.size) for x in jax.tree.leaves(self.theta)),
            "devices": [str(d) for d in jax.devices()],
            "versions": {"python": platform.python_version(), "jax": jax.__version__},
            "eval_tasks": args.eval_tasks,
            "eval_horizons": list(self.eval_horizons),
        }


def setup(args: argparse.Namespace, extra: dict[str, Any] | None = None) -> Setup:
    jax.config.update("jax_default_matmul_precision", "highest")  # no TF32: CPU's numerics
    spec, pretrained, family, base_uri = load_inputs(args.inputs)
    overrides = merge_overrides(parse_overrides(args.overrides), {"meta_train": {"num_pairs": args.pairs, **(extra or {})}})
    config = get_config(args.budget, overrides)
    cfg = config.meta_train
    family = with_spec(family, cfg.family)
    head = with_fresh_head(spec, pretrained, family.num_classes, jax.random.key(0))
    l3rs = L3RS(cfg.l3rs, LayerLayout.from_params(head))
    init_key, train_key = jax.random.split(jax.random.key(cfg.seed))
    eval_horizons = (cfg.horizon, 4 * cfg.horizon)
    meta_val = {
        h: jax.jit(jax.vmap(FinalValidationLoss(l3rs, spec, pretrained, family, h, cfg.batch_size), in_axes=(None, 0)))
        for h in eval_horizons
    }
    keys = jax.random.split(jax.random.key(EVAL_SEED), args.eval_tasks)
    return Setup(config, l3rs, spec, pretrained, family, base_uri, l3rs.init(init_key), train_key,
                 eval_horizons, meta_val, keys)


def train(args: argparse.Namespace) -> dict[str, Any]:
    run = setup(args, {} if args.outer_lr is None else {"outer_learning_rate": args.outer_lr})
    cfg = run.cfg
    estimator = make_estimator(cfg, run.l3rs, run.spec, run.pretrained, run.family)
    report = run.report(args, "es_pairs")
    report.update({
        "samples_per_program": {h: e.samples_per_program for h, e in estimator.estimators.items()},
        "points": [],
        "full_config_timing": None,
    })
    args.output.mkdir(parents=True, exist_ok=True)

    def record(point: dict[str, Any], theta: MetaParams) -> None:
        point["score"] = run.score(point)
        report["points"].append(point)
        best = min(report["points"], key=lambda p: p["score"])
        report["best"] = best
        report["wall_seconds"] = round(time.perf_counter() - STARTED, 1)
        extra = {"meta_training": {"benchmark": "es_pairs", "meta_steps": point["meta_steps"], "num_pairs": cfg.num_pairs},
                 "base_model_uri": run.base_uri, "config_hash": run.config.hash()}
        write_optimizer(args.output / "last", run.l3rs, theta, cfg.horizon, extra)
        if best is point:
            write_optimizer(args.output / "best", run.l3rs, theta, cfg.horizon, extra)
        (args.output / "es_pairs.json").write_text(json.dumps(report, indent=1, allow_nan=False))
        print(f"{point['meta_steps']:5d} meta-steps {point['seconds']:7.1f} s  "
              + "  ".join(f"{k} {v:.4f}" for k, v in point.items() if k.startswith("meta_val"))
              + f"  (wall {report['wall_seconds']:.0f} s)", flush=True)

    t0 = time.perf_counter()
    record({"meta_steps": 0, "seconds": 0.0, **run.evaluate(run.theta)}, run.theta)
    print(f"meta-val programs: {time.perf_counter() - t0:.1f} s with compilation", flush=True)
    done, seconds = 0, 0.0
    with tempfile.TemporaryDirectory() as checkpoints:
        while seconds < args.seconds and remaining(args) > args.reserve:
            done += args.eval_every
            result = meta_train(
                estimator, run.theta, num_steps=done, learning_rate=cfg.outer_learning_rate,
                key=run.train_key, progress=False, checkpoint_dir=checkpoints, checkpoint_every=args.eval_every,
            )
            seconds = result.seconds
            history = result.history[-args.eval_every:]
            record({
                "meta_steps": done,
                "seconds": round(seconds, 2),
                "objective": float(np.mean([m["objective"] for m in history])),
                "gradient_norm": float(np.mean([m["gradient_norm"] for m in history])),
                **run.evaluate(result.theta),
            }, result.theta)
    report["full_config_timing"] = time_config(args, run.l3rs, run.spec, run.pretrained, run.family)
    report["wall_seconds"] = round(time.perf_counter() - STARTED, 1)
    (args.output / "es_pairs.json").write_text(json.dumps(report, indent=1, allow_nan=False))
    print(json.dumps({"best": report["best"], "full_config_timing": report["full_config_timing"]}, indent=1))
    return report


def probe(args: argparse.Namespace) -> dict[str, Any]:
    """How much signal ES has at the start θ, and how much a step along it buys.

    For each σ: ``--estimates`` independent ``--pairs``-pair estimates of the meta-gradient at
    T (the start θ, fresh task draws each); the mean pairwise cosine of those estimates (the
    fraction of an estimate's power that is signal) and the cosine between the means of their
    two halves; then the meta-val loss at T and 4T after a step of each ``--steps`` size
    (per-coordinate RMS) against the mean of all estimates.
    """
    run = setup(args)
    report = run.report(args, "es_pairs.probe")
    report["start"] = {**run.evaluate(run.theta)}
    report["sigmas"] = {}
    args.output.mkdir(parents=True, exist_ok=True)
    _, unflatten = ravel_pytree(run.theta)
    cosine = lambda a, b: float(jnp.dot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))  # noqa: E731
    print(f"start: {report['start']}", flush=True)
    for sigma in args.sigmas:
        if remaining(args) < 30:
            print(f"no time left for sigma {sigma}", flush=True)
            break
        objective = FinalValidationLoss(run.l3rs, run.spec, run.pretrained, run.family, run.cfg.horizon, run.cfg.batch_size)
        es = AntitheticES(objective, num_pairs=args.pairs, sigma=sigma)
        t0 = time.perf_counter()
        estimates = [es(run.theta, jax.random.fold_in(jax.random.key(7), i)).gradient for i in range(args.estimates)]
        grads = jax.block_until_ready(jnp.stack([ravel_pytree(g)[0] for g in estimates]))
        seconds = time.perf_counter() - t0
        n = len(estimates)
        pairwise = [cosine(grads[i], grads[j]) for i in range(n) for j in range(i + 1, n)]
        half = n // 2
        mean = jnp.mean(grads, axis=0)
        result: dict[str, Any] = {
            "seconds_with_compilation": round(seconds, 1),
            "mean_pairwise_cosine": float(np.mean(pairwise)),
            "halves_cosine": cosine(jnp.mean(grads[:half], axis=0), jnp.mean(grads[half:], axis=0)),
            "pairs_per_half": half * args.pairs,
            "mean_gradient_rms": float(jnp.sqrt(jnp.mean(mean ** 2))),
            "steps": {},
        }
        mean_tree = unflatten(mean)
        rms = result["mean_gradient_rms"]
        for step in args.steps:
            theta = jax.tree.map(lambda t, g: t - step * g / rms, run.theta, mean_tree)
            result["steps"][str(step)] = run.evaluate(theta)
        report["sigmas"][str(sigma)] = result
        print(f"sigma {sigma}: {json.dumps(result)}", flush=True)
        (args.output / "es_probe.json").write_text(json.dumps(report, indent=1, allow_nan=False))
    report["wall_seconds"] = round(time.perf_counter() - STARTED, 1)
    (args.output / "es_probe.json").write_text(json.dumps(report, indent=1, allow_nan=False))
    return report


def time_config(args: argparse.Namespace, l3rs: L3RS, spec: Any, pretrained: Any, family: TaskFamily) -> dict[str, Any] | None:
    """Seconds per meta-step of the budget's own config at each of its horizons (the first
    step, which compiles, excluded) and the projected time of its ``meta_steps``."""
    cfg = get_config(args.budget, args.overrides).meta_train
    estimator = make_estimator(cfg, l3rs, spec, pretrained, family)
    theta = l3rs.init(jax.random.key(0))
    per_step: dict[int, float] = {}
    compile_seconds: dict[int, float] = {}
    for horizon, es in sorted(estimator.estimators.items()):
        if remaining(args) < 25:
            print(f"no time left to time the {cfg.num_pairs}-pair config at T={horizon}", flush=True)
            break
        t0 = time.perf_counter()
        jax.block_until_ready(es(theta, jax.random.key(1)))
        compile_seconds[horizon] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        for i in range(args.time_steps):
            jax.block_until_ready(es(theta, jax.random.key(2 + i)))
        per_step[horizon] = (time.perf_counter() - t0) / args.time_steps
    if not per_step:
        return None
    timing = {
        "num_pairs": cfg.num_pairs,
        "meta_steps": cfg.meta_steps,
        "seconds_per_step": {str(h): round(s, 4) for h, s in per_step.items()},
        "first_step_seconds": {str(h): s for h, s in compile_seconds.items()},
    }
    if len(per_step) == len(estimator.estimators):
        # Horizons are drawn uniformly per meta-step.
        timing["projected_seconds"] = round(cfg.meta_steps * float(np.mean(list(per_step.values()))), 1)
    print(f"{cfg.num_pairs}-pair config: {timing}", flush=True)
    return timing


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="write the base model and family arrays (needs MLflow, TFDS)")
    e.add_argument("inputs", type=Path)
    e.add_argument("--budget", default="full")
    e.add_argument("--overrides", default="", help="JSON config overrides on top of the budget (its family's data)")
    e.add_argument("--home", type=Path, default=RESULTS / "home")
    t = sub.add_parser("train", help="meta-train from exported inputs (JAX, optax, flax, orbax only)")
    t.add_argument("inputs", type=Path)
    t.add_argument("--pairs", type=int, default=512, help="ES pairs per meta-step")
    t.add_argument("--seconds", type=float, default=400.0, help="meta-training clock to spend at most")
    t.add_argument("--stop-by", type=float, default=520.0, help="wall seconds since start to finish by")
    t.add_argument("--reserve", type=float, default=110.0, help="wall seconds before --stop-by that meta-training leaves to timing the config")
    t.add_argument("--eval-every", type=int, default=10, help="meta-steps between evaluations")
    t.add_argument("--eval-tasks", type=int, default=32, help="meta-validation task draws")
    t.add_argument("--time-steps", type=int, default=3, help="timed meta-steps per horizon of the budget's config")
    t.add_argument("--budget", default="full")
    t.add_argument("--overrides", default="", help="JSON config overrides on top of the budget")
    t.add_argument("--outer-lr", type=float, default=None, help="outer Adam learning rate (default: config)")
    t.add_argument("--output", type=Path, default=RESULTS / "es_pairs")
    q = sub.add_parser("probe", help="ES signal at the start θ and a line search along it")
    q.add_argument("inputs", type=Path)
    q.add_argument("--pairs", type=int, default=512, help="ES pairs per estimate")
    q.add_argument("--estimates", type=int, default=8, help="independent estimates per sigma")
    q.add_argument("--sigmas", type=float, nargs="+", default=[0.05, 0.2])
    q.add_argument("--steps", type=float, nargs="+", default=[0.03, 0.1, 0.3], help="per-coordinate RMS step sizes")
    q.add_argument("--stop-by", type=float, default=300.0, help="wall seconds since start to finish by")
    q.add_argument("--eval-tasks", type=int, default=32, help="meta-validation task draws")
    q.add_argument("--budget", default="full")
    q.add_argument("--overrides", default="", help="JSON config overrides on top of the budget")
    q.add_argument("--output", type=Path, default=RESULTS / "es_pairs")
    args = p.parse_args(argv)
    if args.command == "export":
        args.inputs.mkdir(parents=True, exist_ok=True)
        export(args)
    elif args.command == "probe":
        probe(args)
    else:
        train(args)


if __name__ == "__main__":
    main()
