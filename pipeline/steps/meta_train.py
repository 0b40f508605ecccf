"""Meta-training: one branch of the fan-out trains L3RS for the base model, or, when the
champion optimizer is up to date, passes the champion on marked skipped."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax

from lopt import paths
from lopt.store import registry
from lopt.meta.checkpointing import checkpoint_key
from lopt.config import get_config, variant_label, with_variant
from lopt.hub import CHAMPION, fetch_files, optimizer_name
from lopt.optim.l3rs import L3RS, LayerLayout
from lopt.meta.loop import make_estimator, meta_train
from lopt.inner.models import with_fresh_head
from lopt.store.serialization import write_optimizer
from lopt.inner.tasks import load_task_family

from pipeline.steps.context import StepContext
from pipeline.steps.mlflow_run import records_failure

# Written next to the champion's files when meta-training is skipped; the later steps read it.
SKIPPED = "skipped.json"


@records_failure("meta-train")
def meta_train_optimizer(
    *,
    ctx: StepContext,
    output_dir: str,
    progress: bool = True,
    checkpoint_dir: str = "",
    retrain: bool = True,
    reason: str = "",
    variant: str = "",
) -> dict[str, Any]:
    """Meta-trains L3RS for the base model with the configured estimator (antithetic ES by
    default); writes it to ``output_dir``.

    Checkpoints go to ``checkpoint_dir`` (default: under ``$LOPT_HOME/checkpoints``, named
    after the base model version and :func:`lopt.meta.checkpointing.checkpoint_key` of the config,
    the code and the task family's data). With ``retrain`` false (the champion
    optimizer is up to date, see :func:`~pipeline.steps.staleness.retrain_decision`), nothing
    is trained: the champion's files go to ``output_dir`` with a ``skipped.json`` that tells
    the later steps.

    ``variant`` (JSON ``meta_train`` overrides, see :func:`lopt.config.with_variant`) is one
    branch of a fan-out: it trains with the variant applied, logs its metrics under
    ``meta/<label>/``, and records the run's config hash (its identity for staleness) next to
    the variant's own.
    """
    config = get_config(ctx.budget, with_variant(ctx.overrides, variant))
    cfg = config.meta_train
    label = variant_label(variant)
    prefix = f"meta/{label}/" if label else "meta/"
    uri = ctx.tracking_uri
    if not retrain:
        return _skip_meta_training(ctx, output_dir, reason)
    base = ctx.base_model
    family = load_task_family(cfg.family, base.spec.input_shape, ctx.data_dir)
    # The layout is the fine-tuned model's: the pretrained body with a head for the task.
    head = with_fresh_head(base.spec, base.params, family.num_classes, jax.random.key(0))
    l3rs = L3RS(cfg.l3rs, LayerLayout.from_params(head))
    estimator = make_estimator(cfg, l3rs, base.spec, base.params, family)
    init_key, train_key = jax.random.split(jax.random.key(cfg.seed))
    logger = registry.RunLogger(ctx.run_id, uri)
    # Same base model, config, code and data: a rerun after a kill resumes where the last run
    # stopped; after an upgrade of lopt or with changed data, it starts over.
    checkpoints = checkpoint_dir or str(
        paths.checkpoints_dir()
        / paths.safe_name(f"{ctx.base_model_uri}-{checkpoint_key(config.hash(), family.content_hash)}")
    )
    result = meta_train(
        estimator,
        l3rs.init(init_key),
        num_steps=cfg.meta_steps,
        learning_rate=cfg.outer_learning_rate,
        key=train_key,
        on_step=lambda step, metrics: logger.log_metrics(
            {f"{prefix}{k}": v for k, v in metrics.items()}, step
        ),
        progress=progress,
        checkpoint_dir=checkpoints,
        checkpoint_every=cfg.checkpoint_every,
    )
    summary = {
        "meta_steps": cfg.meta_steps,
        "seconds": round(result.seconds, 2),
        "resumed_from": result.resumed_from,
        "first_objective": result.history[0]["objective"] if result.history else None,
        "last_objective": result.history[-1]["objective"] if result.history else None,
        "family": family.spec.name,
        "horizons": list(cfg.horizons or (cfg.horizon,)),
        "estimator": cfg.estimator,
        "start": cfg.start,
        "num_meta_parameters": sum(int(x.size) for x in jax.tree.leaves(result.theta)),
        "variant": variant,
        "variant_config_hash": config.hash(),
    }
    logger.log_metrics({f"{prefix}total_seconds": result.seconds})
    write_optimizer(
        Path(output_dir),
        l3rs,
        result.theta,
        cfg.horizon,
        {"meta_training": summary, "base_model_uri": ctx.base_model_uri, "config_hash": ctx.config.hash()},
    )
    # Metrics kept through an outage of the tracking server are written now, or reported lost
    # (a warning): never a reason to fail the step that holds the trained optimizer.
    logger.flush()
    return summary


def _skip_meta_training(ctx: StepContext, output_dir: str, reason: str) -> dict[str, Any]:
    base = registry.resolve(ctx.base_model_uri, ctx.tracking_uri)
    champion = registry.resolve(f"models:/{optimizer_name(base.name)}@{CHAMPION}", ctx.tracking_uri)
    out = fetch_files(champion.uri, output_dir, ctx.tracking_uri)
    summary = {"skipped": True, "reason": reason, "champion": champion.uri}
    (out / SKIPPED).write_text(json.dumps(summary))
    print(f"meta-training skipped: {reason}")
    return summary


def skipped(optimizer_dir: str) -> dict[str, Any] | None:
    """What meta-training wrote when it skipped (the champion passed on), else None."""
    path = Path(optimizer_dir) / SKIPPED
    return json.loads(path.read_text()) if path.is_file() else None
