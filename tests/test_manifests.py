"""Offline checks of manifests/: no cluster, no registry, no network.

What a cluster would refuse or silently get wrong, checked here instead:

- every YAML document validates in strict mode (unknown fields are errors) against the
  Kubernetes API of KUBERNETES_VERSION (kubernetes-validate's bundled schemas), and custom
  resources and kustomization files against the JSON schemas in manifests/schemas/;
- every kustomization's references exist, every resource file is reachable from one, none
  ships a Secret, and, where kubectl is installed, `kubectl kustomize` renders each one to
  exactly the objects resolved here, all valid;
- the workloads: resources, probes, the "restricted" pod security settings, pinned images, and
  references that must match (Secrets and their keys, ServiceAccounts, claims, Service and
  NetworkPolicy selectors, named ports);
- the contract with pipeline/pipeline.py: Secret, ConfigMap and key names, and a tracking URI
  that names the MLflow Service and passes the server's Host-header check;
- the Secrets hold placeholders only; the schedule's cron has six fields;
- the Dockerfiles: pinned bases, a numeric non-root USER, a build context that holds what
  they copy and nothing else; the constraints pin everything and agree with pyproject.toml.
"""

from __future__ import annotations

import ast
import base64
import copy
import fnmatch
import functools
import json
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "manifests"
SCHEMAS = MANIFESTS / "schemas"
# Secret templates: documented keys, never applied by a kustomization (manifests/README.md).
SECRET_TEMPLATES = MANIFESTS / "secrets"
IMAGE_DIR = MANIFESTS / "image"
DOCKERFILES = sorted(IMAGE_DIR.glob("*Dockerfile"))
CONSTRAINTS = IMAGE_DIR / "constraints.txt"

KUBERNETES_VERSION = "1.32"
CUSTOM_SCHEMAS = {
    ("kubeflow.org/v1beta1", "ScheduledWorkflow"): "scheduledworkflow-v1beta1.json",
    ("kustomize.config.k8s.io/v1beta1", "Kustomization"): "kustomization.json",
}
PLACEHOLDER = re.compile(r"REPLACE-(ME|WITH-[A-Z0-9-]+)")
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume",
                  "StorageClass", "CustomResourceDefinition", "PriorityClass"}
LONG_RUNNING = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"}
WORKLOADS = LONG_RUNNING | {"Job", "CronJob", "Pod"}


# --- loading ---------------------------------------------------------------------------------

def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


@functools.cache
def load_documents(path: Path) -> tuple[dict, ...]:
    return tuple(doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None)


YAML_FILES = sorted(
    p for p in MANIFESTS.rglob("*") if p.suffix in (".yaml", ".yml") and SCHEMAS not in p.parents
)
DOCUMENTS = [(path, i, doc) for path in YAML_FILES for i, doc in enumerate(load_documents(path))]
KUSTOMIZATIONS = sorted(p.parent for p in YAML_FILES if p.name == "kustomization.yaml")
RESOURCES = [(path, doc) for path, _, doc in DOCUMENTS if path.name != "kustomization.yaml"]


def name_of(doc: dict) -> str:
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def doc_id(path: Path, doc: dict) -> str:
    return f"{rel(path)}:{name_of(doc)}"


def by_kind(kind: str) -> list[dict]:
    return [doc for _, doc in RESOURCES if doc.get("kind") == kind]


