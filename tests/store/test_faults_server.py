"""Faults of the tracking server (issue #16, items 8, 10 and 11), as a user and an operator meet them.

* A server that is down: every ``lopt`` command that needs it fails within seconds, with one
  line that names the tracking URI (password redacted), and exits 2; metrics survive a short
  outage (kept, then written), while what matters for the registry still raises.
* Locking: :func:`lopt.store.registry.exclusive` serializes processes on a real ``mlflow server``
  (PostgreSQL behind it, the ``mlflow_server`` fixture of conftest.py), breaks the lock of a
  holder that died, and on SQLite puts the lock file next to the database even for a relative
  ``sqlite:///mlflow.db``.
* Credentials: a password in the tracking URI appears nowhere lopt prints, logs or raises.

An outage is real: the client talks to the server through a TCP forwarder that the test closes
(connections refused, open connections cut) and opens again on the same port.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from lopt.store import registry
from lopt.redaction import redact, split_credentials
from pipeline import cli

SECRET = "s3cret-Pa55"
# What lopt sets (and a user may change) to bound the wait on a dead server; the tests that do not
# measure the defaults set the shortest, so that each failure costs about a second.
FAST_FAIL = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "2"}
CREDENTIAL_VARIABLES = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def _closed_port() -> int:
    """A port on 127.0.0.1 nothing listens on: connecting is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _restore_env(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    """Undo, after the test, whatever the code under test does to these variables (the CLI sets
    LOPT_HOME and the credentials for the steps it starts)."""
    for name in names:
        original = os.environ.get(name)
        monkeypatch.setenv(name, original or "")  # records the original value, or its absence
        if original is None:
            monkeypatch.delenv(name)


@pytest.fixture
def fast_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in FAST_FAIL.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A fresh LOPT_HOME, no tracking URI or credentials from outside; all restored afterwards."""
    _restore_env(monkeypatch, "LOPT_HOME", "MLFLOW_TRACKING_URI", "XLA_FLAGS", *CREDENTIAL_VARIABLES)
    for name in ("MLFLOW_TRACKING_URI", *CREDENTIAL_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    monkeypatch.setenv("LOPT_HOME", str(home))
    return home


# ---------------------------------------------------------------------------------------------
# A server that is down


CLI_COMMANDS = {
    "run": ["run", "--budget", "tiny"],
    "retrain-check": ["retrain-check", "--budget", "tiny"],
    "fetch": ["fetch", "models:/l3rs-cnn-mnist@champion", "--out", "{out}"],
    "finetune": ["finetune", "--dataset", "sklearn_digits", "--steps", "5",
                 "--optimizer", "models:/l3rs-cnn-mnist@champion"],
}


@pytest.mark.parametrize("command", sorted(CLI_COMMANDS))
def test_every_command_fails_fast_with_one_line_when_the_server_is_down(
    command, clean_env, fast_fail, tmp_path, capsys
):
    url = f"http://lopt:{SECRET}@127.0.0.1:{_closed_port()}"
    argv = [a.format(out=tmp_path / "out") for a in CLI_COMMANDS[command]]
    start = time.monotonic()
    code = cli.main([*argv, "--home", str(clean_env), "--tracking-uri", url])
    elapsed = time.monotonic() - start
    captured = capsys.readouterr()
    assert code == 2, captured
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    # The URI as given, password redacted, or without the credentials (moved to MLflow's
    # variables, see test_a_command_uses_the_password_but_never_prints_it).
    server = re.escape(url.rsplit("@", 1)[1])
    assert re.match(
        rf"lopt: error: cannot reach the MLflow tracking server at http://(lopt:\*\*\*@)?{server}: "
        rf"connection refused \(1 attempt; ",
        lines[0],
    ), lines[0]
    assert "MLFLOW_HTTP_REQUEST_TIMEOUT" in lines[0]
    assert SECRET not in captured.err + captured.out
    assert elapsed < 15, f"{command} took {elapsed:.1f} s to give up"
    assert not (tmp_path / "out").exists()


def test_lopt_gives_up_on_a_dead_server_within_seconds_by_default(clean_env, tmp_path):
    """The shipped defaults, through the installed command: MLflow's own (120 s per request,
    7 retries with growing waits) kept `lopt fetch` silent for minutes."""
    env = {k: v for k, v in os.environ.items() if k not in registry.HTTP_DEFAULTS}
    url = f"http://lopt:{SECRET}@127.0.0.1:{_closed_port()}"
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "fetch", "models:/l3rs-cnn-mnist@champion",
         "--out", str(tmp_path / "out"), "--home", str(clean_env), "--tracking-uri", url],
        capture_output=True, text=True, env=env, timeout=120,
    )
    elapsed = time.monotonic() - start
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"lopt: error: cannot reach the MLflow tracking server at http://lopt:***@"
        f"{url.rsplit('@', 1)[1]}: connection refused (4 attempts; "
        f"MLFLOW_HTTP_REQUEST_MAX_RETRIES=3, MLFLOW_HTTP_REQUEST_TIMEOUT=20 s). Check that the "
        f"server is running and that --tracking-uri or MLFLOW_TRACKING_URI names it; raise those "
        f"two variables to wait longer."
    ]
    assert SECRET not in done.stdout + done.stderr
    # Four attempts, waits of 0, 2 and 4 s plus up to 1 s of jitter each, and the imports.
    assert elapsed < 45, f"took {elapsed:.1f} s"


def test_the_library_raises_one_clear_error_not_mlflows(fast_fail):
    url = f"http://lopt:{SECRET}@127.0.0.1:{_closed_port()}"
    with pytest.raises(registry.TrackingServerError) as caught:
        registry.resolve("models:/cnn-mnist@champion", url)
    message = str(caught.value)
    assert message.startswith(f"cannot reach the MLflow tracking server at {redact(url)}")
    assert SECRET not in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_a_server_that_accepts_but_never_answers_times_out(monkeypatch):
    """A hung server (or a proxy in front of a dead one): bounded by MLFLOW_HTTP_REQUEST_TIMEOUT."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(8)  # the kernel completes the handshake; nobody ever reads or answers
        url = f"http://127.0.0.1:{hung.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(registry.TrackingServerError, match="no answer within 1 s"):
            registry.ping(url)
    assert time.monotonic() - start < 10


