"""The pipeline's steps as plain functions: what each Kubeflow component calls.

Components (``components/``) only translate between KFP artifacts/parameters and these
functions, so every step can be run and tested without kfp. Steps exchange small JSON-able
values and directories; the MLflow run of a pipeline run is created by the first step and
carries everything later steps log (config, meta-training curve, validation numbers, the
registered optimizer's files), so one run in the MLflow UI tells the whole story.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax

from lopt import registry
from lopt.config import MetaTrainConfig, RunConfig, get_config
from lopt.data import load_dataset
from lopt.evaluation import pretrain
from lopt.hub import CHAMPION, load_pretrained, register_base_model, register_optimizer
from lopt.l3rs import L3RS, LayerLayout
from lopt.meta_training import (
    AntitheticES,
    FinalValidationLoss,
    GradientEstimator,
    RandomHorizon,
    meta_train,
)
from lopt.models import ModelSpec, Params, with_fresh_head
from lopt.serialization import load_optimizer, save_optimizer
from lopt.tasks import TaskFamily, load_task, load_task_family
from lopt.truncated_backprop import TruncatedBackprop
from lopt.validation import validate

EXPERIMENT = "lopt"
BASE_MODEL_EXPERIMENT = "lopt-base-models"


def _data_dir(data_dir: str) -> str | None:
    return data_dir or None


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)


def _config(budget: str, overrides: str) -> RunConfig:
    return get_config(budget, overrides)


def check_inputs(budget: str, overrides: str, data_dir: str = "") -> RunConfig:
    """Fails fast, before any training, on a bad budget, override or dataset name.

    Loading every dataset the config names also prepares the offline ones, once, up front.
    """
    config = _config(budget, overrides)
    specs = [config.pretrain.task, config.meta_train.family, *config.validation.tasks, *config.validation.reference_tasks]
    for dataset in dict.fromkeys(spec.dataset for spec in specs):
        for split in ("train", "test"):
            load_dataset(dataset, split, _data_dir(data_dir))
    return config


def prepare_base_model(
    base_model: str,
    budget: str = "default",
    overrides: str = "",
    tracking_uri: str = "",
    data_dir: str = "",
    pipeline_run: str = "",
) -> dict[str, str]:
    """Makes sure ``base_model@champion`` exists (pretraining and registering it if the
    registry has no such model), and opens the pipeline run's MLflow run.

    Returns the base model's pinned URI (``models:/name/version``) and the MLflow run id.
    """
    config = check_inputs(budget, overrides, data_dir)
    uri = tracking_uri or None
    if not base_model or "/" in base_model or "@" in base_model:
        raise ValueError(
            f"base_model must be a registered model name such as 'cnn-mnist', got {base_model!r}."
        )
    if not registry.model_exists(base_model, uri):
        _pretrain_and_register(base_model, config, uri, _data_dir(data_dir))
    elif not registry.alias_exists(base_model, CHAMPION, uri):
        raise registry.RegistryError(
            f"Registered model {base_model!r} has no '{CHAMPION}' alias, so there is no pretrained "
            f"model to specialize to. Set the alias on the version to use "
            f"(MlflowClient().set_registered_model_alias({base_model!r}, {CHAMPION!r}, VERSION))."
        )
    base = registry.resolve(f"models:/{base_model}@{CHAMPION}", uri)
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
        },
    )
    registry.log_params(run_id, {"config": config.dumps()[:6000], "budget": config.budget}, uri)
    return {"base_model_uri": f"models:/{base.name}/{base.version}", "run_id": run_id}


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


def make_estimator(
    cfg: MetaTrainConfig, l3rs: L3RS, spec: ModelSpec, pretrained: Params, family: TaskFamily
) -> GradientEstimator:
    """The configured gradient estimator, drawing each meta-step's horizon from the config."""

    def for_horizon(horizon: int) -> GradientEstimator:
        if cfg.estimator == "tbptt":
            return TruncatedBackprop(
                l3rs, spec, pretrained, family, horizon, cfg.batch_size, cfg.truncation,
                cfg.num_tasks, start=cfg.start,
            )
        objective = FinalValidationLoss(
            l3rs, spec, pretrained, family, horizon, cfg.batch_size, start=cfg.start
        )
        return AntitheticES(objective, num_pairs=cfg.num_pairs, sigma=cfg.sigma)

    return RandomHorizon({h: for_horizon(h) for h in cfg.horizons or (cfg.horizon,)})


