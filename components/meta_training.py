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
    from lopt import steps

    with open(context.path) as f:
        ctx = json.load(f)
    summary = steps.meta_train_optimizer(
        ctx["base_model_uri"], optimizer.path, ctx["run_id"], budget, overrides, tracking_uri,
        data_dir, retrain=ctx["retrain"], reason=ctx["reason"], variant=variant,
    )
    optimizer.metadata.update({k: v for k, v in summary.items() if v is not None})
