"""Exit task: close the pipeline run's MLflow run, whatever happened; return the outcome."""

from components.common import component


@component
def finish_run(pipeline_run: str, tracking_uri: str) -> str:
    """Runs last, after success or failure (``dsl.ExitHandler``): returns the register step's
    JSON summary; when a step failed (or died without a word), makes sure the MLflow run ends
    FAILED with the step and its error as tags, and fails with that message."""
    import json

    from pipeline.steps import finish_pipeline_run

    return json.dumps(finish_pipeline_run(pipeline_run=pipeline_run, tracking_uri=tracking_uri))
