"""Running on a cluster without one: the compiled cluster package, and the exact KFP API
requests ``lopt submit`` / ``lopt schedule`` make, captured by a recording HTTP server that
answers like the KFP v2beta1 REST API (no Kubeflow cluster exists here; see README)."""

from __future__ import annotations

import datetime as dt
import http.server
import json
import threading
import urllib.parse
from pathlib import Path

import pytest
import yaml

from pipeline import cli
from pipeline.cluster import check_cron
from pipeline.pipeline import CONFIG_MAP, MLFLOW_SECRET, STEP_RESOURCES, ClusterTarget

IMAGE = "registry.example.com/lopt:0.1.0"


class FakeKFP(http.server.ThreadingHTTPServer):
    """Records every request; answers healthz, experiments, runs and recurring runs."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[dict] = []
        self.experiments: list[dict] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def posted(self, path: str) -> list[dict]:
        return [r["body"] for r in self.requests if r["method"] == "POST" and r["path"] == path]


class _Handler(http.server.BaseHTTPRequestHandler):
    server: FakeKFP

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def _reply(self, body: dict, status: int = 200) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _record(self, body: dict | None) -> str:
        url = urllib.parse.urlparse(self.path)
        self.server.requests.append(
            {"method": self.command, "path": url.path, "query": urllib.parse.parse_qs(url.query), "body": body}
        )
        return url.path

    def do_GET(self) -> None:
        path = self._record(None)
        if path == "/apis/v2beta1/healthz":
            self._reply({"multi_user": False})
        elif path == "/apis/v2beta1/experiments":
            self._reply({"experiments": self.server.experiments} if self.server.experiments else {})
        else:
            self._reply({"error": f"no route {path}"}, 404)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
        path = self._record(body)
        if path == "/apis/v2beta1/experiments":
            experiment = {**body, "experiment_id": f"exp-{len(self.server.experiments) + 1}"}
            self.server.experiments.append(experiment)
            self._reply(experiment)
        elif path == "/apis/v2beta1/runs":
            self._reply({**body, "run_id": "run-1", "state": "PENDING"})
        elif path == "/apis/v2beta1/recurringruns":
            self._reply({**body, "recurring_run_id": "rr-1", "status": "ENABLED"})
        else:
            self._reply({"error": f"no route {path}"}, 404)


@pytest.fixture
def kfp_server():
    server = FakeKFP()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _executors(spec: dict) -> dict:
    return spec["deploymentSpec"]["executors"]


def _steps(spec: dict) -> dict:
    """The steps inside the pipeline's dsl.ExitHandler (its exit task, finish-run, is beside)."""
    root = spec["root"]["dag"]["tasks"]
    assert set(root) == {"exit-handler-1", "finish-run"}
    assert root["finish-run"]["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    assert root["finish-run"]["dependentTasks"] == ["exit-handler-1"]
    return spec["components"][root["exit-handler-1"]["componentRef"]["name"]]["dag"]["tasks"]


def test_cluster_package_runs_every_step_in_the_image_with_secrets_and_resources(tmp_path):
    out = tmp_path / "cluster.yaml"
    assert cli.main(["compile", "--image", IMAGE, "-o", str(out)]) == 0
    docs = list(yaml.safe_load_all(out.read_text()))
    spec, platform = docs
    executors = _executors(spec)
    assert len(executors) == len(STEP_RESOURCES)
    for name, executor in executors.items():
        container = executor["container"]
        assert container["image"] == IMAGE
        assert float(container["resources"]["cpuLimit"]) >= float(container["resources"]["cpuRequest"])
    (loop,) = [t for t in _steps(spec).values() if "parameterIterator" in t]
    assert "iteratorPolicy" not in loop
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(k8s) == set(executors)
    for config in k8s.values():
        (secret,) = config["secretAsEnv"]
        assert secret["secretName"] == MLFLOW_SECRET
        assert {e["envVar"] for e in secret["keyToEnv"]} == {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}
        assert config["configMapAsEnv"][0]["configMapName"] == CONFIG_MAP
    # No credential travels in the spec itself.
    assert "PASSWORD" not in json.dumps(spec)


def test_local_package_stays_lightweight_with_a_fan_out_and_select_step(tmp_path):
    out = tmp_path / "local.yaml"
    assert cli.main(["compile", "-o", str(out)]) == 0
    spec = yaml.safe_load(out.read_text())
    assert all(e["container"]["image"] == "python:3.11-slim" for e in _executors(spec).values())
    tasks = _steps(spec)
    (loop_name,) = [name for name, task in tasks.items() if "parameterIterator" in task]
    assert set(tasks) == {"prepare-base-model", loop_name, "select-best", "validate", "register"}
    loop = tasks[loop_name]
    assert loop["taskInfo"]["name"] == "meta-train-variants"
    # Locally the variants take turns (each uses every core); a cluster runs them at once.
    assert loop["iteratorPolicy"]["parallelismLimit"] == 1
    assert loop["parameterIterator"]["items"]["inputParameter"] == "pipelinechannel--variants"
    assert spec["root"]["inputDefinitions"]["parameters"]["variants"]["defaultValue"] == ["{}"]
    inner = spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"]
    assert set(inner) == {"meta-train"}
    for task in [*tasks.values(), *inner.values(), spec["root"]["dag"]["tasks"]["finish-run"]]:
        if "componentRef" in task and not task["componentRef"]["name"].startswith("comp-for-loop"):
            assert task["cachingOptions"].get("enableCache", False) is False
    assert sorted(tasks["select-best"]["dependentTasks"]) == sorted([loop_name, "prepare-base-model"])


@pytest.mark.parametrize("image", ["lopt", "registry.example.com/lopt:latest", "localhost:5000/lopt"])
def test_cluster_image_must_be_pinned(image):
    with pytest.raises(ValueError, match="not pinned"):
        ClusterTarget(image)


def test_submit_creates_an_uncached_run_in_the_experiment(kfp_server, capsys):
    code = cli.main([
        "submit", "--host", kfp_server.url, "--image", IMAGE, "--run-name", "nightly",
        "--budget", "tiny", "--fan-out", "2", "--tracking-uri", "http://mlflow.lopt.svc.cluster.local:5000",
    ])
    assert code == 0, capsys.readouterr().err
    assert "submitted run run-1 (nightly)" in capsys.readouterr().out
    (experiment,) = kfp_server.posted("/apis/v2beta1/experiments")
    assert experiment["display_name"] == "lopt"
    (run,) = kfp_server.posted("/apis/v2beta1/runs")
    assert run["display_name"] == "nightly" and run["experiment_id"] == "exp-1"
    params = run["runtime_config"]["parameters"]
    assert params["budget"] == "tiny" and params["if_stale"] is False
    assert [json.loads(v) for v in params["variants"]] == [{"meta_train": {"seed": 0}}, {"meta_train": {"seed": 1}}]
    assert params["tracking_uri"] == "http://mlflow.lopt.svc.cluster.local:5000"
    # With Kubernetes settings, KFP sends the pipeline and platform specs side by side.
    sent = run["pipeline_spec"]
    assert {e["container"]["image"] for e in _executors(sent["pipeline_spec"]).values()} == {IMAGE}
    platform = sent["platform_spec"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert all(c["secretAsEnv"][0]["secretName"] == MLFLOW_SECRET for c in platform.values())
    assert not any(_caching_flags(sent))


def _caching_flags(node) -> list:
    """Every ``enableCache`` value anywhere in a spec (false ones are usually omitted)."""
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "enableCache"] + [x for v in node.values() for x in _caching_flags(v)]
    if isinstance(node, list):
        return [x for v in node for x in _caching_flags(v)]
    return []


def test_schedule_creates_a_recurring_run_with_seconds_first_cron(kfp_server, capsys):
    kfp_server.experiments.append({"experiment_id": "exp-existing", "display_name": "lopt"})
    code = cli.main(["schedule", "--host", kfp_server.url, "--image", IMAGE, "--cron", "0 0 3 * * *"])
    assert code == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "no catch-up" in out and "next runs (UTC)" in out
    # The experiment existed: it is reused, not created again.
    assert kfp_server.posted("/apis/v2beta1/experiments") == []
    (recurring,) = kfp_server.posted("/apis/v2beta1/recurringruns")
    assert recurring["display_name"] == "lopt-retrain"
    assert recurring["experiment_id"] == "exp-existing"
    assert recurring["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * *"
    assert recurring["max_concurrency"] == "1" or recurring["max_concurrency"] == 1
    assert recurring["no_catchup"] is True
    assert recurring["mode"] == "ENABLE"
    # A schedule retrains only when stale unless told --always.
    assert recurring["runtime_config"]["parameters"]["if_stale"] is True
    assert not any(_caching_flags(recurring["pipeline_spec"]))


@pytest.mark.parametrize(
    "cron, message",
    [
        ("0 3 * * *", "Did you mean '0 0 3 * * *'"),
        ("0 0 25 * * *", "not valid"),
        ("0 0 3 * *", "5 fields"),
        ("* * * * * * *", "7 fields"),
        ("0 0 3 * * FUNDAY", "not valid"),
    ],
)
def test_schedule_explains_a_bad_cron_before_calling_the_cluster(kfp_server, capsys, cron, message):
    assert cli.main(["schedule", "--host", kfp_server.url, "--image", IMAGE, "--cron", cron]) == 2
    assert message in capsys.readouterr().err
    assert kfp_server.requests == []


def test_cron_next_times_follow_kfp_seconds_first_semantics():
    start = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    assert [t.hour for t in check_cron("0 0 3 * * *", 2, start)] == [3, 3]
    assert [t.second for t in check_cron("30 * * * * *", 2, start)] == [30, 30]
    assert check_cron("@daily", 1, start)[0] == dt.datetime(2026, 1, 2, tzinfo=dt.timezone.utc)


def test_submit_reports_an_unreachable_cluster(capsys):
    assert cli.main(["submit", "--host", "http://127.0.0.1:9", "--image", IMAGE]) == 3
    assert "Cannot reach the Kubeflow Pipelines API" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "Say which image"),
        (["--image", IMAGE, "--variant", '{"validation": {"grid_size": 3}}'], "'meta_train' fields only"),
        (["--image", IMAGE, "--fan-out", "2", "--variant", "{}"], "not both"),
        (["--image", IMAGE, "--budget", "huge"], "Unknown budget"),
        (["--package", "no/such/file.yaml"], "does not exist"),
    ],
)
def test_submit_rejects_bad_input_without_calling_the_cluster(kfp_server, capsys, args, message):
    assert cli.main(["submit", "--host", kfp_server.url, *args]) == 2
    assert message in capsys.readouterr().err
    assert kfp_server.requests == []


