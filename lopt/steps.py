"""The pipeline's steps as plain functions: what each Kubeflow component calls.

Components (``components/``) only translate between KFP artifacts/parameters and these
functions, so every step can be run and tested without kfp. Steps exchange small JSON-able
values and directories; the MLflow run of a pipeline run is created by the first step and
carries everything later steps log (config, meta-training curve, validation numbers, the
registered optimizer's files), so one run in the MLflow UI tells the whole story.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from lopt import paths, registry
from lopt.checkpointing import checkpoint_key
from lopt.config import RunConfig, get_config, variant_label, with_variant
from lopt.data import DatasetUnavailableError, load_dataset
from lopt.evaluation import pretrain, trace_controls
from lopt.hub import (
    CHALLENGER,
    CHAMPION,
    fetch_files,
    load_optimizer,
    load_pretrained,
    optimizer_name,
    promote_optimizer,
    register_base_model,
    register_optimizer,
)
from lopt.l3rs import L3RS, LayerLayout
from lopt.estimator import FinalValidationLoss
from lopt.meta_training import make_estimator, meta_train
from lopt.models import ModelSpec, Params, with_fresh_head
from lopt.serialization import read_optimizer, write_optimizer
from lopt.tasks import load_task, load_task_family
from lopt.lineage import code_version, data_hash
from lopt.validation import PRIMARY, Checkpoint, validate

EXPERIMENT = "lopt"
BASE_MODEL_EXPERIMENT = "lopt-base-models"

# A pipeline run's MLflow run ends FINISHED (the register step) or FAILED with these tags
# (the step that failed, or the pipeline's exit task when a step died without a word).
ERROR_TAG = "lopt.error"
FAILED_STEP_TAG = "lopt.failed_step"
# The register step's summary, an artifact of the run; the exit task returns it.
SUMMARY = "summary.json"
_MAX_ERROR_CHARS = 4000  # MLflow keeps 8000 characters of a tag (5000 before 2.x)

Step = TypeVar("Step", bound=Callable[..., Any])


def record_failure(run_id: str, step: str, error: BaseException | str, tracking_uri: str | None = None) -> None:
    """Ends the pipeline's MLflow run ``run_id`` FAILED (KILLED for an interrupt), tagged with
    the step that failed (``lopt.failed_step``) and its error (``lopt.error``, one line,
    passwords in URLs redacted). Never raises: a store that cannot be reached must not hide
    the step's own error; it is reported on stderr instead."""
    message = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    message = re.sub(r"(//[^/\s:@]+):[^@\s/]+@", r"\1:***@", " ".join(message.split()))
    status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
    try:
        registry.set_run_tags(run_id, {FAILED_STEP_TAG: step, ERROR_TAG: message[:_MAX_ERROR_CHARS]}, tracking_uri)
        registry.end_run(run_id, status, tracking_uri)
    except Exception as err:  # noqa: BLE001 - the step's error is the one to raise
        print(f"lopt: could not mark MLflow run {run_id} {status}: {type(err).__name__}: {err}", file=sys.stderr)


def _records_failure(step: str) -> Callable[[Step], Step]:
    """Makes a step that logs to the pipeline's MLflow run (its ``run_id`` argument) end that
    run FAILED with the error before re-raising it, so no failed step leaves it RUNNING."""

    def decorate(function: Step) -> Step:
        signature = inspect.signature(function)

        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return function(*args, **kwargs)
            except BaseException as err:
                bound = signature.bind_partial(*args, **kwargs).arguments
                if bound.get("run_id"):
                    record_failure(bound["run_id"], step, err, bound.get("tracking_uri") or None)
                raise

        return wrapper  # type: ignore[return-value]

    return decorate


def _data_dir(data_dir: str) -> str | None:
    return data_dir or None


def _config(budget: str, overrides: str) -> RunConfig:
    return get_config(budget, overrides)