def the(kind: str, name: str) -> dict:
    found = [doc for doc in by_kind(kind) if doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected exactly one {kind}/{name} under manifests/, found {len(found)}"
    return found[0]


# --- validation ------------------------------------------------------------------------------

@functools.cache
def schema_validator(name: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((SCHEMAS / name).read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())


def schema_errors(doc: dict) -> list[str]:
    """Problems with one document: a custom schema's, else the Kubernetes API's (strict)."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in CUSTOM_SCHEMAS:
        errors = schema_validator(CUSTOM_SCHEMAS[key]).iter_errors(doc)
        return sorted(f"/{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:
        return [f"/{'/'.join(map(str, err.absolute_path))}: {err.message}"]
    except kubernetes_validate.SchemaNotFoundError as err:
        return [f"{err.message}: a custom resource needs a schema in manifests/schemas/"]
    return []


@pytest.mark.parametrize(
    "path, doc", [(p, d) for p, _, d in DOCUMENTS], ids=[doc_id(p, d) for p, _, d in DOCUMENTS]
)
def test_document_validates(path: Path, doc: dict) -> None:
    if errors := schema_errors(doc):
        pytest.fail(f"{rel(path)} {name_of(doc)}:\n" + "\n".join(errors), pytrace=False)


SCHEMA_MUTATIONS = {
    # A field name with the wrong case: KFP's CRD would store and ignore it.
    "swf-field-typo": ("schedule/scheduledworkflow.yaml",
                       lambda d: d["spec"].__setitem__("noCatchUp", d["spec"].pop("noCatchup"))),
    "swf-five-field-cron": ("schedule/scheduledworkflow.yaml",
                            lambda d: d["spec"]["trigger"]["cronSchedule"].__setitem__("cron", "0 3 * * *")),
    "swf-concurrency-out-of-range": ("schedule/scheduledworkflow.yaml",
                                     lambda d: d["spec"].__setitem__("maxConcurrency", 11)),
    "kustomization-field-typo": ("base/kustomization.yaml",
                                 lambda d: d.__setitem__("resource", d.pop("resources"))),
    "kustomization-image-typo": ("base/kustomization.yaml",
                                 lambda d: d["images"][0].__setitem__("newtag", d["images"][0].pop("newTag"))),
    "kubernetes-field-typo": ("base/mlflow.yaml",
                              lambda d: d["spec"].__setitem__("replica", d["spec"].pop("replicas"))),
}


@pytest.mark.parametrize("mutation", sorted(SCHEMA_MUTATIONS))
def test_validation_catches_typos(mutation: str) -> None:
    """The schemas are strict enough to fail on what a typo produces."""
    file, mutate = SCHEMA_MUTATIONS[mutation]
    docs = [copy.deepcopy(d) for d in load_documents(MANIFESTS / file)]
    target = next(d for d in docs if d["kind"] in ("ScheduledWorkflow", "Kustomization", "Deployment"))
    mutate(target)
    assert schema_errors(target), f"{mutation} was not caught"


# --- kustomizations --------------------------------------------------------------------------

def kustomization(kdir: Path) -> dict:
    return load_documents(kdir / "kustomization.yaml")[0]


def referenced_paths(kdir: Path) -> list[str]:
    k = kustomization(kdir)
    paths = [entry for field in ("resources", "components", "crds", "bases", "configurations",
                                 "generators", "transformers", "validators") for entry in k.get(field, [])]
    paths += [p["path"] for field in ("patches", "patchesJson6902") for p in k.get(field, []) if "path" in p]
    paths += k.get("patchesStrategicMerge", [])
    for generator in k.get("configMapGenerator", []) + k.get("secretGenerator", []):
        paths += [source.split("=", 1)[-1] for source in generator.get("files", [])]
        paths += generator.get("envs", []) + ([generator["env"]] if "env" in generator else [])
    return paths


@pytest.mark.parametrize("kdir", KUSTOMIZATIONS, ids=[rel(k) for k in KUSTOMIZATIONS])
def test_kustomization_references_exist(kdir: Path) -> None:
    for entry in referenced_paths(kdir):
        assert "://" not in entry, f"{rel(kdir)}: remote {entry!r} needs the network and is unpinned"
        target = (kdir / entry).resolve()
        assert target.exists(), f"{rel(kdir)}/kustomization.yaml refers to missing {entry!r}"
        if target.is_dir():
            assert (target / "kustomization.yaml").is_file(), f"{rel(kdir)}: {entry!r} is no kustomization"


def resolve(kdir: Path) -> tuple[list[Path], list[dict]]:
    """The files a kustomization reaches and the objects it makes of them, without kustomize:
    resources followed recursively, then this level's namespace (what this project uses)."""
    k = kustomization(kdir)
    files: list[Path] = []
    docs: list[dict] = []
    for entry in k.get("resources", []):
        target = (kdir / entry).resolve()
        if target.is_dir():
            more_files, more_docs = resolve(target)
            files += more_files
            docs += more_docs
        else:
            files.append(target)
            docs += [copy.deepcopy(doc) for doc in load_documents(target)]
    if namespace := k.get("namespace"):
        for doc in docs:
            if doc["kind"] not in CLUSTER_SCOPED:
                doc["metadata"]["namespace"] = namespace
            if doc["kind"] == "RoleBinding":
                for subject in doc["subjects"]:
                    if subject["kind"] == "ServiceAccount":
                        subject.setdefault("namespace", namespace)
    return files, docs


def test_every_resource_file_is_in_a_kustomization() -> None:
    reached = {file for kdir in KUSTOMIZATIONS for file in resolve(kdir)[0]}
    loose = [rel(path) for path in YAML_FILES if path.name != "kustomization.yaml"
             and SECRET_TEMPLATES not in path.parents and path not in reached]
    assert not loose, f"resource files no kustomization deploys: {loose}"


def test_no_kustomization_ships_a_secret() -> None:
    """`kubectl apply -k` again would reset real credentials to the templates' placeholders,
    so Secrets are created by hand (manifests/README.md) and no kustomization includes one."""
    for kdir in KUSTOMIZATIONS:
        secrets = [name_of(d) for d in resolve(kdir)[1] if d["kind"] == "Secret"]
        assert not secrets, f"{rel(kdir)} would apply {secrets}"
        assert not kustomization(kdir).get("secretGenerator"), f"{rel(kdir)} generates a Secret"


def object_key(doc: dict) -> tuple[str, str, str]:
    return doc["kind"], doc["metadata"].get("namespace", ""), doc["metadata"]["name"]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) not installed")
@pytest.mark.parametrize("kdir", KUSTOMIZATIONS, ids=[rel(k) for k in KUSTOMIZATIONS])
def test_kustomize_renders(kdir: Path) -> None:
    result = subprocess.run(["kubectl", "kustomize", str(kdir)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"kubectl kustomize {rel(kdir)}:\n{result.stderr}"
    rendered = [doc for doc in yaml.safe_load_all(result.stdout) if doc is not None]
    for doc in rendered:
        if errors := schema_errors(doc):
            pytest.fail(f"{rel(kdir)} renders invalid {name_of(doc)}:\n" + "\n".join(errors), pytrace=False)
    # The offline resolution that the other tests rely on makes the same objects.
    assert sorted(map(object_key, rendered)) == sorted(map(object_key, resolve(kdir)[1]))
    for doc in rendered:
        for container in containers(doc):
            assert_image_pinned(container["image"], f"{rel(kdir)} {name_of(doc)}")


# --- workloads -------------------------------------------------------------------------------

def pod_spec(doc: dict) -> dict:
    if doc["kind"] == "Pod":
        return doc["spec"]
    if doc["kind"] == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return doc["spec"]["template"]["spec"]


def containers(doc: dict) -> list[dict]:
    if doc.get("kind") not in WORKLOADS:
        return []
    spec = pod_spec(doc)
    return spec.get("initContainers", []) + spec["containers"]


WORKLOAD_DOCS = [(path, doc) for path, doc in RESOURCES if doc["kind"] in WORKLOADS]
WORKLOAD_IDS = [doc_id(path, doc) for path, doc in WORKLOAD_DOCS]


def test_there_are_workloads() -> None:
    assert {name_of(d) for _, d in WORKLOAD_DOCS} >= {"Deployment/mlflow", "StatefulSet/postgres"}


@pytest.mark.parametrize("path, doc", WORKLOAD_DOCS, ids=WORKLOAD_IDS)
def test_containers_have_requests_and_limits(path: Path, doc: dict) -> None:
    for container in containers(doc):
        for bound in ("requests", "limits"):
            given = container.get("resources", {}).get(bound, {})
            assert {"cpu", "memory"} <= set(given), f"{name_of(doc)}/{container['name']}: {bound} {given}"


@pytest.mark.parametrize("path, doc", WORKLOAD_DOCS, ids=WORKLOAD_IDS)
def test_long_running_containers_have_probes(path: Path, doc: dict) -> None:
    if doc["kind"] not in LONG_RUNNING:
        pytest.skip("runs to completion")
    for container in pod_spec(doc)["containers"]:
        for probe in ("readinessProbe", "livenessProbe"):
            assert probe in container, f"{name_of(doc)}/{container['name']} has no {probe}"


@pytest.mark.parametrize("path, doc", WORKLOAD_DOCS, ids=WORKLOAD_IDS)
def test_pods_meet_the_restricted_profile(path: Path, doc: dict) -> None:
    """Pod Security "restricted", which base/namespace.yaml enforces, plus no API token."""
    spec = pod_spec(doc)
    pod = spec.get("securityContext", {})
    assert spec.get("automountServiceAccountToken") is False, f"{name_of(doc)} mounts an API token"
    for container in containers(doc):
        where = f"{name_of(doc)}/{container['name']}"
        ctx = container.get("securityContext", {})
        assert ctx.get("runAsNonRoot", pod.get("runAsNonRoot")) is True, f"{where}: runAsNonRoot"
        assert ctx.get("runAsUser", pod.get("runAsUser")) not in (0, None), f"{where}: numeric non-root uid"
        assert ctx.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation"
        assert "ALL" in ctx.get("capabilities", {}).get("drop", []), f"{where}: capabilities drop ALL"
        seccomp = ctx.get("seccompProfile", pod.get("seccompProfile", {})).get("type")
        assert seccomp in ("RuntimeDefault", "Localhost"), f"{where}: seccompProfile {seccomp}"


def assert_image_pinned(image: str, where: str) -> None:
    name, _, digest = image.partition("@")
    tag = name.rsplit("/", 1)[-1].partition(":")[2]
    assert digest.startswith("sha256:") or tag, f"{where}: image {image!r} has neither tag nor digest"
    assert tag != "latest", f"{where}: image {image!r} uses :latest"


@pytest.mark.parametrize("path, doc", WORKLOAD_DOCS, ids=WORKLOAD_IDS)
def test_images_are_pinned(path: Path, doc: dict) -> None:
    for container in containers(doc):
        assert_image_pinned(container["image"], f"{name_of(doc)}/{container['name']}")


def secret_keys() -> dict[str, set[str]]:
    keys: dict[str, set[str]] = {}
    for doc in by_kind("Secret"):
        keys.setdefault(doc["metadata"]["name"], set()).update(doc.get("stringData", {}), doc.get("data", {}))
    return keys


@pytest.mark.parametrize("path, doc", WORKLOAD_DOCS, ids=WORKLOAD_IDS)
def test_workload_references_resolve(path: Path, doc: dict) -> None:
    """Names that must match other manifests: Secrets and keys, ServiceAccount, claims."""
    spec = pod_spec(doc)
    secrets = secret_keys()
    for container in containers(doc):
        for env in container.get("env", []):
            if ref := env.get("valueFrom", {}).get("secretKeyRef"):
                assert ref["key"] in secrets.get(ref["name"], set()), (
                    f"{name_of(doc)}: {env['name']} reads {ref['name']}/{ref['key']}, which no "
                    f"Secret template in manifests/secrets/ has")
    if account := spec.get("serviceAccountName"):
        assert account in {d["metadata"]["name"] for d in by_kind("ServiceAccount")}, account
    claims = {d["metadata"]["name"] for d in by_kind("PersistentVolumeClaim")}
    for volume in spec.get("volumes", []):
        if claim := volume.get("persistentVolumeClaim"):
            assert claim["claimName"] in claims, f"{name_of(doc)}: no claim {claim['claimName']}"


@pytest.mark.parametrize("path, doc", WORKLOAD_DOCS, ids=WORKLOAD_IDS)
def test_workload_selector_matches_its_pods(path: Path, doc: dict) -> None:
    if selector := doc["spec"].get("selector", {}).get("matchLabels"):
        labels = doc["spec"]["template"]["metadata"].get("labels", {})
        assert selector.items() <= labels.items(), f"{name_of(doc)}: {selector} does not select {labels}"


def selected_workloads(selector: dict) -> list[dict]:
    return [doc for _, doc in WORKLOAD_DOCS
            if selector.items() <= doc["spec"]["template"]["metadata"]["labels"].items()]


def test_services_and_network_policies_select_pods() -> None:
    for service in by_kind("Service"):
        selected = selected_workloads(service["spec"]["selector"])
        assert selected, f"{name_of(service)} selects no pods"
        ports = {p["name"]: p["containerPort"] for w in selected for c in containers(w) for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            target = port["targetPort"]
            assert target in ports or target in ports.values(), f"{name_of(service)}: no port {target}"
    for policy in by_kind("NetworkPolicy"):
        assert selected_workloads(policy["spec"]["podSelector"]["matchLabels"]), name_of(policy)
        for rule in policy["spec"].get("ingress", []):
            for peer in rule.get("from", []):
                if (labels := peer.get("podSelector", {}).get("matchLabels")) and "namespaceSelector" not in peer:
                    assert selected_workloads(labels), f"{name_of(policy)}: no pods labelled {labels}"


def test_statefulset_service_is_headless() -> None:
    for statefulset in by_kind("StatefulSet"):
        service = the("Service", statefulset["spec"]["serviceName"])
        assert service["spec"].get("clusterIP") == "None", "a StatefulSet's governing Service is headless"


# --- secrets and the contract with the pipeline ----------------------------------------------

def test_secrets_hold_placeholders_only() -> None:
    secrets = [(path, doc) for path, doc in RESOURCES if doc["kind"] == "Secret"]
    assert secrets, "the Secret templates are missing"
    for path, doc in secrets:
        assert SECRET_TEMPLATES in path.parents, f"{rel(path)}: Secrets belong in manifests/secrets/"
        values = dict(doc.get("stringData", {}))
        values.update({k: base64.b64decode(v).decode() for k, v in doc.get("data", {}).items()})
        for key, value in values.items():
            assert PLACEHOLDER.fullmatch(str(value)), f"{rel(path)}: {key} is not a placeholder"


def pipeline_constants() -> dict:
    """The names pipeline/pipeline.py compiles into the pipeline, read without importing kfp."""
    wanted = {"MLFLOW_SECRET", "MLFLOW_SECRET_KEYS", "CONFIG_MAP", "CONFIG_MAP_KEYS"}
    tree = ast.parse((ROOT / "pipeline" / "pipeline.py").read_text())
    found = {target.id: ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
             for target in node.targets if isinstance(target, ast.Name) and target.id in wanted}
    if not found:
        pytest.skip("pipeline/pipeline.py does not name the cluster's Secret and ConfigMap yet")
    assert set(found) == wanted, f"pipeline/pipeline.py no longer defines {wanted - set(found)}"
    return found


def mlflow_args() -> dict[str, str]:
    container = pod_spec(the("Deployment", "mlflow"))["containers"][0]
    return dict(arg.removeprefix("--").partition("=")[::2] for arg in container["args"])


def test_pipeline_names_match_the_manifests() -> None:
    names = pipeline_constants()
    secret = the("Secret", names["MLFLOW_SECRET"])
    assert set(secret["stringData"]) == set(names["MLFLOW_SECRET_KEYS"])
    config = the("ConfigMap", names["CONFIG_MAP"])
    assert set(config["data"]) == set(names["CONFIG_MAP_KEYS"])
    role = the("Role", "lopt-mlflow-credentials-reader")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["secrets"],
                              "resourceNames": [names["MLFLOW_SECRET"]], "verbs": ["get"]}]


def test_tracking_uri_reaches_the_mlflow_server() -> None:
    """The URI the steps get names the MLflow Service, in base's namespace, on its port, with
    a Host header the server accepts (it answers 403 to hosts not in --allowed-hosts)."""
    uri = urlsplit(the("ConfigMap", "lopt-config")["data"]["MLFLOW_TRACKING_URI"])
    service, namespace, *_ = uri.hostname.split(".")
    assert uri.hostname == f"{service}.{namespace}.svc.cluster.local" and uri.scheme == "http"
    assert kustomization(MANIFESTS / "base")["namespace"] == namespace
    assert uri.port in [p["port"] for p in the("Service", service)["spec"]["ports"]]
    allowed = mlflow_args()["allowed-hosts"].split(",")
    assert any(fnmatch.fnmatchcase(uri.netloc, pattern) for pattern in allowed), (uri.netloc, allowed)
    assert str(uri.port) == mlflow_args()["port"]


def test_schedule_is_daily_six_field_cron() -> None:
    schedule = the("ScheduledWorkflow", "lopt-retrain")["spec"]
    fields = schedule["trigger"]["cronSchedule"]["cron"].split()
    # KFP's cron has seconds first; a five-field line would silently mean something else.
    assert len(fields) == 6, fields
    assert all(re.fullmatch(r"[0-9A-Z*?/,-]+", f) for f in fields), fields
    assert schedule["noCatchup"] is True and schedule["maxConcurrency"] == 1


# --- images ----------------------------------------------------------------------------------

def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined, pending = [], ""
    for line in dockerfile.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        joined.append(pending + line)
        pending = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1].strip()) for text in joined]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=[d.name for d in DOCKERFILES])
