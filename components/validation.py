"""Step 3: validate the optimizer against tuned Adam on held-out tasks and longer horizons."""

from kfp.dsl import Artifact, Input, Metrics, Model, Output

from components.common import component


@component
def validate(
    base_model_uri: str,
    run_id: str,
    budget: str,
    overrides: str,
    tracking_uri: str,
    data_dir: str,
    optimizer: Input[Model],
    report: Output[Artifact],
    metrics: Output[Metrics],
):
    """Writes the validation report (JSON) and logs its headline numbers as KFP metrics."""
    from lopt import steps

    data = steps.validate_optimizer(
        base_model_uri, optimizer.path, report.path, run_id, budget, overrides, tracking_uri, data_dir
    )
    metrics.log_metric("gate_passed", float(data["gate"]["passed"]))
    for comparison in data["comparisons"]:
        name = f"{comparison['task']}_T{comparison['horizon']}"
        metrics.log_metric(f"{name}_l3rs_test_loss", comparison["learned"]["test_loss"])
        metrics.log_metric(f"{name}_adam_test_loss", comparison["adam"]["test_loss"])