def check_inputs(budget: str, overrides: str, data_dir: str = "") -> RunConfig:
    """Fails fast, before any training, on a bad budget, override or dataset name.

    Loading every dataset the config names also prepares the offline ones, once, up front.
    """
    config = _config(budget, overrides)
    specs = [config.pretrain.task, *config.validation.tasks, *config.validation.reference_tasks]
    for dataset in dict.fromkeys(spec.dataset for spec in specs):
        for split in ("train", "test"):
            load_dataset(dataset, split, _data_dir(data_dir))
    # A family may go on without a source that is not installed (it warns when it loads), but
    # not without all of them, and never with a misspelt one.
    sources = config.meta_train.family.sources
    unavailable = []
    for dataset in sources:
        try:
            load_dataset(dataset, "train", _data_dir(data_dir))
        except DatasetUnavailableError as err:
            unavailable.append(err)
    if len(unavailable) == len(sources):
        raise unavailable[0]
    return config


def prepare_base_model(
    base_model: str,
    budget: str = "default",
    overrides: str = "",
    tracking_uri: str = "",
    data_dir: str = "",
    pipeline_run: str = "",
    if_stale: bool = False,
) -> dict[str, Any]:
    """Makes sure ``base_model@champion`` exists (pretraining and registering it if the
    registry has no such model), decides whether to meta-train, and opens the pipeline run's
    MLflow run.

    Returns the base model's pinned URI (``models:/name/version``), the MLflow run id, and
    ``retrain``/``reason``: always retrain unless ``if_stale``, then only when
    :func:`retrain_decision` finds the champion optimizer stale.
    """
    config = check_inputs(budget, overrides, data_dir)
    uri = tracking_uri or None
    if not base_model or "/" in base_model or "@" in base_model:
        raise ValueError(
            f"base_model must be a registered model name such as 'cnn-mnist', got {base_model!r}."
        )
    # Two runs on a fresh store: one pretrains, the other waits and finds the model.
    with registry.exclusive(base_model, uri):
        if not registry.model_exists(base_model, uri):
            _pretrain_and_register(base_model, config, uri, _data_dir(data_dir))
    if not registry.alias_exists(base_model, CHAMPION, uri):
        raise registry.RegistryError(
            f"Registered model {base_model!r} has no '{CHAMPION}' alias, so there is no pretrained "
            f"model to specialize to. Set the alias on the version to use "
            f"(MlflowClient().set_registered_model_alias({base_model!r}, {CHAMPION!r}, VERSION))."
        )
    base = registry.resolve(f"models:/{base_model}@{CHAMPION}", uri)
    decision = (
        retrain_decision(base_model, budget, overrides, tracking_uri, data_dir)
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


@_records_failure("meta-train")
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
    retrain: bool = True,
    reason: str = "",
    variant: str = "",
) -> dict[str, Any]:
    """Meta-trains L3RS for the base model with the configured estimator (antithetic ES by
    default); writes it to ``output_dir``.

    Checkpoints go to ``checkpoint_dir`` (default: under ``$LOPT_HOME/checkpoints``, named
    after the base model version and :func:`lopt.checkpointing.checkpoint_key` of the config,
    the code and the task family's data). With ``retrain`` false (the champion
    optimizer is up to date, see :func:`retrain_decision`), nothing is trained: the
    champion's files go to ``output_dir`` with a ``skipped.json`` that tells the later steps.

    ``variant`` (JSON ``meta_train`` overrides, see :func:`lopt.config.with_variant`) is one
    branch of a fan-out: it trains with the variant applied, logs its metrics under
    ``meta/<label>/``, and records the run's config hash (its identity for staleness) next to
    the variant's own.
    """
    run_config = _config(budget, overrides)
    config = _config(budget, with_variant(overrides, variant))
    cfg = config.meta_train
    label = variant_label(variant)
    prefix = f"meta/{label}/" if label else "meta/"
    uri = tracking_uri or None
    if not retrain:
        return _skip_meta_training(base_model_uri, output_dir, reason, uri)
    _, pretrained, info = load_pretrained(base_model_uri, tracking_uri=uri)
    spec = info["spec"]
    family = load_task_family(cfg.family, spec.input_shape, _data_dir(data_dir))
    # The layout is the fine-tuned model's: the pretrained body with a head for the task.
    head = with_fresh_head(spec, pretrained, family.num_classes, jax.random.key(0))
    l3rs = L3RS(cfg.l3rs, LayerLayout.from_params(head))
    estimator = make_estimator(cfg, l3rs, spec, pretrained, family)
    init_key, train_key = jax.random.split(jax.random.key(cfg.seed))
    logger = registry.RunLogger(run_id, uri)
    # Same base model, config, code and data: a rerun after a kill resumes where the last run
    # stopped; after an upgrade of lopt or with changed data, it starts over.
    checkpoints = checkpoint_dir or str(
        paths.checkpoints_dir()
        / paths.safe_name(f"{base_model_uri}-{checkpoint_key(config.hash(), family.content_hash)}")
    )
    result = meta_train(
        estimator,
        l3rs.init(init_key),
        num_steps=cfg.meta_steps,
        learning_rate=cfg.outer_learning_rate,
        key=train_key,
        on_step=lambda step, metrics: logger.log_metrics(
            {f"{prefix}{k}": v for k, v in metrics.items()}, step
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
        "variant": variant,
        "variant_config_hash": config.hash(),
    }
    logger.log_metrics({f"{prefix}total_seconds": result.seconds})
    write_optimizer(
        Path(output_dir),
        l3rs,
        result.theta,
        cfg.horizon,
        {"meta_training": summary, "base_model_uri": base_model_uri, "config_hash": run_config.hash()},
    )
    # Metrics kept through an outage of the tracking server are written now, or reported lost
    # (a warning): never a reason to fail the step that holds the trained optimizer.
    logger.flush()
    return summary


# Selection draws its meta-validation tasks from a key no meta-training run uses (runs split
# jax.random.key(seed) for small seeds), so the comparison is on fresh draws of the family.
SELECTION_SEED = 2**31 - 1
SELECTION = "selection.json"


@_records_failure("select-best")
def select_optimizer(
    candidate_dirs: list[str],
    output_dir: str,
    base_model_uri: str,
    run_id: str,
    budget: str = "default",
    overrides: str = "",
    tracking_uri: str = "",
    data_dir: str = "",
) -> dict[str, Any]:
    """The fan-in of a meta-training fan-out: copies the best candidate to ``output_dir``.

    Candidates are scored by the meta-objective itself (mean log final validation loss at
    the meta-training horizon) on ``meta_train.selection_tasks`` fresh draws of the
    meta-training task family, the same draws for all. The held-out validation datasets are
    never looked at here: choosing by them would tune on the set the gate reports. One
    candidate, or skipped meta-training (every candidate is the champion), passes straight
    through. ``selection.json`` in the output records the scores.
    """
    if not candidate_dirs:
        raise ValueError("No meta-training candidates to select from: the fan-out produced none.")
    uri = tracking_uri or None
    skipped = any(_skipped(d) for d in candidate_dirs)
    # Each candidate is read once: its variant names it, its θ is scored.
    loaded = [] if skipped else [read_optimizer(Path(d)) for d in candidate_dirs]
    labels = (
        ["skipped"] * len(candidate_dirs) if skipped
        else [variant_label(header.get("meta_training", {}).get("variant", "")) for _, _, header in loaded]
    )
    scores: list[float | None] = [None] * len(candidate_dirs)
    if len(loaded) > 1:
        scores = _selection_scores(loaded, base_model_uri, _config(budget, overrides), uri, data_dir)
    best = int(np.argmin(scores)) if scores[0] is not None else 0
    out = Path(output_dir)
    shutil.copytree(candidate_dirs[best], out, dirs_exist_ok=True)
    selection = {
        "selected": best,
        "selected_variant": labels[best],
        "candidates": [{"variant": label, "score": score} for label, score in zip(labels, scores)],
    }
    (out / SELECTION).write_text(json.dumps(selection, indent=1))
    if scores[0] is not None:
        logger = registry.RunLogger(run_id, uri)
        logger.log_metrics({f"select/{label}/score": s for label, s in zip(labels, scores)})
        logger.set_tags({"selected_variant": labels[best]})
        print("selection (mean log meta-validation loss): " + ", ".join(
            f"{label or 'base'}={s:.4f}" for label, s in zip(labels, scores)
        ) + f"; selected {labels[best] or 'base'}")
    return selection


def _selection_scores(
    candidates: list[tuple[L3RS, Any, dict[str, Any]]],
    base_model_uri: str,
    config: RunConfig,
    tracking_uri: str | None,
    data_dir: str,
) -> list[float]:
    cfg = config.meta_train
    _, pretrained, info = load_pretrained(base_model_uri, tracking_uri=tracking_uri)
    spec = info["spec"]
    family = load_task_family(cfg.family, spec.input_shape, _data_dir(data_dir))
    keys = jax.random.split(jax.random.key(SELECTION_SEED), cfg.selection_tasks)
    scores = []
    for l3rs, theta, _ in candidates:
        # The unroll inside is jitted with the architecture as a static argument: candidates
        # of one architecture share a compilation.
        objective = FinalValidationLoss(
            l3rs, spec, pretrained, family, cfg.horizon,
            cfg.batch_size, start=cfg.start,
        )
        # One host sync per candidate, not one per task.
        scores.append(float(jnp.mean(jnp.stack([objective(theta, key) for key in keys]))))
    return scores


SKIPPED = "skipped.json"


def _skip_meta_training(base_model_uri: str, output_dir: str, reason: str, tracking_uri: str | None) -> dict[str, Any]:
    base = registry.resolve(base_model_uri, tracking_uri)
    champion = registry.resolve(f"models:/{optimizer_name(base.name)}@{CHAMPION}", tracking_uri)
    out = fetch_files(champion.uri, output_dir, tracking_uri)
    summary = {"skipped": True, "reason": reason, "champion": champion.uri}
    (out / SKIPPED).write_text(json.dumps(summary))
    print(f"meta-training skipped: {reason}")
    return summary


def _skipped(optimizer_dir: str) -> dict[str, Any] | None:
    path = Path(optimizer_dir) / SKIPPED
    return json.loads(path.read_text()) if path.is_file() else None


def data_lineage(config: RunConfig, input_shape: tuple[int, ...], data_dir: str = "") -> list[dict[str, str]]:
    """The datasets a run with ``config`` meta-trains and validates on, with TFDS versions and
    content hashes: recorded on every optimizer version and compared by the staleness check."""
    d = _data_dir(data_dir)
    family = load_task_family(config.meta_train.family, input_shape, d)
    records = [{"role": "meta-training", **family.lineage()}]
    for spec in config.validation.tasks:
        records.append({"role": "validation", **load_task(spec, input_shape, d).lineage()})
    for spec in config.validation.reference_tasks:
        records.append({"role": "reference", **load_task(spec, input_shape, d).lineage()})
    return records


def _extra_checkpoint(config: RunConfig, spec: ModelSpec, seed: int, data_dir: str | None) -> Params:
    """Another pretrained checkpoint of the base model's architecture (pretraining seed)."""
    cfg = config.pretrain
    task = load_task(cfg.task, spec.input_shape, data_dir)
    params, metrics = pretrain(
        spec.with_num_classes(task.num_classes), task, cfg.steps, cfg.learning_rate, cfg.batch_size, seed
    )
    print(f"validate: checkpoint seed{seed} pretrained on {task.name}, test accuracy {metrics['test_accuracy']:.3f}")
    return params


def _current_champion(
    base_model: str, layout: LayerLayout, tracking_uri: str | None
) -> tuple[L3RS | None, Any, dict[str, Any]] | None:
    """The champion optimizer of ``base_model`` to compare against, if there is one.

    Returns ``(architecture, θ, info)``; architecture and θ are None (and ``info["note"]``
    says why) when the champion cannot run on this model's layers.
    """
    name = optimizer_name(base_model)
    if not registry.alias_exists(name, CHAMPION, tracking_uri):
        return None
    version = registry.resolve(f"models:/{name}@{CHAMPION}", tracking_uri)
    l3rs, theta, _ = load_optimizer(version.uri, tracking_uri)
    info = {"name": name, "version": version.version, "uri": version.uri, "compared": True, "note": ""}
    problems = l3rs.layout.differences(layout)
    if problems:
        info.update(compared=False, note="the champion was meta-trained for other layers: " + "; ".join(problems))
        return None, None, info
    return l3rs, theta, info


@_records_failure("validate")
def validate_optimizer(
    base_model_uri: str,
    optimizer_dir: str,
    report_path: str,
    run_id: str,
    budget: str = "default",
    overrides: str = "",
    tracking_uri: str = "",
    data_dir: str = "",
    html_path: str = "",
) -> dict[str, Any]:
    """Runs the validation suite (:mod:`lopt.validation`) on the optimizer in
    ``optimizer_dir``; writes the JSON report, logs its numbers to the MLflow run, and writes
    the plots and HTML report (also to ``html_path`` when given) and logs them there too."""
    config = _config(budget, overrides)
    uri = tracking_uri or None
    skipped = _skipped(optimizer_dir)
    if skipped is not None:
        data = {**skipped, "table": f"validation skipped: {skipped['reason']}"}
        Path(report_path).parent.mkdir(parents=True, exist_ok=True)
        Path(report_path).write_text(json.dumps(data, indent=1))
        return data
    l3rs, theta, header = read_optimizer(Path(optimizer_dir))
    _, pretrained, info = load_pretrained(base_model_uri, tracking_uri=uri)
    spec = info["spec"]
    checkpoints = [Checkpoint(PRIMARY, pretrained)] + [
        Checkpoint(f"seed{seed}", _extra_checkpoint(config, spec, seed, _data_dir(data_dir)))
        for seed in config.validation.checkpoint_seeds
    ]
    champion = _current_champion(info["name"], l3rs.layout, uri)
    champion_arg = None
    if champion is not None:
        champion_l3rs, champion_theta, champion_info = champion
        print(f"validate: comparing with the champion {champion_info['uri']}"
              + (f" — not compared: {champion_info['note']}" if not champion_info["compared"] else ""))
        if champion_l3rs is not None:
            champion_arg = (champion_l3rs, champion_theta, champion_info)
    report = validate(
        l3rs, theta, spec, checkpoints, config.validation, header["horizon"], _data_dir(data_dir),
        champion=champion_arg,
    )
    data = _finite(report.to_json())
    if champion is not None and champion_arg is None:
        data["champion"] = champion[2]
    registry.log_metrics(run_id, report.metrics(), tracking_uri=uri)
    held_out = load_task(config.validation.tasks[0], spec.input_shape, _data_dir(data_dir)) if config.validation.tasks else None
    html = _plots(data, l3rs, theta, spec, pretrained, held_out, header["horizon"], config, run_id)
    registry.log_artifacts(run_id, html.parent, "validation", tracking_uri=uri)
    data["html_report"] = str(html)
    if html_path:
        Path(html_path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(html, html_path)
    Path(report_path).parent.mkdir(parents=True, exist_ok=True)
    Path(report_path).write_text(json.dumps(data, indent=1, allow_nan=False))
    print(report.table())
    print(f"report: {html}")
    return data


def _plots(
    report: dict[str, Any], l3rs: L3RS, theta: Any, spec: ModelSpec, pretrained: Params,
    task: Any, horizon: int, config: RunConfig, run_id: str,
) -> Path:
    """The validation plots and the HTML page gathering them, under
    ``$LOPT_HOME/reports/<MLflow run id>/``; returns the page's path."""
    from lopt import plots  # matplotlib: only this step needs it

    out = paths.reports_dir() / run_id
    figures = {"Learning curves on the held-out tasks (mean test loss over seeds)": plots.learning_curves(report, out / "learning_curves.png")}
    if task is not None:
        controls = trace_controls(
            l3rs, theta, spec, pretrained, task, horizon, config.validation.batch_size, config.validation.seeds[0]
        )
        layers = list(l3rs.layout.names)
        figures[f"Mixing coefficients μ per layer on {task.name}, T={horizon}"] = plots.mixing_heatmaps(
            np.asarray(controls.mixing_coefficients), layers, l3rs.config.directions, out / "mixing.png"
        )
        figures[f"Learning rates λ_l(t) per layer on {task.name}, T={horizon}"] = plots.learning_rate_curves(
            np.asarray(controls.learning_rates), layers, out / "learning_rates.png"
        )
    return plots.write_html(report, figures, out / "index.html", f"L3RS validation — MLflow run {run_id}")


def _finite(value: Any) -> Any:
    """JSON has no inf/NaN: a steps-to-target of inf (target met at step 0) becomes a string."""
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


@_records_failure("register")
def register_validated_optimizer(
    base_model_uri: str,
    optimizer_dir: str,
    report_path: str,
    run_id: str,
    tracking_uri: str = "",
    pipeline_run: str = "",
    budget: str = "default",
    overrides: str = "",
    data_dir: str = "",
) -> dict[str, Any]:
    """Registers the optimizer as ``l3rs-<base>@challenger`` with its lineage, promotes it to
    ``@champion`` when the gate passed (the old champion becomes ``@previous``), closes the
    pipeline's MLflow run, and returns a summary.

    Promotion is compare-and-set: if another run moved ``@champion`` after this run's
    validation compared against it, this version stays challenger and says so.
    """
    uri = tracking_uri or None
    config = _config(budget, overrides)
    report = json.loads(Path(report_path).read_text())
    if report.get("skipped"):
        registry.set_run_tags(run_id, {"skipped": "true"}, uri)
        champion = registry.resolve(report["champion"], uri)
        return _finish_run(run_id, {
            "skipped": True, "reason": report["reason"], "optimizer": champion.name,
            "version": champion.version, "aliases": list(champion.aliases),
            "uri": f"models:/{champion.name}@{CHAMPION}", "base_model": base_model_uri,
            "table": report["table"], "mlflow_run_id": run_id,
            "tracking_uri": registry.redact(registry.resolve_tracking_uri(uri)),
        }, uri)
    l3rs, theta, header = read_optimizer(Path(optimizer_dir))
    base = registry.resolve(base_model_uri, uri)
    gate = report["gate"]
    _, _, info = load_pretrained(base_model_uri, tracking_uri=uri)
    datasets = data_lineage(config, info["input_shape"], data_dir)
    lineage = {
        "config_hash": header.get("config_hash", ""),
        "code_version": code_version(),
        "pipeline_run": pipeline_run,
        "mlflow_run_id": run_id,
        "datasets": json.dumps([{k: v for k, v in d.items()} for d in datasets], sort_keys=True),
        "data_hash": data_hash(datasets),
    }
    selection_file = Path(optimizer_dir) / SELECTION
    if selection_file.is_file():
        # Which variant of a fan-out this is, and how every candidate scored.
        selection = json.loads(selection_file.read_text())
        lineage["selected_variant"] = selection["selected_variant"]
        lineage["selection"] = json.dumps(selection["candidates"], sort_keys=True)
    compared = report.get("champion") or {}
    expected_champion = compared.get("version")
    meta = header.get("meta_training") or {}
    try:
        name, version = register_optimizer(
            base, l3rs, theta, header["horizon"], run_id=run_id,
            tags={"gate_passed": str(gate["passed"]).lower(), "gate_reason": gate["reason"], **lineage},
            description=(
                f"L3RS learned optimizer for {base.name} v{base.version}, meta-trained "
                f"{meta.get('meta_steps', '?')} steps ({meta.get('estimator', 'es')}) at horizon "
                f"{header['horizon']} on {meta.get('family', '?')}; config {lineage['config_hash']}, "
                f"code {lineage['code_version']}. Validation gate: {gate['reason']}."
            ),
            report=report,
            tracking_uri=uri,
        )
        promotion = (
            promote_optimizer(name, version, expected_champion, tracking_uri=uri)
            if gate["passed"] else {"promoted": False, "reason": "the validation gate did not pass"}
        )
    except BaseException:
        registry.end_run(run_id, "FAILED", uri)
        raise
    registry.set_run_tags(run_id, {"optimizer_version": version, "promoted": promotion["promoted"]}, uri)
    aliases = [CHALLENGER] + ([CHAMPION] if promotion["promoted"] else [])
    return _finish_run(run_id, {
        "optimizer": name,
        "version": version,
        "aliases": aliases,
        "uri": f"models:/{name}@{aliases[-1]}",
        "base_model": f"{base.name}/{base.version}",
        "gate": gate,
        "promotion": promotion,
        "table": report["table"],
        "mlflow_run_id": run_id,
        "tracking_uri": registry.redact(registry.resolve_tracking_uri(uri)),
        "html_report": report.get("html_report"),
        "skipped": False,
    }, uri)


def _finish_run(run_id: str, summary: dict[str, Any], tracking_uri: str | None) -> dict[str, Any]:
    """Stores the pipeline's outcome on its MLflow run (``summary.json``, what the exit task
    returns as the pipeline's output) and ends the run FINISHED."""
    registry.log_text(run_id, json.dumps(summary, indent=1, default=str), SUMMARY, tracking_uri)
    registry.end_run(run_id, "FINISHED", tracking_uri)
    return summary


class PipelineRunFailed(RuntimeError):
    """The pipeline run did not get to register: the message says which step and why."""


def finish_pipeline_run(pipeline_run: str, tracking_uri: str = "") -> dict[str, Any]:
    """The pipeline's exit task (``dsl.ExitHandler``): runs after every other step, whether
    they succeeded or not, and makes sure the run's MLflow run does not stay RUNNING.

    Finds the MLflow run the first step opened for ``pipeline_run`` (its ``pipeline_run``
    tag). Finished (the register step closed it): returns its summary. Still RUNNING: a step
    died without reporting (killed, out of memory, timed out, the pipeline terminated), so it
    ends the run FAILED saying so. Then, for a failed run, raises :class:`PipelineRunFailed`
    with the failing step and its error (from the run's tags), which also fails the pipeline
    on KFP backends where a succeeding exit task would otherwise report it succeeded. Needs no
    ``PipelineTaskFinalStatus``, which not every KFP backend supports.
    """
    uri = tracking_uri or None
    runs = registry.find_runs(EXPERIMENT, {"pipeline_run": pipeline_run}, uri)
    if not runs:
        raise PipelineRunFailed(
            f"Pipeline run {pipeline_run} ended before its first step opened its MLflow run: "
            "see the prepare-base-model step's log."
        )
    run = runs[0]
    status, tags = run.status, dict(run.tags)
    if status == "FINISHED":
        text = registry.read_text(run.run_id, SUMMARY, uri)
        if text is None:
            raise PipelineRunFailed(f"MLflow run {run.run_id} of pipeline run {pipeline_run} finished without {SUMMARY}.")
        return json.loads(text)
    if status == "RUNNING":
        step = tags.get(FAILED_STEP_TAG, "unknown")
        error = (
            "the pipeline ended before its register step closed this run: a step stopped "
            "without reporting an error (killed, out of memory, timed out, or the pipeline was "
            "terminated); see the pipeline run's logs"
        )
        record_failure(run.run_id, step, error, uri)
        status, tags = "FAILED", {**tags, FAILED_STEP_TAG: step, ERROR_TAG: error}
    raise PipelineRunFailed(
        f"MLflow run {run.run_id} of pipeline run {pipeline_run} is {status}: step "
        f"{tags.get(FAILED_STEP_TAG, 'unknown')} failed: {tags.get(ERROR_TAG, 'no error recorded')}"
    )


def retrain_decision(
    base_model: str = "cnn-mnist",
    budget: str = "default",
    overrides: str = "",
    tracking_uri: str = "",
    data_dir: str = "",
) -> dict[str, Any]:
    """Whether the base model's champion optimizer is stale, and why.

    Fresh when ``l3rs-<base>@champion`` was meta-trained for the base model's current
    ``@champion`` version, with this config (hash) and the same data (content hashes).
    Anything else, including no champion optimizer at all, means retraining is due.
    """
    uri = tracking_uri or None
    config = _config(budget, overrides)
    name = optimizer_name(base_model)
    decision = {"retrain": True, "base_model": base_model, "optimizer": name, "config_hash": config.hash()}
    if not registry.alias_exists(base_model, CHAMPION, uri):
        return {**decision, "reason": f"no {base_model}@{CHAMPION} in the registry yet"}
    base = registry.resolve(f"models:/{base_model}@{CHAMPION}", uri)
    decision["base_model_version"] = base.version
    if not registry.alias_exists(name, CHAMPION, uri):
        return {**decision, "reason": f"{name} has no {CHAMPION} yet"}
    champion = registry.resolve(f"models:/{name}@{CHAMPION}", uri)
    tags = champion.tags
    decision["champion"] = champion.uri
    trained_for = tags.get("base_model_version")
    if trained_for != str(base.version):
        return {**decision, "reason": (
            f"{base_model}@{CHAMPION} moved: the champion optimizer (v{champion.version}) was "
            f"trained for v{trained_for}, the base model's champion is now v{base.version}"
        )}
    if tags.get("config_hash") != config.hash():
        return {**decision, "reason": (
            f"the config changed: champion v{champion.version} has config {tags.get('config_hash')}, "
            f"this run's is {config.hash()}"
        )}
    _, _, info = load_pretrained(base.uri, tracking_uri=uri)
    current = data_hash(data_lineage(config, info["input_shape"], data_dir))
    if tags.get("data_hash") != current:
        return {**decision, "reason": (
            f"the data changed: champion v{champion.version} has data hash {tags.get('data_hash')}, "
            f"the datasets now hash to {current}"
        )}
    return {**decision, "retrain": False, "reason": (
        f"{name} v{champion.version} is up to date: trained for {base_model} v{base.version} "
        "with the same config and data"
    )}


def run_all(
    base_model: str = "cnn-mnist",
    budget: str = "default",
    overrides: str = "",
    tracking_uri: str = "",
    data_dir: str = "",
    workdir: str | os.PathLike = ".",
    variants: tuple[str, ...] = ("",),
    if_stale: bool = False,
) -> dict[str, Any]:
    """All steps in one process, in pipeline order, the fan-out run in turn (for notebooks
    and debugging; the pipeline is the product)."""
    work = Path(workdir)
    base = prepare_base_model(base_model, budget, overrides, tracking_uri, data_dir, if_stale=if_stale)
    ids = (base["base_model_uri"], base["run_id"])
    candidates = [str(work / "candidates" / str(i)) for i in range(len(variants))]
    for directory, variant in zip(candidates, variants):
        meta_train_optimizer(
            ids[0], directory, ids[1], budget, overrides, tracking_uri, data_dir,
            retrain=base["retrain"], reason=base["reason"], variant=variant,
        )
    optimizer_dir, report_path = str(work / "optimizer"), str(work / "report.json")
    select_optimizer(candidates, optimizer_dir, *ids, budget, overrides, tracking_uri, data_dir)
    validate_optimizer(ids[0], optimizer_dir, report_path, ids[1], budget, overrides, tracking_uri, data_dir)
    return register_validated_optimizer(
        ids[0], optimizer_dir, report_path, ids[1], tracking_uri, "", budget, overrides, data_dir,
    )
