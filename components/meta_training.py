"""Step 2: meta-train the L3RS optimizer for the base model with antithetic ES."""

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
    optimizer: Output[Model],
):
    """Writes the meta-trained optimizer (optimizer.json + meta_params.msgpack) as a Model."""
    from lopt import steps

    summary = steps.meta_train_optimizer(
        base_model_uri, optimizer.path, run_id, budget, overrides, tracking_uri, data_dir
    )
    optimizer.metadata.update({k: v for k, v in summary.items() if v is not None})
