"""The pipeline against a real MLflow tracking server: PostgreSQL backend, proxied artifacts.

The other end-to-end test uses the embedded SQLite store, where the client itself writes
artifacts to local paths. A cluster runs `mlflow server` on PostgreSQL with `--serve-artifacts`
(manifests/): the client then talks HTTP only, artifact locations are `mlflow-artifacts:/`
URIs the server resolves, and nothing may rely on a shared file system. This test starts
exactly that on 127.0.0.1 — a throwaway PostgreSQL cluster and `mlflow server` — runs the
pipeline against it, fetches the optimizer back over HTTP, and stops both again.

PostgreSQL comes from the Debian package (`.ci/run` installs it when missing). It refuses to
run as root, so as root the cluster is created and run by the `postgres` user.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline import cli

# How long the server may take to become healthy: the first start against an empty database
# runs all of MLflow's schema migrations (~15 s on 2 cores).
SERVER_START_TIMEOUT_S = 180
POSTGRES_USER = "postgres"
# The tiny budget, shrunk further: every step still runs (pretraining, meta-training by ES,
# validation against a tuned baseline, registration), each as short as it can be.
OVERRIDES = {
    "pretrain": {"steps": 20},
    "meta_train": {"horizon": 10, "meta_steps": 1},
    "validation": {"horizon_multiples": [1]},
}


def _postgres_bin_dir() -> Path | None:
    """The directory holding initdb and pg_ctl: on PATH, else the newest Debian install."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl", path=str(Path(on_path).resolve().parent)):
        return Path(on_path).resolve().parent
    installed = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3])
    )
    return Path(installed[-1]).parent if installed else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as err:
        return f"({path} unreadable: {err})"


@dataclass(frozen=True)
class PostgresCluster:
    bin_dir: Path
    data_dir: Path
    port: int
    log: Path

    def dsn(self, database: str) -> str:
        return f"postgresql://{POSTGRES_USER}@127.0.0.1:{self.port}/{database}"

    def ctl(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """pg_ctl on this cluster, as the `postgres` user when we are root."""
        command = [str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), *args]
        return subprocess.run(
            _as_postgres(command), capture_output=True, text=True, timeout=timeout
        )


def _as_postgres(command: list[str]) -> list[str]:
    return ["runuser", "-u", POSTGRES_USER, "--", *command] if os.geteuid() == 0 else command


