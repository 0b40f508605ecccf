"""The whole pipeline in one process, for notebooks and debugging (the pipeline is the
product)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pipeline.steps.context import StepContext
from pipeline.steps.meta_train import meta_train_optimizer
from pipeline.steps.prepare import prepare_base_model
from pipeline.steps.register import register_validated_optimizer
from pipeline.steps.select import select_optimizer
from pipeline.steps.validate import validate_optimizer


def run_all(
    *,
    ctx: StepContext,
    base_model: str = "cnn-mnist",
    workdir: str | os.PathLike = ".",
    variants: tuple[str, ...] = ("",),
    if_stale: bool = False,
) -> dict[str, Any]:
    """All steps in pipeline order, the fan-out run in turn; the steps share one context, so
    the base model is read once."""
    work = Path(workdir)
    base = prepare_base_model(ctx=ctx, base_model=base_model, if_stale=if_stale)
    ctx = ctx.for_run(base_model_uri=base["base_model_uri"], run_id=base["run_id"])
    candidates = [str(work / "candidates" / str(i)) for i in range(len(variants))]
    for directory, variant in zip(candidates, variants):
        meta_train_optimizer(
            ctx=ctx, output_dir=directory, retrain=base["retrain"], reason=base["reason"], variant=variant,
        )
    optimizer_dir, report_path = str(work / "optimizer"), str(work / "report.json")
    select_optimizer(ctx=ctx, candidate_dirs=candidates, output_dir=optimizer_dir)
    validate_optimizer(ctx=ctx, optimizer_dir=optimizer_dir, report_path=report_path)
    return register_validated_optimizer(ctx=ctx, optimizer_dir=optimizer_dir, report_path=report_path)
