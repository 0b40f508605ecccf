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

    from lopt import steps

    summary = steps.register_validated_optimizer(
        base_model_uri, optimizer.path, report.path, run_id, tracking_uri, pipeline_run,
        budget, overrides, data_dir,
    )
    return json.dumps(summary)
