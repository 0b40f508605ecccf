"""Step 1: make sure the pretrained base model is registered; open the run's MLflow run."""

from typing import NamedTuple

from components.common import component


@component
def prepare_base_model(
    base_model: str,
    budget: str,
    overrides: str,
    tracking_uri: str,
    data_dir: str,
    pipeline_run: str,
) -> NamedTuple("Outputs", [("base_model_uri", str), ("run_id", str)]):
    """Resolves ``base_model@champion`` (pretraining and registering it when the registry has
    no such model) and returns its version-pinned URI and the MLflow run id of this run."""
    from collections import namedtuple

    from lopt import steps

    result = steps.prepare_base_model(base_model, budget, overrides, tracking_uri, data_dir, pipeline_run)
    return namedtuple("Outputs", ["base_model_uri", "run_id"])(result["base_model_uri"], result["run_id"])
