"""Registration: the validated optimizer becomes ``l3rs-<base>@challenger`` with its lineage,
``@champion`` when the gate passed; the pipeline run's MLflow run closes with the summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lopt.store import registry
from lopt.hub import CHALLENGER, CHAMPION, promote_optimizer, register_optimizer
from lopt.optim.l3rs import L3RS
from lopt.store.lineage import code_version, data_hash
from lopt.store.serialization import read_optimizer

from pipeline.steps.context import StepContext
from pipeline.steps.mlflow_run import close_run, records_failure
from pipeline.steps.select import SELECTION
from pipeline.steps.staleness import data_lineage


@records_failure("register")
def register_validated_optimizer(
    *, ctx: StepContext, optimizer_dir: str, report_path: str, pipeline_run: str = ""
) -> dict[str, Any]:
    """Registers the optimizer as ``l3rs-<base>@challenger`` with its lineage, promotes it to
    ``@champion`` when the gate passed (the old champion becomes ``@previous``), closes the
    pipeline's MLflow run, and returns a summary.

    Promotion is compare-and-set: if another run moved ``@champion`` after this run's
    validation compared against it, this version stays challenger and says so.
    """
    report = json.loads(Path(report_path).read_text())
    if report.get("skipped"):
        return _close_skipped(ctx, report)
    l3rs, theta, header = read_optimizer(Path(optimizer_dir))
    base = registry.resolve(ctx.base_model_uri, ctx.tracking_uri)
    lineage = _lineage(ctx, header, optimizer_dir, pipeline_run)
    name, version, promotion = _register_and_promote(ctx, base, l3rs, theta, header, report, lineage)
    registry.set_run_tags(ctx.run_id, {"optimizer_version": version, "promoted": promotion["promoted"]}, ctx.tracking_uri)
    aliases = [CHALLENGER] + ([CHAMPION] if promotion["promoted"] else [])
    return close_run(ctx.run_id, {
        "optimizer": name,
        "version": version,
        "aliases": aliases,
        "uri": f"models:/{name}@{aliases[-1]}",
        "base_model": f"{base.name}/{base.version}",
        "gate": report["gate"],
        "promotion": promotion,
        "table": report["table"],
        "mlflow_run_id": ctx.run_id,
        "tracking_uri": _shown_tracking_uri(ctx),
        "html_report": report.get("html_report"),
        "skipped": False,
    }, ctx.tracking_uri)


def _close_skipped(ctx: StepContext, report: dict[str, Any]) -> dict[str, Any]:
    """Meta-training was skipped: nothing to register, the champion stays; the run closes."""
    registry.set_run_tags(ctx.run_id, {"skipped": "true"}, ctx.tracking_uri)
    champion = registry.resolve(report["champion"], ctx.tracking_uri)
    return close_run(ctx.run_id, {
        "skipped": True, "reason": report["reason"], "optimizer": champion.name,
        "version": champion.version, "aliases": list(champion.aliases),
        "uri": f"models:/{champion.name}@{CHAMPION}", "base_model": ctx.base_model_uri,
        "table": report["table"], "mlflow_run_id": ctx.run_id,
        "tracking_uri": _shown_tracking_uri(ctx),
    }, ctx.tracking_uri)


def _shown_tracking_uri(ctx: StepContext) -> str:
    return registry.redact(registry.resolve_tracking_uri(ctx.tracking_uri))


def _lineage(ctx: StepContext, header: dict[str, Any], optimizer_dir: str, pipeline_run: str) -> dict[str, str]:
    """What the optimizer was made from, as the registered version's tags: config, code, data,
    the runs, and (after a fan-out) which variant won and how every candidate scored."""
    datasets = data_lineage(ctx.config, ctx.base_model.info["input_shape"], ctx.data_dir)
    lineage = {
        "config_hash": header.get("config_hash", ""),
        "code_version": code_version(),
        "pipeline_run": pipeline_run,
        "mlflow_run_id": ctx.run_id,
        "datasets": json.dumps([{k: v for k, v in d.items()} for d in datasets], sort_keys=True),
        "data_hash": data_hash(datasets),
    }
    selection_file = Path(optimizer_dir) / SELECTION
    if selection_file.is_file():
        selection = json.loads(selection_file.read_text())
        lineage["selected_variant"] = selection["selected_variant"]
        lineage["selection"] = json.dumps(selection["candidates"], sort_keys=True)
    return lineage


def _description(base: registry.ModelVersionInfo, header: dict[str, Any], gate: dict[str, Any], lineage: dict[str, str]) -> str:
    meta = header.get("meta_training") or {}
    return (
        f"L3RS learned optimizer for {base.name} v{base.version}, meta-trained "
        f"{meta.get('meta_steps', '?')} steps ({meta.get('estimator', 'es')}) at horizon "
        f"{header['horizon']} on {meta.get('family', '?')}; config {lineage['config_hash']}, "
        f"code {lineage['code_version']}. Validation gate: {gate['reason']}."
    )


def _register_and_promote(
    ctx: StepContext, base: registry.ModelVersionInfo, l3rs: L3RS, theta: Any,
    header: dict[str, Any], report: dict[str, Any], lineage: dict[str, str],
) -> tuple[str, int, dict[str, Any]]:
    """Registers the version (challenger) and, when the gate passed, promotes it against the
    champion the validation compared with; returns its name, version and the promotion."""
    gate = report["gate"]
    expected_champion = (report.get("champion") or {}).get("version")
    try:
        name, version = register_optimizer(
            base, l3rs, theta, header["horizon"], run_id=ctx.run_id,
            tags={"gate_passed": str(gate["passed"]).lower(), "gate_reason": gate["reason"], **lineage},
            description=_description(base, header, gate, lineage),
            report=report,
            tracking_uri=ctx.tracking_uri,
        )
        promotion = (
            promote_optimizer(name, version, expected_champion, tracking_uri=ctx.tracking_uri)
            if gate["passed"] else {"promoted": False, "reason": "the validation gate did not pass"}
        )
    except BaseException:
        registry.end_run(ctx.run_id, "FAILED", ctx.tracking_uri)
        raise
    return name, version, promotion