def test_dockerfile_base_is_pinned(dockerfile: Path) -> None:
    bases = [args.split()[-1] if " AS " not in args.upper() else args.split()[0]
             for op, args in instructions(dockerfile) if op == "FROM"]
    assert bases
    for base in bases:
        name, _, digest = base.partition("@")
        tag = name.rsplit("/", 1)[-1].partition(":")[2]
        assert digest.startswith("sha256:") or re.match(r"\d+\.\d+\.\d+", tag), (
            f"{dockerfile.name}: FROM {base} is not pinned to a full version or digest")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=[d.name for d in DOCKERFILES])
def test_dockerfile_runs_as_numeric_non_root_user(dockerfile: Path) -> None:
    users = [args for op, args in instructions(dockerfile) if op == "USER"]
    assert users, f"{dockerfile.name} runs as root"
    uid = users[-1].partition(":")[0]
    # Numeric, or the kubelet cannot verify runAsNonRoot against the image.
    assert uid.isdigit() and int(uid) != 0, f"{dockerfile.name}: USER {users[-1]}"


def environment(dockerfile: Path) -> dict[str, str]:
    return dict(pair.partition("=")[::2] for op, args in instructions(dockerfile) if op == "ENV"
                for pair in shlex.split(args))


def test_component_image_environment() -> None:
    env = environment(IMAGE_DIR / "Dockerfile")
    assert env["MLFLOW_DISABLE_TELEMETRY"] == "true" and env["PYTHONUNBUFFERED"] == "1"
    assert env["LOPT_HOME"].startswith(env["HOME"] + "/")


