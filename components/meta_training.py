"""Step 2: meta-train the L3RS optimizer for the base model (skipped when it is up to date)."""

from kfp.dsl import Artifact, Input, Model, Output

from components.common import component


@component
def meta_train(
    context: Input[Artifact],
    budget: str,
    overrides: str,
    tracking_uri: str,
    data_dir: str,
    variant: str,
    optimizer: Output[Model],
):
    """Writes the meta-trained optimizer (optimizer.json + meta_params.msgpack) as a Model;
    without ``retrain``, the up-to-date champion's files instead (marked skipped).
    ``context``: the first step's base model URI, MLflow run id and retrain decision.
    ``variant``: this branch's meta_train overrides in a fan-out (JSON; "{}" for none)."""
    import json

    from lopt.host import use_all_cores

    use_all_cores()  # before JAX starts: one CPU device per core the pod may use
    from pipeline.steps import StepContext, meta_train_optimizer

    with open(context.path) as f:
        first = json.load(f)
    ctx = StepContext.create(
        budget=budget, overrides=overrides, tracking_uri=tracking_uri, data_dir=data_dir,
        base_model_uri=first["base_model_uri"], run_id=first["run_id"],
    )
    summary = meta_train_optimizer(
        ctx=ctx, output_dir=optimizer.path, retrain=first["retrain"], reason=first["reason"], variant=variant,
    )
    optimizer.metadata.update({k: v for k, v in summary.items() if v is not None})
