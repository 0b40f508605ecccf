"""The first step: check the inputs, make sure the base model is registered, decide whether
to meta-train, and open the pipeline run's MLflow run."""

from __future__ import annotations

from typing import Any

from lopt.store import registry
from lopt.config import RunConfig
from lopt.data import DatasetUnavailableError, load_dataset
from lopt.eval.evaluation import pretrain
from lopt.hub import CHAMPION, register_base_model
from lopt.inner.tasks import load_task

from pipeline.steps.context import StepContext
from pipeline.steps.mlflow_run import EXPERIMENT
from pipeline.steps.staleness import retrain_decision

BASE_MODEL_EXPERIMENT = "lopt-base-models"


def check_inputs(*, ctx: StepContext) -> RunConfig:
    """Fails fast, before any training, on a bad dataset name (the budget and overrides were
    checked when the context parsed them); returns the config.

    Loading every dataset the config names also prepares the offline ones, once, up front.
    """
    config = ctx.config
    specs = [config.pretrain.task, *config.validation.tasks, *config.validation.reference_tasks]
    for dataset in dict.fromkeys(spec.dataset for spec in specs):
        for split in ("train", "test"):
            load_dataset(dataset, split, ctx.data_dir)
    # A family may go on without a source that is not installed (it warns when it loads), but
    # not without all of them, and never with a misspelt one.
    sources = config.meta_train.family.sources
    unavailable = []
    for dataset in sources:
        try:
            load_dataset(dataset, "train", ctx.data_dir)
        except DatasetUnavailableError as err:
            unavailable.append(err)
    if len(unavailable) == len(sources):
        raise unavailable[0]
    return config


def prepare_base_model(
    *, ctx: StepContext, base_model: str, pipeline_run: str = "", if_stale: bool = False
) -> dict[str, Any]:
    """Makes sure ``base_model@champion`` exists (pretraining and registering it if the
    registry has no such model), decides whether to meta-train, and opens the pipeline run's
    MLflow run.

    Returns the base model's pinned URI (``models:/name/version``), the MLflow run id, and
    ``retrain``/``reason``: always retrain unless ``if_stale``, then only when
    :func:`~pipeline.steps.staleness.retrain_decision` finds the champion optimizer stale.
    """
    config = check_inputs(ctx=ctx)
    uri = ctx.tracking_uri
    if not base_model or "/" in base_model or "@" in base_model:
        raise ValueError(
            f"base_model must be a registered model name such as 'cnn-mnist', got {base_model!r}."
        )
    # Two runs on a fresh store: one pretrains, the other waits and finds the model.
    with registry.exclusive(base_model, uri):
        if not registry.model_exists(base_model, uri):
            _pretrain_and_register(base_model, config, uri, ctx.data_dir)
    if not registry.alias_exists(base_model, CHAMPION, uri):
        raise registry.RegistryError(
            f"Registered model {base_model!r} has no '{CHAMPION}' alias, so there is no pretrained "
            f"model to specialize to. Set the alias on the version to use "
            f"(MlflowClient().set_registered_model_alias({base_model!r}, {CHAMPION!r}, VERSION))."
        )
    base = registry.resolve(f"models:/{base_model}@{CHAMPION}", uri)
    decision = (
        retrain_decision(ctx=ctx, base_model=base_model)
        if if_stale else {"retrain": True, "reason": "retraining was not conditional (no --if-stale)"}
    )
    print(f"{'retrain' if decision['retrain'] else 'skip meta-training'}: {decision['reason']}")
    run_id = registry.start_run(
        EXPERIMENT,
        run_name=f"l3rs-{base_model}",
        tracking_uri=uri,
        tags={
            "base_model": base.name,
            "base_model_version": base.version,
            "budget": config.budget,
            "config_hash": config.hash(),
            "pipeline_run": pipeline_run,
            "retrain": str(decision["retrain"]).lower(),
            "retrain_reason": decision["reason"],
        },
    )
    registry.log_params(run_id, {"config": config.dumps()[:6000], "budget": config.budget}, uri)
    return {
        "base_model_uri": f"models:/{base.name}/{base.version}",
        "run_id": run_id,
        "retrain": bool(decision["retrain"]),
        "reason": decision["reason"],
    }


def _pretrain_and_register(name: str, config: RunConfig, tracking_uri: str | None, data_dir: str | None) -> int:
    cfg = config.pretrain
    task = load_task(cfg.task, cfg.model.input_shape, data_dir)
    spec = cfg.model.with_num_classes(task.num_classes)
    with registry.run_logger(
        BASE_MODEL_EXPERIMENT,
        run_name=f"pretrain-{name}",
        tracking_uri=tracking_uri,
        params={"task": cfg.task.name, "steps": cfg.steps, "learning_rate": cfg.learning_rate},
    ) as run:
        params, metrics = pretrain(spec, task, cfg.steps, cfg.learning_rate, cfg.batch_size, cfg.seed)
        run.log_metrics(metrics)
        print(f"pretrained {name} on {task.name}: test accuracy {metrics['test_accuracy']:.3f}")
        return register_base_model(
            name,
            spec,
            params,
            run_id=run.run_id,
            metrics=metrics,
            description=(
                f"{spec.architecture} pretrained {cfg.steps} Adam steps on {task.name}; "
                f"test accuracy {metrics['test_accuracy']:.3f}."
            ),
            tracking_uri=tracking_uri,
        )
