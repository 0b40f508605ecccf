"""The retrain decision: is the base model's champion optimizer stale?

``lopt retrain-check`` and ``lopt run --if-stale`` apply this rule, so a cron job retrains
exactly when the pipeline would.
"""

from __future__ import annotations

from typing import Any

from lopt.store import registry
from lopt.config import RunConfig
from lopt.hub import CHAMPION, optimizer_name
from lopt.store.lineage import data_hash
from lopt.inner.tasks import load_task, load_task_family

from pipeline.steps.context import StepContext


def data_lineage(config: RunConfig, input_shape: tuple[int, ...], data_dir: str | None = None) -> list[dict[str, str]]:
    """The datasets a run with ``config`` meta-trains and validates on, with TFDS versions and
    content hashes: recorded on every optimizer version and compared by the staleness check."""
    d = data_dir or None
    family = load_task_family(config.meta_train.family, input_shape, d)
    records = [{"role": "meta-training", **family.lineage()}]
    for spec in config.validation.tasks:
        records.append({"role": "validation", **load_task(spec, input_shape, d).lineage()})
    for spec in config.validation.reference_tasks:
        records.append({"role": "reference", **load_task(spec, input_shape, d).lineage()})
    return records


def retrain_decision(*, ctx: StepContext, base_model: str = "cnn-mnist") -> dict[str, Any]:
    """Whether the base model's champion optimizer is stale, and why.

    Fresh when ``l3rs-<base>@champion`` was meta-trained for the base model's current
    ``@champion`` version, with this config (hash) and the same data (content hashes).
    Anything else, including no champion optimizer at all, means retraining is due.
    """
    uri = ctx.tracking_uri
    config = ctx.config
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
    # The base model's champion, which the first step's context does not name yet.
    input_shape = ctx.with_base_model(base.uri).base_model.info["input_shape"]
    current = data_hash(data_lineage(config, input_shape, ctx.data_dir))
    if tags.get("data_hash") != current:
        return {**decision, "reason": (
            f"the data changed: champion v{champion.version} has data hash {tags.get('data_hash')}, "
            f"the datasets now hash to {current}"
        )}
    return {**decision, "retrain": False, "reason": (
        f"{name} v{champion.version} is up to date: trained for {base_model} v{base.version} "
        "with the same config and data"
    )}