class Forwarder:
    """A TCP forwarder from a port on 127.0.0.1 to the server: :meth:`cut` closes the port and
    every open connection (an outage), :meth:`restore` listens on the same port again."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = _closed_port()
        self._listener: socket.socket | None = None
        self._connections: list[socket.socket] = []
        self._lock = threading.Lock()
        self.restore()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            connections, self._connections = self._connections, []
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
            connection.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._connections += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        for s in (source, sink):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def forwarder(mlflow_server):
    host, port = mlflow_server.url.removeprefix("http://").split(":")
    forwarder = Forwarder((host, int(port)))
    yield forwarder
    forwarder.cut()


def _history(url: str, run_id: str, key: str) -> dict[int, float]:
    client = MlflowClient(tracking_uri=url)
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def test_metrics_survive_a_short_outage_of_the_server(mlflow_server, forwarder, fast_fail, caplog):
    run_id = registry.start_run("faults-outage", tracking_uri=forwarder.url)
    logger = registry.RunLogger(run_id, forwarder.url, retry_s=0.2)
    logger(0, {"objective": 0.5})
    assert _history(mlflow_server.url, run_id, "objective") == {0: 0.5}  # written at once

    forwarder.cut()
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="lopt.store.registry"):
        for step in range(1, 6):  # meta-steps during the outage: none raises
            logger(step, {"objective": 0.5 - step / 10})
            time.sleep(0.05)
    assert time.monotonic() - start < 10
    assert logger.pending == 5
    warnings = [r.getMessage() for r in caplog.records if "keeping" in r.getMessage()]
    assert len(warnings) == 1, warnings  # one warning per outage, not one per step
    assert "cannot reach the MLflow tracking server" in warnings[0]
    # What the registry's lineage depends on is not buffered: it fails, clearly.
    with pytest.raises(registry.TrackingServerError):
        logger.set_tags({"selected_variant": "seed:0"})

    forwarder.restore()
    logger(6, {"objective": -0.1})
    assert logger.flush(timeout_s=10)
    assert logger.pending == 0
    history = _history(mlflow_server.url, run_id, "objective")
    assert history == pytest.approx({s: 0.5 - s / 10 for s in range(7)})
    registry.end_run(run_id, tracking_uri=forwarder.url)


def test_a_flush_that_cannot_reach_the_server_warns_and_does_not_raise(
    mlflow_server, forwarder, fast_fail, caplog
):
    run_id = registry.start_run("faults-outage", tracking_uri=forwarder.url)
    logger = registry.RunLogger(run_id, forwarder.url, retry_s=0.2)
    forwarder.cut()
    with caplog.at_level(logging.WARNING, logger="lopt.store.registry"):
        logger(0, {"objective": 1.0})
        start = time.monotonic()
        assert logger.flush(timeout_s=1.0) is False
    assert time.monotonic() - start < 8
    assert any("1 metrics of run" in r.getMessage() and "lost" in r.getMessage()
               for r in caplog.records)


# ---------------------------------------------------------------------------------------------
# Locks


def _contend(name: str, url: str, contenders: int, hold_s: float, **kwargs) -> list[tuple[float, float]]:
    """``contenders`` threads, each holding ``exclusive(name, url)`` for ``hold_s``; their
    (enter, leave) times. Each thread takes its own ticket, exactly as separate processes do."""
    spans: list[tuple[float, float]] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(contenders)

    def work() -> None:
        try:
            barrier.wait()
            with registry.exclusive(name, url, **kwargs):
                enter = time.monotonic()
                time.sleep(hold_s)
                spans.append((enter, time.monotonic()))
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=work) for _ in range(contenders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    return sorted(spans)


def test_exclusive_holds_on_an_mlflow_server(mlflow_server):
    spans = _contend("promotion-race", mlflow_server.url, contenders=4, hold_s=0.3)
    assert len(spans) == 4
    for (_, left), (entered, _) in zip(spans, spans[1:]):
        assert entered >= left, f"two holders at once: {spans}"
    # Every ticket is gone again; the lock model stays, out of the way.
    client = MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)
    assert client.search_model_versions("name='lopt-lock.promotion-race'") == []
    assert client.get_registered_model("lopt-lock.promotion-race").tags == {"lopt.lock": "true"}


def test_the_lock_of_a_dead_holder_expires(mlflow_server, caplog):
    client = MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)
    with registry.exclusive("crashed", mlflow_server.url):
        pass  # creates the lock model
    # A process that took its ticket and died: nobody renews it.
    dead = client.create_model_version(
        "lopt-lock.crashed", source="lopt-lock:/gone/1",
        tags={"lopt.lock.owner": "gone:1", "lopt.lock.heartbeat": "0"},
    )
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="lopt.store.registry"):
        with registry.exclusive("crashed", mlflow_server.url, lease_s=1.0, timeout_s=30):
            waited = time.monotonic() - start
    assert 1.0 <= waited < 15, waited
    assert any("holder gone:1 has not renewed it" in r.getMessage() for r in caplog.records)
    assert dead.version not in {v.version for v in client.search_model_versions("name='lopt-lock.crashed'")}


def test_a_live_holder_keeps_its_lock_and_a_waiter_times_out_naming_it(mlflow_server):
    held = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with registry.exclusive("busy", mlflow_server.url, lease_s=1.0):
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(30)
        # Three leases long: the heartbeat keeps the holder's ticket alive all along.
        with pytest.raises(TimeoutError, match=r"held by .+:\d+ \(ticket v\d+\)"):
            with registry.exclusive("busy", mlflow_server.url, lease_s=1.0, timeout_s=3.0):
                pytest.fail("got a lock that another process holds")
    finally:
        release.set()
        holder.join(30)


def test_a_relative_sqlite_uri_locks_next_to_its_database(tmp_path, monkeypatch):
    """`sqlite:///mlflow.db` is mlflow.db in the working directory: the lock goes there, not /."""
    monkeypatch.chdir(tmp_path)
    name = f"model-{tmp_path.name}"  # unique: the old code's lock file, in /, would stay behind
    with registry.exclusive(name, "sqlite:///mlflow.db"):
        assert (tmp_path / f"mlflow.db.{name}.lock").is_file()
    assert not Path(f"/mlflow.db.{name}.lock").exists()
    with registry.exclusive(name, f"sqlite:///{tmp_path}/abs.db"):  # four slashes
        assert (tmp_path / f"abs.db.{name}.lock").is_file()


def test_exclusive_holds_between_processes_on_sqlite(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    code = (
        "import sys, time\n"
        "from lopt.store import registry\n"
        "with registry.exclusive('m', sys.argv[1]):\n"
        "    start = time.time(); time.sleep(0.5); print(start, time.time())\n"
    )
    processes = [
        subprocess.Popen([sys.executable, "-c", code, uri], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    spans = sorted(tuple(map(float, p.communicate(timeout=120)[0].split())) for p in processes)
    assert spans[1][0] >= spans[0][1], spans


# ---------------------------------------------------------------------------------------------
# Credentials


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("http://lopt:pw@mlflow:5000", "http://lopt:***@mlflow:5000"),
        ("https://u:p%40ss@h/path?x=1", "https://u:***@h/path?x=1"),
        ("http://u:p@ss@h:5000/api", "http://u:***@h:5000/api"),  # an unencoded @ as urllib reads it
        ("postgresql+psycopg2://mlflow:pw@db:5432/mlflow", "postgresql+psycopg2://mlflow:***@db:5432/mlflow"),
        ("API request to http://u:pw@h:1/api/2.0/x failed", "API request to http://u:***@h:1/api/2.0/x failed"),
        ("http://mlflow:5000", "http://mlflow:5000"),
        ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
    ],
)
def test_redact(text, expected):
    assert redact(text) == expected


def test_credentials_move_out_of_an_http_uri():
    assert split_credentials("http://lopt:p%40ss@mlflow:5000/") == (
        "http://mlflow:5000/",
        {"MLFLOW_TRACKING_USERNAME": "lopt", "MLFLOW_TRACKING_PASSWORD": "p@ss"},
    )
    # A database has no other place for its password; an http URI without one stays as it is.
    assert split_credentials("postgresql://u:pw@db/m") == ("postgresql://u:pw@db/m", {})
    assert split_credentials("http://mlflow:5000") == ("http://mlflow:5000", {})


def test_a_command_uses_the_password_but_never_prints_it(mlflow_server, clean_env, capsys):
    """The credentials move to MLflow's variables (which the steps of `lopt run` inherit, and
    which a cluster fills from the mlflow-credentials Secret); output shows none of them."""
    host = mlflow_server.url.removeprefix("http://")
    url = f"http://lopt:{SECRET}@{host}"
    code = cli.main(["retrain-check", "--budget", "tiny", "--json", "--home", str(clean_env),
                     "--tracking-uri", url])
    captured = capsys.readouterr()
    assert code == 1, captured  # nothing registered yet: retraining is due
    assert "retrain: no cnn-mnist@champion in the registry yet" in captured.out
    assert SECRET not in captured.out + captured.err
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == SECRET
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "lopt"


def test_submit_refuses_a_password_in_the_tracking_uri(capsys):
    code = cli.main(["submit", "--host", f"http://127.0.0.1:{_closed_port()}", "--image", "lopt:1",
                     "--tracking-uri", f"http://lopt:{SECRET}@mlflow.lopt:5000"])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.strip().splitlines() == [
        "lopt: error: --tracking-uri http://lopt:***@mlflow.lopt:5000 carries a password, which "
        "the cluster would store and show with the run's parameters. Pass it without "
        "(--tracking-uri http://mlflow.lopt:5000) and put the credentials in the "
        "'mlflow-credentials' Secret (MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD; "
        "manifests/README.md), which the steps read."
    ]
