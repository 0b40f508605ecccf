"""Suite-wide ordering for parallel runs.

``make test`` runs the suite on every core with pytest-xdist (``--dist loadgroup``: one test
per work unit, handed out in collection order). The end-to-end runs take minutes, the rest
seconds each, so they go first: each starts on its own worker at once and the short tests
fill in around them, instead of one long run starting last and holding up the end.

Every test process, and every pipeline step the end-to-end tests start, shares one JAX
persistent compilation cache under ``.pytest_cache``: the suite compiles the same inner-training
programs many times over (each pipeline step is a process of its own).

``mlflow_server``: a real `mlflow server` on a throwaway PostgreSQL cluster, both on 127.0.0.1,
as a cluster runs it (manifests/): PostgreSQL backend, artifacts proxied by the server
(``--serve-artifacts``), so the client talks HTTP only. One per test module that uses it (each
module sees a fresh registry). PostgreSQL comes from the Debian package (`.ci/run` installs it
when missing). It refuses to run as root, so as root the cluster is created and run by the
`postgres` user.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lopt.host import use_compilation_cache

# Longest first: the local pipeline run, then the run against an MLflow server.
FIRST = ("tests/e2e/test_pipeline.py::", "tests/e2e/test_mlflow_server.py::")


@contextlib.contextmanager
def store_with_base_model(home: Path, name: str, spec) -> Iterator[tuple[str, dict]]:
    """An embedded SQLite store with ``$LOPT_HOME`` = ``home`` and no ``MLFLOW_TRACKING_URI``,
    holding base model ``name`` (``spec``, params from key 0) at ``@champion``; yields the
    tracking URI and the params. For module-scoped store fixtures."""
    import jax

    from lopt.hub import register_base_model
    from lopt.inner.models import init_params
    from lopt.store import registry

    uri = f"sqlite:///{home}/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOPT_HOME", str(home))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        params = init_params(spec, jax.random.key(0))
        register_base_model(
            name, spec, params, run_id=registry.start_run("test", tracking_uri=uri),
            metrics={"test_accuracy": 0.5}, description="a test model", tracking_uri=uri,
        )
        yield uri, params


def _rank(item: pytest.Item) -> tuple[int, int]:
    for i, prefix in enumerate(FIRST):
        if item.nodeid.startswith(prefix) and item.get_closest_marker("slow"):
            return (0, i)
    return (1, 0) if item.get_closest_marker("slow") else (2, 0)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=_rank)  # stable: within a rank, the usual order


def pytest_configure(config: pytest.Config) -> None:
    # Inherited by the pipeline steps the end-to-end tests start. A clean checkout starts empty.
    if getattr(config, "cache", None) is not None:  # None under -p no:cacheprovider
        use_compilation_cache(config.cache.mkdir("jax_compilation_cache"))


# ---------------------------------------------------------------------------------------------
# A real MLflow tracking server

# How long the server may take to become healthy: the first start against an empty database
# runs all of MLflow's schema migrations (~15 s on 2 cores).
SERVER_START_TIMEOUT_S = 180
POSTGRES_USER = "postgres"
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
        # MLflow 3's host-header check: loopback only; any port on 127.0.0.1, so that a test
        # can put a forwarder in front of the server (tests/store/test_faults_server.py).
        "--allowed-hosts", f"127.0.0.1:*,localhost:{port}",
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

    def log_tail(self, lines: int = 40) -> str:
        """The end of the server's log, for an assertion message."""
        return _tail(self.log, lines)


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
