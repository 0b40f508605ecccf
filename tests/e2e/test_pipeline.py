"""The Kubeflow pipeline: compilation, the CLI's input checks, and a whole local run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipeline import cli


@pytest.mark.parametrize(
    "args, message",
    [
        (["--budget", "huge"], "Unknown budget 'huge'"),
        (["--overrides", "{not json"], "not valid JSON"),
        (["--overrides", '{"meta_train": {"horizn": 5}}'], "horizn"),
        (["--overrides", '{"meta_train": {"estimator": "pes"}}'], "Unknown estimator 'pes'"),
        (["--overrides", '{"meta_train": {"start": "nowhere"}}'], "Unknown meta_train.start 'nowhere'"),
        (["--budget", "tiny", "--overrides", '{"validation": {"tasks": [{"dataset": "no_such_data"}]}}'], "no_such_data"),
    ],
)
def test_run_rejects_bad_input_before_training(tmp_path, capsys, args, message):
    assert cli.main(["run", "--home", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_local_run_registers_a_fetchable_optimizer(tmp_path, capsys, monkeypatch):
    import jax
    import jax.numpy as jnp
    import optax

    import lopt
    from lopt.store import registry

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    home = tmp_path / "home"
    assert cli.main(["run", "--budget", "tiny", "--home", str(home)]) == 0
    out = capsys.readouterr().out
    assert "registered l3rs-cnn-mnist version 1" in out
    assert "sklearn_digits" in out and "gate:" in out

    uri = f"sqlite:///{home}/mlflow.db"
    base = registry.resolve("models:/cnn-mnist@champion", uri)
    optimizer = registry.resolve("models:/l3rs-cnn-mnist@challenger", uri)
    assert optimizer.tags["base_model"] == "cnn-mnist"
    assert optimizer.tags["base_model_version"] == str(base.version)
    assert ("champion" in optimizer.aliases) == (optimizer.tags["gate_passed"] == "true")
    # Lineage: datasets with TFDS versions and content hashes, config, code, pipeline run.
    datasets = json.loads(optimizer.tags["datasets"])
    assert {d["role"] for d in datasets} == {"meta-training", "validation"}
    assert all(d["tfds_version"] and d["content_hash"] for d in datasets)
    assert optimizer.tags["config_hash"] and optimizer.tags["data_hash"]
    assert optimizer.tags["code_version"].startswith(("git:", "lopt=="))
    assert optimizer.tags["pipeline_run"] and "Validation gate" in optimizer.description
    report = json.loads((registry.download(optimizer.uri, uri) / "validation_report.json").read_text())
    horizons = {r["horizon"] for r in report["rows"]}
    assert horizons == {report["meta_horizon"], 2 * report["meta_horizon"]}
    assert {r["checkpoint"] for r in report["rows"]} == {"base"}
    assert all(len(r["learned"]["test_loss_per_seed"]) == 1 for r in report["rows"])
    # The plots and the HTML page gathering them, in the run's output folder and in MLflow.
    page = Path(report["html_report"])
    assert page.is_file() and page.parent.parent == home / "reports"
    assert {p.name for p in page.parent.iterdir()} >= {"learning_curves.png", "mixing.png", "learning_rates.png"}
    assert "data:image/png;base64," in page.read_text()

    # The contract of docs/design.md §2, end to end.
    model_fn, params, info = lopt.load_pretrained("models:/cnn-mnist@champion", num_classes=10, tracking_uri=uri)
    opt = lopt.fetch_optimizer("models:/l3rs-cnn-mnist@challenger", num_steps=40, tracking_uri=uri)
    images = jnp.zeros((8, *info["input_shape"]))
    labels = jnp.arange(8)
    loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(model_fn(p, images), labels).mean()

    @jax.jit  # one compilation instead of op-by-op dispatch: seconds off the suite
    def first_updates(p):
        loss, grads = jax.value_and_grad(loss_fn)(p)
        return opt.update(grads, opt.init(p), p, value=loss)[0]

    updates = first_updates(params)
    assert jax.tree.structure(updates) == jax.tree.structure(params)

    # The MLflow run of the pipeline holds the meta-training curve and the validation numbers.
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    run = client.get_run(optimizer.run_id)
    assert run.info.status == "FINISHED"
    # (No fan-out here: the MLflow server test runs one.) The single candidate went on as is.
    assert len(client.get_metric_history(run.info.run_id, "meta/objective")) == 2
    assert "selected_variant" not in run.data.tags
    assert "val/gate_passed" in run.data.metrics
    assert {a.path for a in client.list_artifacts(run.info.run_id, "validation")} >= {
        "validation/index.html", "validation/mixing.png"
    }

    # Nothing changed since: with --if-stale the next run skips meta-training, and
    # retrain-check agrees; a changed config makes retraining due (exit code 1).
    assert optimizer.tags["gate_passed"] == "true", "the tiny budget's gate is expected to pass"
    assert cli.main(["retrain-check", "--budget", "tiny", "--home", str(home)]) == 0
    assert cli.main(["run", "--budget", "tiny", "--home", str(home), "--if-stale"]) == 0
    assert "meta-training skipped" in capsys.readouterr().out
    assert registry.resolve("models:/l3rs-cnn-mnist@champion", uri).version == optimizer.version
    overrides = '{"meta_train": {"meta_steps": 3}}'
    assert cli.main(["retrain-check", "--budget", "tiny", "--overrides", overrides, "--home", str(home)]) == 1
    assert "the config changed" in capsys.readouterr().out

    # Consumers outside Python get plain files; a downstream job fine-tunes with the optimizer.
    out = tmp_path / "fetched"
    assert cli.main(["fetch", "models:/l3rs-cnn-mnist@champion", "--out", str(out), "--home", str(home)]) == 0
    assert json.loads((out / "optimizer.json").read_text())["horizon"] == report["meta_horizon"]
    assert (out / "meta_params.msgpack").stat().st_size > 0
    args = ["finetune", "--dataset", "sklearn_digits", "--optimizer", "models:/l3rs-cnn-mnist@champion",
            "--steps", "20", "--compare", "adam", "--grid-size", "2", "--home", str(home)]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "l3rs test loss" in printed and "adam (lr" in printed
    finetune_runs = client.search_runs([client.get_experiment_by_name("lopt-finetune").experiment_id])
    assert len(client.get_metric_history(finetune_runs[0].info.run_id, "l3rs/test_loss")) == 11