def meta_train_optimizer(
    base_model_uri: str,
    output_dir: str,
    run_id: str,
    budget: str = "default",
    overrides: str = "",
    tracking_uri: str = "",
    data_dir: str = "",
    progress: bool = True,
    checkpoint_dir: str = "",
) -> dict[str, Any]:
    """Meta-trains L3RS for the base model with antithetic ES; writes it to ``output_dir``.

    Checkpoints go to ``checkpoint_dir`` (default: under ``$LOPT_HOME/checkpoints``, named
    after the base model version and the config hash).
    """
    config = _config(budget, overrides)
    cfg = config.meta_train
    uri = tracking_uri or None
    _, pretrained, info = load_pretrained(base_model_uri, tracking_uri=uri)
    spec = info["spec"]
    family = load_task_family(cfg.family, spec.input_shape, _data_dir(data_dir))
    # The layout is the fine-tuned model's: the pretrained body with a head for the task.
    head = with_fresh_head(spec, pretrained, family.num_classes, jax.random.key(0))
    l3rs = L3RS(cfg.l3rs, LayerLayout.from_params(head))
    estimator = make_estimator(cfg, l3rs, spec, pretrained, family)
    init_key, train_key = jax.random.split(jax.random.key(cfg.seed))
    logger = registry.RunLogger(run_id, uri)
    # Same base model and config: a rerun after a kill resumes where the last run stopped.
    checkpoints = checkpoint_dir or str(
        registry.lopt_home() / "checkpoints" / _slug(f"{base_model_uri}-{config.hash()}")
    )
    result = meta_train(
        estimator,
        l3rs.init(init_key),
        num_steps=cfg.meta_steps,
        learning_rate=cfg.outer_learning_rate,
        key=train_key,
        on_step=lambda step, metrics: logger.log_metrics(
            {f"meta/{k}": v for k, v in metrics.items()}, step
        ),
        progress=progress,
        checkpoint_dir=checkpoints,
        checkpoint_every=cfg.checkpoint_every,
    )
    summary = {
        "meta_steps": cfg.meta_steps,
        "seconds": round(result.seconds, 2),
        "resumed_from": result.resumed_from,
        "first_objective": result.history[0]["objective"] if result.history else None,
        "last_objective": result.history[-1]["objective"] if result.history else None,
        "family": family.spec.name,
        "horizons": list(cfg.horizons or (cfg.horizon,)),
        "estimator": cfg.estimator,
        "start": cfg.start,
        "num_meta_parameters": sum(int(x.size) for x in jax.tree.leaves(result.theta)),
    }
    logger.log_metrics({"meta/total_seconds": result.seconds})
    save_optimizer(
        Path(output_dir),
        l3rs,
        result.theta,
        cfg.horizon,
        {"meta_training": summary, "base_model_uri": base_model_uri, "config_hash": config.hash()},
    )
    return summary


def validate_optimizer(
    base_model_uri: str,
    optimizer_dir: str,
    report_path: str,
    run_id: str,
    budget: str = "default",
    overrides: str = "",
    tracking_uri: str = "",
    data_dir: str = "",
) -> dict[str, Any]:
    """Compares the optimizer in ``optimizer_dir`` with tuned Adam; writes the JSON report."""
    config = _config(budget, overrides)
    uri = tracking_uri or None
    l3rs, theta, header = load_optimizer(Path(optimizer_dir))
    _, pretrained, info = load_pretrained(base_model_uri, tracking_uri=uri)
    report = validate(
        l3rs, theta, info["spec"], pretrained, config.validation, header["horizon"], _data_dir(data_dir)
    )
    registry.log_metrics(run_id, report.metrics(), tracking_uri=uri)
    data = {**report.to_json(), "table": report.table()}
    Path(report_path).parent.mkdir(parents=True, exist_ok=True)
    Path(report_path).write_text(json.dumps(data, indent=2))
    print(report.table())
    return data


def register_validated_optimizer(
    base_model_uri: str,
    optimizer_dir: str,
    report_path: str,
    run_id: str,
    tracking_uri: str = "",
    pipeline_run: str = "",
) -> dict[str, Any]:
    """Registers the optimizer as ``l3rs-<base>@challenger`` (and ``@champion`` if the gate
    passed), closes the pipeline's MLflow run, and returns a summary."""
    uri = tracking_uri or None
    report = json.loads(Path(report_path).read_text())
    l3rs, theta, header = load_optimizer(Path(optimizer_dir))
    base = registry.resolve(base_model_uri, uri)
    gate = report["gate"]
    try:
        name, version, aliases = register_optimizer(
            base,
            l3rs,
            theta,
            header["horizon"],
            run_id=run_id,
            promote=bool(gate["passed"]),
            tags={
                "gate_passed": str(gate["passed"]).lower(),
                "gate_reason": gate["reason"],
                "config_hash": header.get("config_hash", ""),
                "pipeline_run": pipeline_run,
                "mlflow_run_id": run_id,
            },
            description=(
                f"L3RS meta-trained for {base.name} v{base.version} "
                f"(horizon {header['horizon']}). Gate: {gate['reason']}."
            ),
            report=report,
            tracking_uri=uri,
        )
    except BaseException:
        registry.end_run(run_id, "FAILED", uri)
        raise
    registry.end_run(run_id, "FINISHED", uri)
    return {
        "optimizer": name,
        "version": version,
        "aliases": list(aliases),
        "uri": f"models:/{name}@{aliases[-1]}",
        "base_model": f"{base.name}/{base.version}",
        "gate": gate,
        "table": report["table"],
        "mlflow_run_id": run_id,
        "tracking_uri": registry.resolve_tracking_uri(uri),
    }


def run_all(
    base_model: str = "cnn-mnist",
    budget: str = "default",
    overrides: str = "",
    tracking_uri: str = "",
    data_dir: str = "",
    workdir: str | os.PathLike = ".",
) -> dict[str, Any]:
    """All steps in one process, in pipeline order (for notebooks and debugging)."""
    work = Path(workdir)
    base = prepare_base_model(base_model, budget, overrides, tracking_uri, data_dir)
    optimizer_dir, report_path = str(work / "optimizer"), str(work / "report.json")
    meta_train_optimizer(base["base_model_uri"], optimizer_dir, base["run_id"], budget, overrides, tracking_uri, data_dir)
    validate_optimizer(base["base_model_uri"], optimizer_dir, report_path, base["run_id"], budget, overrides, tracking_uri, data_dir)
    return register_validated_optimizer(base["base_model_uri"], optimizer_dir, report_path, base["run_id"], tracking_uri)
