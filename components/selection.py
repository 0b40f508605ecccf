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
    from lopt import steps

    selection = steps.select_optimizer(
        [candidate.path for candidate in candidates], optimizer.path, base_model_uri, run_id,
        budget, overrides, tracking_uri, data_dir,
    )
    optimizer.metadata.update({"selected_variant": selection["selected_variant"]})
