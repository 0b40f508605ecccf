"""Step 1: make sure the pretrained base model is registered; open the run's MLflow run."""

from typing import NamedTuple

from kfp.dsl import Artifact, Output

from components.common import component


@component
def prepare_base_model(
    base_model: str,
    budget: str,
    overrides: str,
    tracking_uri: str,
    data_dir: str,
    pipeline_run: str,
    if_stale: bool,
    context: Output[Artifact],
) -> NamedTuple("Outputs", [("base_model_uri", str), ("run_id", str), ("retrain", bool), ("reason", str)]):
    """Resolves ``base_model@champion`` (pretraining and registering it when the registry has
    no such model); returns its version-pinned URI, the MLflow run id of this run, and
    whether to meta-train (with ``if_stale``, only when the champion optimizer is stale).
    ``context`` carries the same four values as a JSON artifact, for the steps inside the
    meta-training fan-out (see pipeline.pipeline)."""
    import json
    from collections import namedtuple

    from pipeline.steps import StepContext, prepare_base_model

    ctx = StepContext.create(budget=budget, overrides=overrides, tracking_uri=tracking_uri, data_dir=data_dir)
    result = prepare_base_model(ctx=ctx, base_model=base_model, pipeline_run=pipeline_run, if_stale=if_stale)
    with open(context.path, "w") as f:
        json.dump({k: result[k] for k in ("base_model_uri", "run_id", "retrain", "reason")}, f)
    outputs = namedtuple("Outputs", ["base_model_uri", "run_id", "retrain", "reason"])
    return outputs(result["base_model_uri"], result["run_id"], result["retrain"], result["reason"])
