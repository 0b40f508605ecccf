"""Step 3: validate the optimizer against tuned baselines on the held-out suite; the gate."""

from kfp.dsl import HTML, Artifact, Input, Metrics, Model, Output

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
    html: Output[HTML],
):
    """Writes the validation report (JSON) and logs its headline numbers as KFP metrics."""
    from pipeline.steps import StepContext, validate_optimizer

    ctx = StepContext.create(
        budget=budget, overrides=overrides, tracking_uri=tracking_uri, data_dir=data_dir,
        base_model_uri=base_model_uri, run_id=run_id,
    )
    data = validate_optimizer(
        ctx=ctx, optimizer_dir=optimizer.path, report_path=report.path, html_path=html.path,
    )
    if data.get("skipped"):
        with open(html.path, "w") as f:
            f.write(f"<p>{data['table']}</p>")
        return
    metrics.log_metric("gate_passed", float(data["gate"]["passed"]))
    for row in data["rows"]:
        name = f"{row['task']}_{row['checkpoint']}_T{row['horizon']}"
        metrics.log_metric(f"{name}_l3rs_test_loss", row["learned"]["test_loss"])
        metrics.log_metric(f"{name}_best_baseline_test_loss", row["target_test_loss"])
