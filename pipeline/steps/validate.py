"""Validation: the optimizer against tuned baselines (and the champion) on the held-out
suite; the gate's verdict goes to the register step."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from lopt.store import registry
from lopt.eval.evaluation import pretrain
from lopt.hub import CHAMPION, load_optimizer, optimizer_name
from lopt.optim.l3rs import L3RS, LayerLayout
from lopt.inner.models import ModelSpec, Params
from lopt.store.serialization import read_optimizer
from lopt.inner.tasks import load_task
from lopt.eval.validation import PRIMARY, Checkpoint, validate

from pipeline.steps.context import StepContext
from pipeline.steps.meta_train import skipped
from pipeline.steps.mlflow_run import records_failure
from pipeline.steps.report import finite, write_plots


@records_failure("validate")
def validate_optimizer(
    *, ctx: StepContext, optimizer_dir: str, report_path: str, html_path: str = ""
) -> dict[str, Any]:
    """Runs the validation suite (:mod:`lopt.eval.validation`) on the optimizer in
    ``optimizer_dir``; writes the JSON report, logs its numbers to the MLflow run, and writes
    the plots and HTML report (also to ``html_path`` when given) and logs them there too."""
    config = ctx.config
    uri = ctx.tracking_uri
    passed_on = skipped(optimizer_dir)
    if passed_on is not None:
        data = {**passed_on, "table": f"validation skipped: {passed_on['reason']}"}
        Path(report_path).parent.mkdir(parents=True, exist_ok=True)
        Path(report_path).write_text(json.dumps(data, indent=1))
        return data
    l3rs, theta, header = read_optimizer(Path(optimizer_dir))
    base = ctx.base_model
    checkpoints = [Checkpoint(PRIMARY, base.params)] + [
        Checkpoint(f"seed{seed}", _extra_checkpoint(ctx, base.spec, seed))
        for seed in config.validation.checkpoint_seeds
    ]
    champion = _current_champion(base.info["name"], l3rs.layout, uri)
    champion_arg = None
    if champion is not None:
        champion_l3rs, champion_theta, champion_info = champion
        print(f"validate: comparing with the champion {champion_info['uri']}"
              + (f" — not compared: {champion_info['note']}" if not champion_info["compared"] else ""))
        if champion_l3rs is not None:
            champion_arg = (champion_l3rs, champion_theta, champion_info)
    report = validate(
        l3rs, theta, base.spec, checkpoints, config.validation, header["horizon"], ctx.data_dir,
        champion=champion_arg,
    )
    data = finite(report.to_json())
    if champion is not None and champion_arg is None:
        data["champion"] = champion[2]
    registry.log_metrics(ctx.run_id, report.metrics(), tracking_uri=uri)
    held_out = load_task(config.validation.tasks[0], base.spec.input_shape, ctx.data_dir) if config.validation.tasks else None
    html = write_plots(data, l3rs, theta, base.spec, base.params, held_out, header["horizon"], config, ctx.run_id)
    registry.log_artifacts(ctx.run_id, html.parent, "validation", tracking_uri=uri)
    data["html_report"] = str(html)
    if html_path:
        Path(html_path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(html, html_path)
    Path(report_path).parent.mkdir(parents=True, exist_ok=True)
    Path(report_path).write_text(json.dumps(data, indent=1, allow_nan=False))
    print(report.table())
    print(f"report: {html}")
    return data


def _extra_checkpoint(ctx: StepContext, spec: ModelSpec, seed: int) -> Params:
    """Another pretrained checkpoint of the base model's architecture (pretraining seed)."""
    cfg = ctx.config.pretrain
    task = load_task(cfg.task, spec.input_shape, ctx.data_dir)
    params, metrics = pretrain(
        spec.with_num_classes(task.num_classes), task, cfg.steps, cfg.learning_rate, cfg.batch_size, seed
    )
    print(f"validate: checkpoint seed{seed} pretrained on {task.name}, test accuracy {metrics['test_accuracy']:.3f}")
    return params


def _current_champion(
    base_model: str, layout: LayerLayout, tracking_uri: str | None
) -> tuple[L3RS | None, Any, dict[str, Any]] | None:
    """The champion optimizer of ``base_model`` to compare against, if there is one.

    Returns ``(architecture, θ, info)``; architecture and θ are None (and ``info["note"]``
    says why) when the champion cannot run on this model's layers.
    """
    name = optimizer_name(base_model)
    if not registry.alias_exists(name, CHAMPION, tracking_uri):
        return None
    version = registry.resolve(f"models:/{name}@{CHAMPION}", tracking_uri)
    l3rs, theta, _ = load_optimizer(version.uri, tracking_uri)
    info = {"name": name, "version": version.version, "uri": version.uri, "compared": True, "note": ""}
    problems = l3rs.layout.differences(layout)
    if problems:
        info.update(compared=False, note="the champion was meta-trained for other layers: " + "; ".join(problems))
        return None, None, info
    return l3rs, theta, info
