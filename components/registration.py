"""Step 4: register the optimizer in MLflow (challenger; champion when the gate passed)."""

from kfp.dsl import Artifact, Input, Model

from components.common import component


@component
def register(
    base_model_uri: str,
    run_id: str,
    tracking_uri: str,
    pipeline_run: str,
    budget: str,
    overrides: str,
    data_dir: str,
    optimizer: Input[Model],
    report: Input[Artifact],
) -> str:
    """Returns a JSON summary: registered name, version, aliases and the validation table."""
    import json

    from pipeline.steps import StepContext, register_validated_optimizer

    ctx = StepContext.create(
        budget=budget, overrides=overrides, tracking_uri=tracking_uri, data_dir=data_dir,
        base_model_uri=base_model_uri, run_id=run_id,
    )
    summary = register_validated_optimizer(
        ctx=ctx, optimizer_dir=optimizer.path, report_path=report.path, pipeline_run=pipeline_run,
    )
    return json.dumps(summary)