def test_submit_sends_a_precompiled_package_unchanged(kfp_server, tmp_path, capsys):
    package = tmp_path / "p.yaml"
    assert cli.main(["compile", "--image", IMAGE, "-o", str(package)]) == 0
    assert cli.main(["submit", "--host", kfp_server.url, "--package", str(package)]) == 0
    (run,) = kfp_server.posted("/apis/v2beta1/runs")
    spec, platform = yaml.safe_load_all(package.read_text())
    # Sent as compiled (the client only rewrites caching options, to off).
    assert run["pipeline_spec"]["pipeline_spec"]["deploymentSpec"] == spec["deploymentSpec"]
    assert run["pipeline_spec"]["platform_spec"] == platform
    assert not any(_caching_flags(run["pipeline_spec"]))


def test_variants_change_meta_training_only_and_have_short_labels():
    from lopt.config import get_config, seed_variants, variant_label, with_variant

    overrides = with_variant('{"validation": {"grid_size": 3}}', '{"meta_train": {"seed": 7, "sigma": 0.1}}')
    config = get_config("tiny", overrides)
    assert (config.meta_train.seed, config.meta_train.sigma, config.validation.grid_size) == (7, 0.1, 3)
    assert variant_label('{"meta_train": {"seed": 7, "sigma": 0.1}}') == "seed:7 sigma:0.1"
    assert variant_label("{}") == ""
    assert [variant_label(v) for v in seed_variants(3, first_seed=5)] == ["seed:5", "seed:6", "seed:7"]
    with pytest.raises(ValueError, match="at least one"):
        seed_variants(0)


def test_usable_cores_honours_a_kubernetes_cpu_limit(tmp_path):
    from lopt.host import usable_cores

    unlimited = usable_cores(str(tmp_path / "absent"))
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable_cores(str(tmp_path / "cpu.max")) == unlimited
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # half a CPU: still one device
    assert usable_cores(str(tmp_path / "cpu.max")) == 1
    (tmp_path / "cpu.max").write_text(f"{100000 * (unlimited + 8)} 100000\n")
    assert usable_cores(str(tmp_path / "cpu.max")) == unlimited
