"""Step 2: meta-train the L3RS optimizer for the base model (skipped when it is up to date)."""

from kfp.dsl import Model, Output

from components.common import component


@component
def meta_train(
    base_model_uri: str,
    run_id: str,
    budget: str,
    overrides: str,
    tracking_uri: str,
    data_dir: str,
    retrain: bool,
    reason: str,
    optimizer: Output[Model],
):
    """Writes the meta-trained optimizer (optimizer.json + meta_params.msgpack) as a Model;
    without ``retrain``, the up-to-date champion's files instead (marked skipped)."""
    from lopt import steps

    summary = steps.meta_train_optimizer(
        base_model_uri, optimizer.path, run_id, budget, overrides, tracking_uri, data_dir,
        retrain=retrain, reason=reason,
    )
    optimizer.metadata.update({k: v for k, v in summary.items() if v is not None})
