"""Step 2b: the fan-in of the meta-training fan-out; the best candidate goes on."""

from typing import List

from kfp.dsl import Input, Model, Output

from components.common import component


@component
def select_best(
    base_model_uri: str,
    run_id: str,
    budget: str,
    overrides: str,
    tracking_uri: str,
    data_dir: str,
    candidates: Input[List[Model]],
    optimizer: Output[Model],
):
    """Copies the candidate with the best meta-validation score (fresh draws of the
    meta-training family, never the held-out suite) to ``optimizer``."""
    from lopt.host import use_all_cores

    use_all_cores()  # before JAX starts: one CPU device per core the pod may use
    from pipeline.steps import StepContext, select_optimizer

    ctx = StepContext.create(
        budget=budget, overrides=overrides, tracking_uri=tracking_uri, data_dir=data_dir,
        base_model_uri=base_model_uri, run_id=run_id,
    )
    selection = select_optimizer(
        ctx=ctx, candidate_dirs=[candidate.path for candidate in candidates], output_dir=optimizer.path,
    )
    optimizer.metadata.update({"selected_variant": selection["selected_variant"]})