def test_mlflow_image_matches_its_deployment() -> None:
    """Same MLflow as the client, same driver as the tests, same uid as the pod."""
    pins = constraint_pins()
    run = " ".join(args for op, args in instructions(IMAGE_DIR / "mlflow-server.Dockerfile") if op == "RUN")
    test_extra = [Requirement(r) for r in pyproject()["project"]["optional-dependencies"]["test"]]
    driver = next(r for r in test_extra if r.name == "psycopg2-binary")
    assert f"mlflow=={pins['mlflow']}" in run and f"psycopg2-binary{driver.specifier}" in run
    image = next(i for i in kustomization(MANIFESTS / "base")["images"] if i["name"] == "lopt-mlflow-server")
    assert image["newTag"] == pins["mlflow"]
    user = [args for op, args in instructions(IMAGE_DIR / "mlflow-server.Dockerfile") if op == "USER"][-1]
    assert pod_spec(the("Deployment", "mlflow"))["securityContext"]["runAsUser"] == int(user.partition(":")[0])
    # SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3: the URI must name the driver
    # the image installs, or the server dies at start ("No module named 'psycopg'").
    (container,) = pod_spec(the("Deployment", "mlflow"))["containers"]
    env = {e["name"]: e.get("value", "") for e in container["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://")


def docker_ignored(path: str, patterns: list[str]) -> bool:
    """Docker's own .dockerignore rule, from the docker SDK (a dependency of the pinned
    mlflow): the last matching pattern, on the path or a parent, wins."""
    from docker.utils.build import PatternMatcher

    return PatternMatcher(patterns).matches(path)


def test_build_context_holds_what_the_images_copy_and_nothing_else() -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for dockerfile in DOCKERFILES:
        for op, args in instructions(dockerfile):
            if op not in ("COPY", "ADD") or "--from" in args:
                continue
            for source in shlex.split(args)[:-1]:
                target = ROOT / source
                assert target.exists(), f"{dockerfile.name} copies missing {source}"
                files = [target] if target.is_file() else [p for p in target.rglob("*.py")
                                                          if "__pycache__" not in p.parts]
                for file in files:
                    assert not docker_ignored(rel(file), patterns), f"{rel(file)} is not in the build context"
    for kept_out in (".git/config", ".venv/bin/python", ".lopt/mlflow.db", "benchmarks/results/x.json",
                     "lopt/__pycache__/l3rs.cpython-311.pyc", "tests/test_manifests.py", "lopt.egg-info/PKG-INFO"):
        assert docker_ignored(kept_out, patterns), f"{kept_out} would be sent to the image build"


# --- constraints -----------------------------------------------------------------------------

@functools.cache
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def constraint_pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s=;,<>!~]+)", line)
        assert match, f"constraints.txt: {line!r} is not name==version"
        name = canonicalize_name(match[1])
        assert name not in pins, f"constraints.txt pins {name} twice"
        pins[name] = match[2]
    return pins


def test_constraints_pin_every_line() -> None:
    # constraint_pins() fails on any line that is not name==version; the steps need these.
    assert {"kfp", "kfp-kubernetes", "mlflow", "jax", "jaxlib", "optax"} <= set(constraint_pins())


def test_constraints_agree_with_pyproject() -> None:
    pins = constraint_pins()
    for line in pyproject()["project"]["dependencies"]:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} (pyproject.toml) is not in constraints.txt: regenerate it"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {name}=={pins[name]}, pyproject.toml wants {requirement.specifier}")


def test_constraints_leave_out_test_only_packages() -> None:
    pins = constraint_pins()
    for line in pyproject()["project"]["optional-dependencies"]["test"]:
        assert canonicalize_name(Requirement(line).name) not in pins, line
