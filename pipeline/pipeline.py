"""The pipeline: load pretrained → meta-train → validate → register.

Every step reads or writes registry state (the base model may be pretrained and registered by
the first step, aliases move in the last), so KFP caching is off for all of them: a cached
step would replay a stale registry decision.
"""


from kfp import dsl

from components import meta_train, prepare_base_model, register, validate

PIPELINE_NAME = "lopt-l3rs"


@dsl.pipeline(
    name=PIPELINE_NAME,
    description=(
        "Meta-train an L3RS learned optimizer specialized to a registered pretrained model, "
        "validate it against tuned baselines on held-out tasks, and register it in MLflow as "
        "l3rs-<base-model> (champion only when it passes the gate)."
    ),
)
def l3rs_pipeline(
    base_model: str = "cnn-mnist",
    budget: str = "default",
    overrides: str = "",
    tracking_uri: str = "",
    data_dir: str = "",
    if_stale: bool = False,
) -> str:
    common = dict(budget=budget, overrides=overrides, tracking_uri=tracking_uri, data_dir=data_dir)
    base = prepare_base_model(
        base_model=base_model, pipeline_run=dsl.PIPELINE_JOB_NAME_PLACEHOLDER, if_stale=if_stale,
        **common,
    )
    # Skipping is data flow, not dsl.If: the later steps see a "skipped" optimizer and pass
    # the champion through, which runs the same on kfp.local and on a cluster.
    trained = meta_train(
        base_model_uri=base.outputs["base_model_uri"], run_id=base.outputs["run_id"],
        retrain=base.outputs["retrain"], reason=base.outputs["reason"], **common,
    )
    validated = validate(
        base_model_uri=base.outputs["base_model_uri"],
        run_id=base.outputs["run_id"],
        optimizer=trained.outputs["optimizer"],
        **common,
    )
    registered = register(
        base_model_uri=base.outputs["base_model_uri"],
        run_id=base.outputs["run_id"],
        pipeline_run=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
        **common,
        optimizer=trained.outputs["optimizer"],
        report=validated.outputs["report"],
    )
    for task in (base, trained, validated, registered):
        task.set_caching_options(False)
    return registered.output
