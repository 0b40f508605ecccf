"""The pipeline against a real MLflow tracking server: PostgreSQL backend, proxied artifacts.

The other end-to-end test uses the embedded SQLite store, where the client itself writes
artifacts to local paths. A cluster runs `mlflow server` on PostgreSQL with `--serve-artifacts`
(manifests/): the client then talks HTTP only, artifact locations are `mlflow-artifacts:/`
URIs the server resolves, and nothing may rely on a shared file system. This test starts
exactly that on 127.0.0.1 — a throwaway PostgreSQL cluster and `mlflow server` — runs the
pipeline against it, fetches the optimizer back over HTTP, and stops both again.

The server and its PostgreSQL are the `mlflow_server` fixture of tests/conftest.py.
"""

from __future__ import annotations

import contextlib
import json
import os

import pytest

from pipeline import cli

# The tiny budget, shrunk further: every step still runs (pretraining, meta-training by ES,
# validation against a tuned baseline, registration), each as short as it can be.
OVERRIDES = {
    "pretrain": {"steps": 20},
    "meta_train": {"horizon": 10, "meta_steps": 1},
    "validation": {"horizon_multiples": [1]},
}


def _keep_env(monkeypatch, *names: str) -> None:
    """Restore these variables after the test: the CLI sets them for its subprocesses."""
    for name in names:
        if name in os.environ:
            monkeypatch.setenv(name, os.environ[name])
        else:
            monkeypatch.delenv(name, raising=False)


@pytest.mark.slow
def test_pipeline_against_an_mlflow_server_on_postgres(mlflow_server, tmp_path, monkeypatch, capsys):
    import jax
    import jax.numpy as jnp
    import optax
    import psycopg2
    from mlflow import MlflowClient

    import lopt

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _keep_env(monkeypatch, "LOPT_HOME", "XLA_FLAGS", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
    # Any artifact the client wrote to a relative default (./mlruns, ./mlartifacts) would land
    # here, where the test can see it.
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    home = tmp_path / "home"
    url = mlflow_server.url

    # As a cluster would run it: meta-training fanned out over two seeds (dsl.ParallelFor),
    # the better one on meta-validation selected. With a password in the URI (the server has no
    # auth and ignores it): it must not appear in anything printed, the Kubeflow executor's
    # log of every step's parameters included.
    secret = "s3cret-Pa55"
    with_password = url.replace("http://", f"http://lopt:{secret}@", 1)
    args = ["run", "--budget", "tiny", "--overrides", json.dumps(OVERRIDES),
            "--home", str(home), "--tracking-uri", with_password, "--fan-out", "2"]
    assert cli.main(args) == 0, f"mlflow server log:\n{mlflow_server.log_tail()}"
    captured = capsys.readouterr()
    printed = captured.out
    assert "registered l3rs-cnn-mnist version 1" in printed
    assert url in printed  # the summary names the server, not a local store
    assert "Got executor_input" in printed + captured.err  # the executor's log was captured
    assert secret not in printed + captured.err

    client = MlflowClient(tracking_uri=url, registry_uri=url)
    base = client.get_model_version_by_alias("cnn-mnist", "champion")
    optimizer = client.get_model_version_by_alias("l3rs-cnn-mnist", "challenger")
    assert optimizer.tags["base_model"] == "cnn-mnist"
    assert optimizer.tags["base_model_version"] == base.version
    scores = {c["variant"]: c["score"] for c in json.loads(optimizer.tags["selection"])}
    assert set(scores) == {"seed:0", "seed:1"}
    assert optimizer.tags["selected_variant"] == min(scores, key=scores.get)
    run = client.get_run(optimizer.run_id)
    assert run.data.tags["selected_variant"] == optimizer.tags["selected_variant"]
    for seed in (0, 1):  # each branch's meta-training curve, under its own prefix
        assert len(client.get_metric_history(run.info.run_id, f"meta/seed:{seed}/objective")) == 1

    # The registry really is the PostgreSQL database behind the server.
    with contextlib.closing(psycopg2.connect(mlflow_server.backend_dsn)) as connection:
        with connection.cursor() as cursor:
            cursor.execute("SELECT name FROM registered_models")
            names = {row[0] for row in cursor.fetchall()}
            assert {n for n in names if not n.startswith("lopt-lock.")} == {"cnn-mnist", "l3rs-cnn-mnist"}
            # The first base model was pretrained and registered under lopt's lock on the server;
            # its ticket is gone again.
            assert "lopt-lock.cnn-mnist" in names
            cursor.execute(
                "SELECT count(*) FROM model_versions WHERE name LIKE 'lopt-lock.%%' "
                "AND current_stage != 'Deleted_Internal'"  # MLflow keeps deleted rows, marked
            )
            assert cursor.fetchone()[0] == 0
            cursor.execute("SELECT alias FROM registered_model_aliases WHERE name = 'l3rs-cnn-mnist'")
            assert "challenger" in {row[0] for row in cursor.fetchall()}

    # Artifacts went through the server into its destination; the client wrote none locally.
    run = client.get_run(optimizer.run_id)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
    assert optimizer.source.startswith(f"runs:/{optimizer.run_id}/")
    registered = mlflow_server.artifacts.glob(
        f"*/{optimizer.run_id}/artifacts/{optimizer.source.split('/', 2)[2]}"
    )
    stored = next(registered, None)
    assert stored is not None, sorted(str(p) for p in mlflow_server.artifacts.rglob("*"))
    assert {p.name for p in stored.iterdir()} >= {"optimizer.json", "meta_params.msgpack"}
    assert not (home / "mlartifacts").exists()
    assert not any(workdir.iterdir()), sorted(p.name for p in workdir.iterdir())

    # Fetched back over HTTP: plain files, and the optax optimizer of the public contract.
    out = tmp_path / "fetched"
    assert cli.main(["fetch", "models:/l3rs-cnn-mnist@challenger", "--out", str(out),
                     "--home", str(home), "--tracking-uri", url]) == 0
    header = json.loads((out / "optimizer.json").read_text())
    assert header["horizon"] == OVERRIDES["meta_train"]["horizon"]
    for name in ("optimizer.json", "meta_params.msgpack"):
        assert (out / name).read_bytes() == (stored / name).read_bytes()

    model_fn, params, info = lopt.load_pretrained(
        "models:/cnn-mnist@champion", num_classes=3, tracking_uri=url
    )
    opt = lopt.fetch_optimizer("models:/l3rs-cnn-mnist@challenger", num_steps=10, tracking_uri=url)
    images = jnp.zeros((4, *info["input_shape"]))
    labels = jnp.arange(4) % 3
    loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(model_fn(p, images), labels).mean()

    @jax.jit  # one compilation: op by op, the CNN and L3RS take three times as long
    def first_updates(params):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        return opt.update(grads, opt.init(params), params, value=loss)[0], model_fn(params, images)

    updates, logits = first_updates(params)
    assert logits.shape == (4, 3)  # a fresh head of the classes asked for
    assert info["uri"] == f"models:/cnn-mnist/{base.version}"
    assert jax.tree.structure(updates) == jax.tree.structure(params)
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