def _start_postgres(root: Path, cleanup: contextlib.ExitStack) -> PostgresCluster:
    """A new cluster under ``root``, running; ``cleanup`` stops it (registered before it starts,
    so that a start that fails half-way is stopped too)."""
    bin_dir = _postgres_bin_dir()
    if bin_dir is None:
        reason = (
            "PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or in "
            "/usr/lib/postgresql/*/bin; install the Debian package `postgresql` (.ci/run does)."
        )
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    if os.geteuid() == 0:
        # The cluster's files must belong to the user that runs it.
        shutil.chown(root, user=POSTGRES_USER)
    cluster = PostgresCluster(bin_dir, root / "data", _free_port(), root / "postgres.log")
    initdb = [
        str(bin_dir / "initdb"), "-D", str(cluster.data_dir), "-U", POSTGRES_USER,
        "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync",
    ]
    done = subprocess.run(_as_postgres(initdb), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"initdb failed:\n{done.stdout}\n{done.stderr}"
    # Loopback only, the socket in our own directory (not /var/run/postgresql, which may not
    # exist or belong to a system cluster), and no durability: the data dies with the test.
    options = (
        f"-c listen_addresses=127.0.0.1 -c port={cluster.port} "
        f"-c unix_socket_directories={root} -c fsync=off -c synchronous_commit=off "
        f"-c full_page_writes=off"
    )
    cleanup.callback(_stop_postgres, cluster)
    done = cluster.ctl("start", "-w", "-t", "60", "-l", str(cluster.log), "-o", options)
    assert done.returncode == 0, (
        f"pg_ctl start failed:\n{done.stdout}\n{done.stderr}\n{_tail(cluster.log)}"
    )
    return cluster


def _stop_postgres(cluster: PostgresCluster) -> None:
    if not (cluster.data_dir / "postmaster.pid").exists():
        return  # not running
    done = cluster.ctl("stop", "-m", "fast", "-w", "-t", "30")
    if done.returncode == 0:
        return
    # pg_ctl could not stop it: kill the postmaster itself (its children follow).
    with contextlib.suppress(OSError, ValueError, IndexError):
        pid = int((cluster.data_dir / "postmaster.pid").read_text().split()[0])
        os.kill(pid, signal.SIGKILL)


def _create_database(cluster: PostgresCluster, name: str) -> None:
    import psycopg2

    connection = psycopg2.connect(cluster.dsn("postgres"))
    try:
        connection.autocommit = True  # CREATE DATABASE cannot run inside a transaction
        with connection.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE {name}")
    finally:
        connection.close()


def _start_mlflow(backend_uri: str, artifacts: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    command = [
        str(mlflow), "server",
        "--backend-store-uri", backend_uri,
        "--serve-artifacts", "--artifacts-destination", str(artifacts),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        # MLflow 3's host-header check: name exactly the addresses the test uses.
        "--allowed-hosts", f"127.0.0.1:{port},localhost:{port}",
    ]
    # No job runner: MLflow 3 otherwise starts eight more processes (huey consumers for its
    # GenAI jobs) that each import mlflow, competing with the pipeline for the two cores, and
    # leaves their queue files behind in /dev/shm.
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true",
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(log, "wb") as out:
        # Its own process group, so that stopping it stops every worker it forked.
        server = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            cwd=log.parent,
        )
    return server, f"http://127.0.0.1:{port}"


def _wait_healthy(server: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"mlflow server exited with {server.returncode}; log:\n{_tail(log)}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        time.sleep(0.5)
    pytest.fail(
        f"mlflow server at {url} not healthy after {SERVER_START_TIMEOUT_S} s; log:\n{_tail(log)}"
    )


def _stop_process_group(process: subprocess.Popen) -> None:
    for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=grace)
            break
        except subprocess.TimeoutExpired:
            continue
    # Workers may outlive the group leader briefly; make sure none is left.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


@dataclass(frozen=True)
class MlflowServer:
    url: str
    backend_dsn: str
    artifacts: Path
    log: Path


@pytest.fixture(scope="module")
def mlflow_server():
    """`mlflow server` on a fresh PostgreSQL database, both on 127.0.0.1; stopped afterwards."""
    # Under /tmp, not pytest's tmp_path: the postgres user must be able to reach its data dir,
    # and pytest's base temp dir is private to the user running the tests.
    # Callbacks run last-in first-out, even on failure: server, then PostgreSQL, then files.
    with contextlib.ExitStack() as cleanup:
        root = Path(tempfile.mkdtemp(prefix="lopt-mlflow-server-"))
        cleanup.callback(shutil.rmtree, root, ignore_errors=True)
        root.chmod(0o711)  # mkdtemp's 0700 would stop the postgres user on the way to its dir
        pg_root = root / "postgres"
        pg_root.mkdir()
        cluster = _start_postgres(pg_root, cleanup)
        _create_database(cluster, "mlflow")
        artifacts = root / "artifacts"
        log = root / "mlflow-server.log"
        # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3; the driver we ship is psycopg2.
        backend_uri = cluster.dsn("mlflow").replace("postgresql://", "postgresql+psycopg2://", 1)
        server, url = _start_mlflow(backend_uri, artifacts, log)
        cleanup.callback(_stop_process_group, server)
        _wait_healthy(server, url, log)
        yield MlflowServer(url, cluster.dsn("mlflow"), artifacts, log)


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
    _keep_env(monkeypatch, "LOPT_HOME", "XLA_FLAGS")
    # Any artifact the client wrote to a relative default (./mlruns, ./mlartifacts) would land
    # here, where the test can see it.
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    home = tmp_path / "home"
    url = mlflow_server.url

    # As a cluster would run it: meta-training fanned out over two seeds (dsl.ParallelFor),
    # the better one on meta-validation selected.
    args = ["run", "--budget", "tiny", "--overrides", json.dumps(OVERRIDES),
            "--home", str(home), "--tracking-uri", url, "--fan-out", "2"]
    assert cli.main(args) == 0, f"mlflow server log:\n{_tail(mlflow_server.log)}"
    printed = capsys.readouterr().out
    assert "registered l3rs-cnn-mnist version 1" in printed
    assert url in printed  # the summary names the server, not a local store

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
            assert {row[0] for row in cursor.fetchall()} == {"cnn-mnist", "l3rs-cnn-mnist"}
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
