"""The fan-in of the meta-training fan-out: the candidate that scores best on the
meta-objective goes on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lopt.store import registry
from lopt.config import variant_label
from lopt.optim.l3rs import L3RS
from lopt.meta.estimator import FinalValidationLoss
from lopt.store.serialization import read_optimizer
from lopt.inner.tasks import load_task_family

from pipeline.steps.context import StepContext
from pipeline.steps.meta_train import skipped
from pipeline.steps.mlflow_run import records_failure

# Selection draws its meta-validation tasks from a key no meta-training run uses (runs split
# jax.random.key(seed) for small seeds), so the comparison is on fresh draws of the family.
SELECTION_SEED = 2**31 - 1
SELECTION = "selection.json"


@records_failure("select-best")
def select_optimizer(*, ctx: StepContext, candidate_dirs: list[str], output_dir: str) -> dict[str, Any]:
    """The fan-in of a meta-training fan-out: copies the best candidate to ``output_dir``.

    Candidates are scored by the meta-objective itself (mean log final validation loss at
    the meta-training horizon) on ``meta_train.selection_tasks`` fresh draws of the
    meta-training task family, the same draws for all. The held-out validation datasets are
    never looked at here: choosing by them would tune on the set the gate reports. One
    candidate, or skipped meta-training (every candidate is the champion), passes straight
    through. ``selection.json`` in the output records the scores.
    """
    if not candidate_dirs:
        raise ValueError("No meta-training candidates to select from: the fan-out produced none.")
    any_skipped = any(skipped(d) for d in candidate_dirs)
    # Each candidate is read once: its variant names it, its θ is scored.
    loaded = [] if any_skipped else [read_optimizer(Path(d)) for d in candidate_dirs]
    labels = (
        ["skipped"] * len(candidate_dirs) if any_skipped
        else [variant_label(header.get("meta_training", {}).get("variant", "")) for _, _, header in loaded]
    )
    scores: list[float | None] = [None] * len(candidate_dirs)
    if len(loaded) > 1:
        scores = _selection_scores(ctx, loaded)
    best = int(np.argmin(scores)) if scores[0] is not None else 0
    out = Path(output_dir)
    shutil.copytree(candidate_dirs[best], out, dirs_exist_ok=True)
    selection = {
        "selected": best,
        "selected_variant": labels[best],
        "candidates": [{"variant": label, "score": score} for label, score in zip(labels, scores)],
    }
    (out / SELECTION).write_text(json.dumps(selection, indent=1))
    if scores[0] is not None:
        logger = registry.RunLogger(ctx.run_id, ctx.tracking_uri)
        logger.log_metrics({f"select/{label}/score": s for label, s in zip(labels, scores)})
        logger.set_tags({"selected_variant": labels[best]})
        print("selection (mean log meta-validation loss): " + ", ".join(
            f"{label or 'base'}={s:.4f}" for label, s in zip(labels, scores)
        ) + f"; selected {labels[best] or 'base'}")
    return selection


def _selection_scores(ctx: StepContext, candidates: list[tuple[L3RS, Any, dict[str, Any]]]) -> list[float]:
    cfg = ctx.config.meta_train
    base = ctx.base_model
    family = load_task_family(cfg.family, base.spec.input_shape, ctx.data_dir)
    keys = jax.random.split(jax.random.key(SELECTION_SEED), cfg.selection_tasks)
    scores = []
    for l3rs, theta, _ in candidates:
        # The unroll inside is jitted with the architecture as a static argument: candidates
        # of one architecture share a compilation.
        objective = FinalValidationLoss(
            l3rs, base.spec, base.params, family, cfg.horizon,
            cfg.batch_size, start=cfg.start,
        )
        # One host sync per candidate, not one per task.
        scores.append(float(jnp.mean(jnp.stack([objective(theta, key) for key in keys]))))
    return scores
