"""Offline checks of manifests/: no cluster, no registry, no network.

What a cluster would refuse or silently get wrong, checked here instead:

- every YAML document validates in strict mode (unknown fields are errors) against the
  Kubernetes API of KUBERNETES_VERSION (kubernetes-validate's bundled schemas), and custom
  resources and kustomization files against the JSON schemas in manifests/schemas/;
- every kustomization's references exist, every resource file is reachable from one, none
  ships a Secret, and, where kubectl is installed, `kubectl kustomize` renders each one to
  exactly the objects resolved here, all valid;
- the workloads: resources, probes, the "restricted" pod security settings, pinned images, and
  references that must match (Secrets and their keys, ServiceAccounts, claims, ConfigMaps,
  volumes, Service selectors, named ports);
- the NetworkPolicies, evaluated connection by connection on the manifests' pods and the
  compiled pipeline's step labels: what lopt needs is allowed, nothing else;
- authentication: the MLflow server's basic-auth wiring, the init container's script and its
  refusals, and (slow) both run as the Deployment specifies against PostgreSQL;
- the contract with pipeline/pipeline.py: Secret, ConfigMap and key names, and a tracking URI
  that names the MLflow Service and passes the server's Host-header check;
- the Secrets hold placeholders only; the schedule's cron has six fields;
- the Dockerfiles: pinned bases, a numeric non-root USER, a build context that holds what
  they copy and nothing else; the constraints pin everything and agree with pyproject.toml.
"""

from __future__ import annotations

import ast
import base64
import configparser
import contextlib
import copy
import fnmatch
import functools
import importlib.metadata
import importlib.util
import ipaddress
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import tomllib
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
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


def generated_config_maps(kdir: Path) -> list[dict]:
    """The ConfigMaps of a kustomization's configMapGenerator, under their names without the
    content hash kustomize appends (and rewrites every reference to)."""
    maps = []
    for generator in kustomization(kdir).get("configMapGenerator", []):
        data = {}
        for source in generator.get("files", []):
            key, _, file = source.rpartition("=")
            data[key or Path(file).name] = (kdir / file).read_text()
        maps.append({"apiVersion": "v1", "kind": "ConfigMap",
                     "metadata": {"name": generator["name"]}, "data": data})
    return maps


def resolve(kdir: Path) -> tuple[list[Path], list[dict]]:
    """The files a kustomization reaches and the objects it makes of them, without kustomize:
    resources followed recursively, generated ConfigMaps, then this level's namespace (what
    this project uses)."""
    k = kustomization(kdir)
    files: list[Path] = []
    docs: list[dict] = generated_config_maps(kdir)
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
    # The offline resolution that the other tests rely on makes the same objects, and the
    # same content for generated ConfigMaps (whose rendered names carry a hash).
    offline = resolve(kdir)[1]
    generated = {d["metadata"]["name"]: d for d in offline if d["kind"] == "ConfigMap"
                 and d["metadata"]["name"] in {g["name"] for g in kustomization(kdir).get("configMapGenerator", [])}}
    for doc in rendered:
        base_name = doc["metadata"]["name"].rpartition("-")[0]
        if doc["kind"] == "ConfigMap" and base_name in generated:
            assert doc["data"] == generated[base_name]["data"], doc["metadata"]["name"]
            doc["metadata"]["name"] = base_name
    assert sorted(map(object_key, rendered)) == sorted(map(object_key, offline))
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
    config_maps = {d["metadata"]["name"]: d for d in all_config_maps()}
    for volume in spec.get("volumes", []):
        if claim := volume.get("persistentVolumeClaim"):
            assert claim["claimName"] in claims, f"{name_of(doc)}: no claim {claim['claimName']}"
        if config_map := volume.get("configMap"):
            assert config_map["name"] in config_maps, f"{name_of(doc)}: no ConfigMap {config_map['name']}"
    volumes = {volume["name"] for volume in spec.get("volumes", [])}
    volumes |= {claim["metadata"]["name"] for claim in doc["spec"].get("volumeClaimTemplates", [])}
    for container in containers(doc):
        for mount in container.get("volumeMounts", []):
            assert mount["name"] in volumes, f"{name_of(doc)}/{container['name']}: no volume {mount['name']}"


def all_config_maps() -> list[dict]:
    """ConfigMap documents and the ConfigMaps the kustomizations generate."""
    return by_kind("ConfigMap") + [d for kdir in KUSTOMIZATIONS for d in generated_config_maps(kdir)]


@pytest.mark.parametrize("path, doc", WORKLOAD_DOCS, ids=WORKLOAD_IDS)
def test_workload_selector_matches_its_pods(path: Path, doc: dict) -> None:
    if selector := doc["spec"].get("selector", {}).get("matchLabels"):
        labels = doc["spec"]["template"]["metadata"].get("labels", {})
        assert selector.items() <= labels.items(), f"{name_of(doc)}: {selector} does not select {labels}"


def selected_workloads(selector: dict) -> list[dict]:
    return [doc for _, doc in WORKLOAD_DOCS
            if selector.items() <= doc["spec"]["template"]["metadata"]["labels"].items()]


def test_services_select_pods() -> None:
    for service in by_kind("Service"):
        selected = selected_workloads(service["spec"]["selector"])
        assert selected, f"{name_of(service)} selects no pods"
        ports = {p["name"]: p["containerPort"] for w in selected for c in containers(w) for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            target = port["targetPort"]
            assert target in ports or target in ports.values(), f"{name_of(service)}: no port {target}"


def test_statefulset_service_is_headless() -> None:
    for statefulset in by_kind("StatefulSet"):
        service = the("Service", statefulset["spec"]["serviceName"])
        assert service["spec"].get("clusterIP") == "None", "a StatefulSet's governing Service is headless"


# --- network policies ------------------------------------------------------------------------
# The policies are evaluated here the way a network plugin applies them (Kubernetes'
# NetworkPolicy semantics: a pod selected by any policy of a type is isolated for that
# direction and gets the union of their rules; a connection needs the egress side of its
# source and the ingress side of its destination), on the pods the manifests and the compiled
# pipeline actually make. A changed label or port on either side shows up as a connection that
# is denied where it must be allowed, or the other way round.

@dataclass(frozen=True)
class Pod:
    name: str
    namespace: str
    labels: dict
    named_ports: dict = field(default_factory=dict)


# Not a pod: an address outside the cluster (the internet, the cloud's metadata service).
EXTERNAL = "203.0.113.7"
DNS = Pod("coredns", "kube-system", {"k8s-app": "kube-dns"})


def deployed_documents() -> list[dict]:
    """Every object the kustomizations apply, each in its namespace (resolved offline)."""
    return [doc for kdir in KUSTOMIZATIONS for doc in resolve(kdir)[1]]


def network_policies() -> list[dict]:
    return [doc for doc in deployed_documents() if doc["kind"] == "NetworkPolicy"]


def workload_pod(kind: str, name: str) -> Pod:
    (doc,) = [d for d in deployed_documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    ports = {p["name"]: p["containerPort"] for c in containers(doc) for p in c.get("ports", []) if "name" in p}
    return Pod(name, doc["metadata"]["namespace"], dict(doc["spec"]["template"]["metadata"]["labels"]), ports)


def label_selects(selector: dict, labels: dict) -> bool:
    """A LabelSelector: matchLabels and matchExpressions, all of them ({} selects all)."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        matched = {"In": key in labels and labels[key] in values,
                   "NotIn": key not in labels or labels[key] not in values,
                   "Exists": key in labels, "DoesNotExist": key not in labels}[operator]
        if not matched:
            return False
    return True


def namespace_labels(namespace: str) -> dict:
    # The one label every namespace gets from the API server; our Namespace adds only PSA labels.
    return {"kubernetes.io/metadata.name": namespace}


def peer_matches(peer: dict, policy_namespace: str, other: Pod | str) -> bool:
    if "ipBlock" in peer:
        if not isinstance(other, str):
            return False  # pod addresses are not known here; no policy of ours relies on them
        block = peer["ipBlock"]
        address = ipaddress.ip_address(other)
        return address in ipaddress.ip_network(block["cidr"]) and not any(
            address in ipaddress.ip_network(cidr) for cidr in block.get("except", []))
    if isinstance(other, str):
        return False
    if "namespaceSelector" in peer:
        in_namespace = label_selects(peer["namespaceSelector"], namespace_labels(other.namespace))
    else:
        in_namespace = other.namespace == policy_namespace
    return in_namespace and label_selects(peer.get("podSelector", {}), other.labels)


def port_matches(rule_ports: list[dict] | None, port: int, protocol: str, destination: Pod | str) -> bool:
    if not rule_ports:
        return True  # no ports: every port
    for entry in rule_ports:
        if entry.get("protocol", "TCP") != protocol:
            continue
        if "port" not in entry:
            return True
        wanted = entry["port"]
        if isinstance(wanted, str):  # a named port of the destination pod
            wanted = destination.named_ports.get(wanted) if isinstance(destination, Pod) else None
        if wanted is not None and wanted <= port <= entry.get("endPort", wanted):
            return True
    return False


def policy_types(policy: dict) -> list[str]:
    spec = policy["spec"]
    return spec.get("policyTypes") or (["Ingress"] + (["Egress"] if "egress" in spec else []))


def direction_allows(direction: str, pod: Pod, other: Pod | str, port: int, protocol: str,
                     destination: Pod | str) -> bool:
    """Whether ``pod``'s policies of ``direction`` let it talk to ``other``."""
    field_name, peers_name = {"Egress": ("egress", "to"), "Ingress": ("ingress", "from")}[direction]
    isolating = [p for p in network_policies() if p["metadata"]["namespace"] == pod.namespace
                 and direction in policy_types(p) and label_selects(p["spec"]["podSelector"], pod.labels)]
    if not isolating:
        return True
    return any(
        (not rule.get(peers_name) or any(peer_matches(peer, policy["metadata"]["namespace"], other)
                                         for peer in rule[peers_name]))
        and port_matches(rule.get("ports"), port, protocol, destination)
        for policy in isolating for rule in policy["spec"].get(field_name) or [])


def connection_allowed(source: Pod, destination: Pod | str, port: int, protocol: str = "TCP") -> bool:
    egress = direction_allows("Egress", source, destination, port, protocol, destination)
    if isinstance(destination, str):
        return egress
    return egress and direction_allows("Ingress", destination, source, port, protocol, destination)


@functools.cache
def compiled_step_labels() -> dict[str, dict]:
    """Each step's pod labels in the pipeline compiled for a cluster (kfp-kubernetes)."""
    from kfp import compiler

    from pipeline.pipeline import ClusterTarget, build_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        package = Path(tmp) / "pipeline.yaml"
        compiler.Compiler().compile(build_pipeline(ClusterTarget("registry.example.com/lopt:0.1.0")),
                                    package_path=str(package))
        spec, platform = yaml.safe_load_all(package.read_text())
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(executors) == set(spec["deploymentSpec"]["executors"]), "a step without Kubernetes settings"
    return {name: executor.get("podMetadata", {}).get("labels", {}) for name, executor in executors.items()}


def pipeline_namespace() -> str:
    return kustomization(MANIFESTS / "overlays" / "kubeflow")["namespace"]


def service_target(name: str) -> tuple[Pod, int]:
    """The pod behind Service ``name`` and the container port its first port reaches."""
    service = the("Service", name)
    (workload,) = selected_workloads(service["spec"]["selector"])
    pod = workload_pod(workload["kind"], workload["metadata"]["name"])
    target = service["spec"]["ports"][0]["targetPort"]
    return pod, pod.named_ports.get(target, target)


def test_every_step_carries_the_label_mlflow_admits() -> None:
    steps = compiled_step_labels()
    assert steps, "no steps compiled"
    mlflow, port = service_target("mlflow")
    for name, labels in steps.items():
        step = Pod(name, pipeline_namespace(), labels)
        assert connection_allowed(step, mlflow, port), (
            f"step {name} (labels {labels}) in {pipeline_namespace()} may not reach MLflow on {port}")


def test_network_policies_allow_exactly_what_lopt_needs() -> None:
    mlflow, mlflow_port = service_target("mlflow")
    postgres, postgres_port = service_target("postgres")
    # The tracking URI the steps get ends at this port.
    uri = urlsplit(the("ConfigMap", "lopt-config")["data"]["MLFLOW_TRACKING_URI"])
    assert [p["targetPort"] for p in the("Service", "mlflow")["spec"]["ports"] if p["port"] == uri.port]
    step_labels = next(iter(compiled_step_labels().values()))
    step = Pod("step", pipeline_namespace(), step_labels)
    client_in_lopt = Pod("fetch-job", mlflow.namespace, step_labels)
    other_in_kubeflow = Pod("ml-pipeline", pipeline_namespace(), {"app": "ml-pipeline"})
    other_in_lopt = Pod("debug", mlflow.namespace, {"app": "debug"})
    labelled_elsewhere = Pod("intruder", "default", step_labels)
    expected = [
        # (source, destination, port, protocol, allowed)
        (step, mlflow, mlflow_port, "TCP", True),
        (client_in_lopt, mlflow, mlflow_port, "TCP", True),
        (client_in_lopt, DNS, 53, "UDP", True),
        (mlflow, postgres, postgres_port, "TCP", True),
        (mlflow, DNS, 53, "UDP", True),
        (mlflow, DNS, 53, "TCP", True),
        # MLflow's other ports, PostgreSQL for anyone but MLflow, pods without the label.
        (step, mlflow, mlflow_port + 1, "TCP", False),
        (step, mlflow, mlflow_port, "UDP", False),
        (step, postgres, postgres_port, "TCP", False),
        (client_in_lopt, postgres, postgres_port, "TCP", False),
        (other_in_kubeflow, mlflow, mlflow_port, "TCP", False),
        (other_in_lopt, mlflow, mlflow_port, "TCP", False),
        (labelled_elsewhere, mlflow, mlflow_port, "TCP", False),
        (mlflow, postgres, postgres_port + 1, "TCP", False),
        # No way out: not to the internet, not from PostgreSQL at all, nothing unlabelled.
        (mlflow, EXTERNAL, 443, "TCP", False),
        (mlflow, step, 8080, "TCP", False),
        (client_in_lopt, EXTERNAL, 443, "TCP", False),
        (postgres, DNS, 53, "UDP", False),
        (postgres, mlflow, mlflow_port, "TCP", False),
        (postgres, EXTERNAL, 443, "TCP", False),
        (other_in_lopt, DNS, 53, "UDP", False),
        (other_in_lopt, EXTERNAL, 443, "TCP", False),
    ]
    wrong = [f"{s.namespace}/{s.name} -> {d if isinstance(d, str) else f'{d.namespace}/{d.name}'}:{port}/{proto}"
             f" {'denied' if allowed else 'allowed'}"
             for s, d, port, proto, allowed in expected if connection_allowed(s, d, port, proto) != allowed]
    assert not wrong, "NetworkPolicies decide wrongly:\n" + "\n".join(wrong)


def test_every_pod_in_the_server_namespace_is_isolated_both_ways() -> None:
    namespace = kustomization(MANIFESTS / "base")["namespace"]
    for kind, name in (("Deployment", "mlflow"), ("StatefulSet", "postgres")):
        pod = workload_pod(kind, name)
        for direction in ("Ingress", "Egress"):
            assert any(p["metadata"]["namespace"] == namespace and direction in policy_types(p)
                       and label_selects(p["spec"]["podSelector"], pod.labels) for p in network_policies())
    # And an unknown pod, with no label at all.
    default_deny = [p for p in network_policies() if p["metadata"]["namespace"] == namespace
                    and p["spec"]["podSelector"] == {} and set(policy_types(p)) == {"Ingress", "Egress"}
                    and not p["spec"].get("ingress") and not p["spec"].get("egress")]
    assert default_deny, f"no default-deny NetworkPolicy in {namespace}"


@pytest.mark.parametrize("change", ["step-label", "mlflow-label", "mlflow-port"])
def test_policy_checks_notice_a_changed_label_or_port(change: str) -> None:
    """The evaluation above is not vacuous: what a rename does, it reports."""
    mlflow, port = service_target("mlflow")
    step = Pod("step", pipeline_namespace(), next(iter(compiled_step_labels().values())))
    if change == "step-label":
        step = Pod("step", step.namespace, {k: "yes" for k in step.labels})
    elif change == "mlflow-label":
        mlflow = Pod(mlflow.name, mlflow.namespace, {**mlflow.labels, "app.kubernetes.io/name": "tracking"})
    else:
        port += 80
    assert not connection_allowed(step, mlflow, port)


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


# --- authentication --------------------------------------------------------------------------
# The MLflow server runs MLflow's basic-auth app; the init container `auth-setup` writes its
# config and makes the admin and the pipeline's user match their Secrets
# (manifests/base/mlflow_auth_setup.py). Checked offline for the wiring, and for real: the
# init container's script and the server's flags and environment as the Deployment gives them,
# on PostgreSQL, with the pipeline's client, as in tests/e2e/test_mlflow_server.py.

AUTH_SETUP = MANIFESTS / "base" / "mlflow_auth_setup.py"


def mlflow_containers() -> tuple[dict, dict]:
    """(the init container auth-setup, the server container) of Deployment/mlflow."""
    spec = pod_spec(the("Deployment", "mlflow"))
    (init,) = [c for c in spec.get("initContainers", []) if c["name"] == "auth-setup"]
    (server,) = spec["containers"]
    return init, server


def env_entries(container: dict) -> dict[str, dict]:
    return {entry["name"]: entry for entry in container.get("env", [])}


def mount_of(container: dict, volume: str) -> dict:
    (mount,) = [m for m in container.get("volumeMounts", []) if m["name"] == volume]
    return mount


def setup_script_path() -> tuple[Path, str]:
    """The file the init container runs, followed from its command through its volume mount
    and the ConfigMap generator back to the repository: (the file, the path in the pod)."""
    init, _ = mlflow_containers()
    interpreter, script = init["command"]
    assert interpreter == "python", init["command"]
    volumes = {v["name"]: v for v in pod_spec(the("Deployment", "mlflow"))["volumes"]}
    for mount in init["volumeMounts"]:
        config_map = volumes[mount["name"]].get("configMap")
        if config_map and script.startswith(mount["mountPath"] + "/"):
            key = script.removeprefix(mount["mountPath"] + "/")
            (generator,) = [g for g in kustomization(MANIFESTS / "base")["configMapGenerator"]
                            if g["name"] == config_map["name"]]
            (source,) = [f for f in generator["files"] if f.rpartition("=")[0] == key or Path(f).name == key]
            return (MANIFESTS / "base" / source.rpartition("=")[2]).resolve(), script
    raise AssertionError(f"auth-setup runs {script}, which no ConfigMap volume provides")


def test_mlflow_server_requires_authentication() -> None:
    init, server = mlflow_containers()
    assert mlflow_args()["app-name"] == "basic-auth"
    init_env, server_env = env_entries(init), env_entries(server)
    # The server reads the config file the init container writes, on a volume in memory that
    # only the init container may write.
    config_path = server_env["MLFLOW_AUTH_CONFIG_PATH"]["value"]
    assert init_env["MLFLOW_AUTH_CONFIG_PATH"]["value"] == config_path
    volumes = {v["name"]: v for v in pod_spec(the("Deployment", "mlflow"))["volumes"]}
    (volume,) = [name for name, v in volumes.items() if v.get("emptyDir", {}).get("medium") == "Memory"
                 and any(m["name"] == name for m in server["volumeMounts"])]
    assert str(Path(config_path).parent) == mount_of(init, volume)["mountPath"] == mount_of(server, volume)["mountPath"]
    assert mount_of(server, volume).get("readOnly") is True and not mount_of(init, volume).get("readOnly")
    # Both talk to the same database: the auth tables join the tracking store's.
    assert init_env["MLFLOW_BACKEND_STORE_URI"] == server_env["MLFLOW_BACKEND_STORE_URI"]
    # The init container runs the script in this repository, with the server's image.
    assert setup_script_path()[0] == AUTH_SETUP.resolve()
    assert init["image"] == server["image"]
    assert init_env["MLFLOW_AUTH_DEFAULT_PERMISSION"]["value"] in ("READ", "NO_PERMISSIONS")


def test_auth_credentials_come_from_secrets() -> None:
    init, server = mlflow_containers()
    names = pipeline_constants()
    username_key, password_key = names["MLFLOW_SECRET_KEYS"]
    env = env_entries(init)
    # The pipeline's user is the one its steps sign in as: the same Secret and keys.
    for variable, key in (("LOPT_PIPELINE_USERNAME", username_key), ("LOPT_PIPELINE_PASSWORD", password_key)):
        assert env[variable]["valueFrom"]["secretKeyRef"] == {"name": names["MLFLOW_SECRET"], "key": key}
    admin = {"MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD"}
    assert {env[v]["valueFrom"]["secretKeyRef"]["name"] for v in admin} == {"mlflow-auth"}
    assert env_entries(server)["MLFLOW_FLASK_SERVER_SECRET_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-auth"
    # No password, key or credential as a literal anywhere in the pod.
    for container in (init, server):
        for entry in container["env"]:
            if re.search(r"PASSWORD|SECRET|USERNAME|_USER$", entry["name"]):
                assert "secretKeyRef" in entry.get("valueFrom", {}), f"{container['name']}: {entry['name']}"


@functools.cache
def auth_setup_module():
    spec = importlib.util.spec_from_file_location("mlflow_auth_setup", AUTH_SETUP)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)  # the standard library only, until it syncs users
    return module


def setup_env(tmp: Path, **changes: str) -> dict[str, str]:
    env = {
        "MLFLOW_AUTH_CONFIG_PATH": str(tmp / "auth" / "basic_auth.ini"),
        "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp}/mlflow.db",
        "MLFLOW_AUTH_DEFAULT_PERMISSION": "READ",
        "MLFLOW_AUTH_ADMIN_USERNAME": "admin",
        "MLFLOW_AUTH_ADMIN_PASSWORD": "a" * 24,
        "LOPT_PIPELINE_USERNAME": "lopt-pipeline",
        "LOPT_PIPELINE_PASSWORD": "p" * 24,
    }
    env.update(changes)
    return {k: v for k, v in env.items() if v is not None}


BAD_AUTH_SETTINGS = {
    "admin-password-missing": ({"MLFLOW_AUTH_ADMIN_PASSWORD": None}, "MLFLOW_AUTH_ADMIN_PASSWORD is not set or empty"),
    "pipeline-password-placeholder": ({"LOPT_PIPELINE_PASSWORD": "REPLACE-ME"},
                                      "LOPT_PIPELINE_PASSWORD is still the template's placeholder"),
    "pipeline-password-short": ({"LOPT_PIPELINE_PASSWORD": "short"}, "LOPT_PIPELINE_PASSWORD has 5 characters"),
    "password-with-newline": ({"MLFLOW_AUTH_ADMIN_PASSWORD": "b" * 24 + "\n"}, "contains a line break"),
    "pipeline-is-admin": ({"LOPT_PIPELINE_USERNAME": "admin"}, "both 'admin'"),
    "bad-default-permission": ({"MLFLOW_AUTH_DEFAULT_PERMISSION": "ALL"}, "MLFLOW_AUTH_DEFAULT_PERMISSION is 'ALL'"),
    "no-database": ({"MLFLOW_BACKEND_STORE_URI": ""}, "MLFLOW_BACKEND_STORE_URI is not set or empty"),
}


@pytest.mark.parametrize("case", sorted(BAD_AUTH_SETTINGS))
def test_auth_setup_refuses_bad_settings_before_writing_anything(case: str, tmp_path: Path, capsys) -> None:
    changes, message = BAD_AUTH_SETTINGS[case]
    env = setup_env(tmp_path, **changes)
    assert auth_setup_module().main(env) == 2
    err = capsys.readouterr().err
    assert err.startswith("mlflow-auth-setup: error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "auth").exists() and not (tmp_path / "mlflow.db").exists()
    for name in ("MLFLOW_AUTH_ADMIN_PASSWORD", "LOPT_PIPELINE_PASSWORD"):
        if len(env.get(name, "")) >= 12:
            assert env[name].strip() not in err


def test_auth_config_keeps_a_percent_in_the_database_uri(tmp_path: Path) -> None:
    """MLflow reads the file with configparser's interpolation, where '%' is special."""
    module = auth_setup_module()
    uri = "postgresql+psycopg2://mlflow:p%40ss%25word@postgres:5432/mlflow"
    settings = module.read_settings(setup_env(tmp_path, MLFLOW_BACKEND_STORE_URI=uri))
    module.write_config(settings)
    parser = configparser.ConfigParser()  # as mlflow.server.auth.config.read_auth_config
    parser.read(settings.config_path)
    assert parser["mlflow"]["database_uri"] == uri
    assert parser["mlflow"]["admin_username"] == "admin" and "admin_password" not in parser["mlflow"]
    assert stat.S_IMODE(settings.config_path.stat().st_mode) == 0o600


def kubelet_env(container: dict, secrets: dict[str, dict[str, str]], remap) -> dict[str, str]:
    """A container's environment as the kubelet builds it: Secret keys looked up, $(VAR)
    expanded from the variables before it; ``remap`` moves pod paths and hosts to local ones."""
    env: dict[str, str] = {}
    for entry in container.get("env", []):
        if ref := entry.get("valueFrom", {}).get("secretKeyRef"):
            value = secrets[ref["name"]][ref["key"]]
        else:
            value = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), entry["value"])
        env[entry["name"]] = remap(value)
    return env


@pytest.mark.slow
def test_mlflow_server_with_basic_auth_on_postgres(tmp_path: Path, monkeypatch) -> None:
    """The Deployment's init container and server, run here as the pod would run them: slow for
    PostgreSQL, two runs of the init container and MLflow's migrations (~30 s of CPU; 80 s of
    wall time on 2 shared cores)."""
    import psycopg2
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.server import get_app_client

    import conftest as server_test  # the PostgreSQL and server helpers the mlflow_server fixture uses

    init, server = mlflow_containers()
    script, script_in_pod = setup_script_path()
    secrets = {
        "postgres-credentials": {"POSTGRES_USER": "postgres", "POSTGRES_PASSWORD": "0123456789abcdef",
                                 "POSTGRES_DB": "mlflow"},
        "mlflow-auth": {"MLFLOW_AUTH_ADMIN_USERNAME": "admin", "MLFLOW_AUTH_ADMIN_PASSWORD": "admin-" + "1" * 24,
                        "MLFLOW_FLASK_SERVER_SECRET_KEY": "f" * 64},
        "mlflow-credentials": {"MLFLOW_TRACKING_USERNAME": "lopt-pipeline",
                               "MLFLOW_TRACKING_PASSWORD": "pipeline-" + "2" * 24},
    }
    with contextlib.ExitStack() as cleanup:
        root = Path(tempfile.mkdtemp(prefix="lopt-mlflow-auth-"))
        cleanup.callback(shutil.rmtree, root, ignore_errors=True)
        root.chmod(0o711)  # the postgres user must reach its data directory
        (root / "postgres").mkdir()
        cluster = server_test._start_postgres(root / "postgres", cleanup)
        server_test._create_database(cluster, "mlflow")
        pod_dirs = {}
        for container in (init, server):
            for mount in container["volumeMounts"]:
                pod_dirs.setdefault(mount["mountPath"], root / mount["name"])
        for local in pod_dirs.values():
            local.mkdir(exist_ok=True)

        def remap(value: str) -> str:
            value = value.replace("@postgres:5432/", f"@127.0.0.1:{cluster.port}/")
            for in_pod, local in sorted(pod_dirs.items(), key=lambda item: -len(item[0])):
                if value == in_pod or value.startswith(in_pod + "/"):
                    return str(local) + value[len(in_pod):]
            return value

        def run_init() -> str:
            env = {"PATH": os.environ["PATH"], **kubelet_env(init, secrets, remap)}
            done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                                  timeout=300, cwd=root)
            output = done.stdout + done.stderr
            assert done.returncode == 0, f"auth-setup ({script_in_pod}) failed:\n{output}"
            for values in secrets.values():
                for key, value in values.items():
                    assert "PASSWORD" not in key or value not in output, f"{key} printed"
            return done.stdout

        printed = run_init()
        assert "admin user 'admin': created" in printed and "pipeline user 'lopt-pipeline': created" in printed

        port = server_test._free_port()
        args = dict(arg.removeprefix("--").partition("=")[::2] for arg in server["args"])
        args.update({"host": "127.0.0.1", "port": str(port), "workers": "1",
                     "artifacts-destination": remap(args["artifacts-destination"]),
                     "allowed-hosts": f"127.0.0.1:{port}"})
        command = [str(Path(sys.executable).with_name(server["command"][0])), *server["command"][1:],
                   *[f"--{k}={v}" if v else f"--{k}" for k, v in args.items()]]
        env = {"PATH": os.environ["PATH"], **kubelet_env(server, secrets, remap)}
        log = root / "mlflow-server.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                       start_new_session=True, cwd=root)
        cleanup.callback(server_test._stop_process_group, process)
        url = f"http://127.0.0.1:{port}"
        server_test._wait_healthy(process, url, log)  # /health needs no credentials: the probes

        def status(user: str | None, password: str = "", path: str = "/api/2.0/mlflow/experiments/search?max_results=1") -> int:
            request = urllib.request.Request(url + path)
            if user is not None:
                token = base64.b64encode(f"{user}:{password}".encode()).decode()
                request.add_header("Authorization", f"Basic {token}")
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    return response.status
            except urllib.error.HTTPError as err:
                return err.code

        pipeline = secrets["mlflow-credentials"]
        admin = secrets["mlflow-auth"]
        assert status(None) == 401
        assert status("lopt-pipeline", "not-the-password") == 401
        assert status(pipeline["MLFLOW_TRACKING_USERNAME"], pipeline["MLFLOW_TRACKING_PASSWORD"]) == 200

        def sign_in(user: str, password: str) -> None:
            monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
            monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)

        def can_create_user(user: str, password: str, new_user: str) -> bool:
            sign_in(user, password)
            try:
                get_app_client("basic-auth", url).create_user(new_user, f"{new_user}-password-1234")
                return True
            except MlflowException as err:
                assert err.error_code == "PERMISSION_DENIED", err
                return False

        # What the pipeline does, as its user: experiment, run, artifacts through the server,
        # a registered model with a version and an alias, and reading it all back.
        sign_in(pipeline["MLFLOW_TRACKING_USERNAME"], pipeline["MLFLOW_TRACKING_PASSWORD"])
        client = MlflowClient(url, url)
        run = client.create_run(client.create_experiment("lopt"))
        client.log_metric(run.info.run_id, "meta/objective", 1.0)
        (tmp_path / "optimizer.json").write_text("{}")
        client.log_artifact(run.info.run_id, str(tmp_path / "optimizer.json"), "optimizer")
        client.set_terminated(run.info.run_id)
        client.create_registered_model("l3rs-cnn-mnist")
        version = client.create_model_version("l3rs-cnn-mnist", f"runs:/{run.info.run_id}/optimizer", run.info.run_id)
        client.set_registered_model_alias("l3rs-cnn-mnist", "champion", version.version)
        fetched = Path(client.download_artifacts(run.info.run_id, "optimizer", str(tmp_path)))
        assert (fetched / "optimizer.json").read_text() == "{}"
        # ... and is no admin.
        assert not can_create_user(pipeline["MLFLOW_TRACKING_USERNAME"], pipeline["MLFLOW_TRACKING_PASSWORD"], "intruder")

        # A reader the admin adds sees the champion (default permission READ), changes nothing.
        assert can_create_user(admin["MLFLOW_AUTH_ADMIN_USERNAME"], admin["MLFLOW_AUTH_ADMIN_PASSWORD"], "reader")
        sign_in("reader", "reader-password-1234")
        assert client.get_model_version_by_alias("l3rs-cnn-mnist", "champion").version == version.version
        with pytest.raises(MlflowException, match="PERMISSION_DENIED|Permission denied"):
            client.set_registered_model_alias("l3rs-cnn-mnist", "champion", version.version)

        # An install that had experiments and models before authentication: their creator is
        # unknown, so the pipeline's user may only read them until the admin grants it more
        # (the loop of manifests/README.md, "Upgrading an existing install").
        sign_in(admin["MLFLOW_AUTH_ADMIN_USERNAME"], admin["MLFLOW_AUTH_ADMIN_PASSWORD"])
        old_experiment = client.create_experiment("lopt-base-models")
        client.create_registered_model("cnn-mnist")
        sign_in(pipeline["MLFLOW_TRACKING_USERNAME"], pipeline["MLFLOW_TRACKING_PASSWORD"])
        with pytest.raises(MlflowException, match="PERMISSION_DENIED|Permission denied"):
            client.create_run(old_experiment)
        sign_in(admin["MLFLOW_AUTH_ADMIN_USERNAME"], admin["MLFLOW_AUTH_ADMIN_PASSWORD"])
        auth = get_app_client("basic-auth", url)

        def grant(resource_type: str, resource_id: str) -> None:
            try:
                auth.grant_user_permission("lopt-pipeline", resource_type, resource_id, "MANAGE")
            except MlflowException as err:  # it created this one itself
                if err.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise

        for name in ("lopt", "lopt-base-models"):
            grant("experiment", client.get_experiment_by_name(name).experiment_id)
        for model in client.search_registered_models():
            grant("registered_model", model.name)
        sign_in(pipeline["MLFLOW_TRACKING_USERNAME"], pipeline["MLFLOW_TRACKING_PASSWORD"])
        client.set_terminated(client.create_run(old_experiment).info.run_id)
        client.set_registered_model_tag("cnn-mnist", "checked", "yes")

        # Someone makes the pipeline's user an admin through the API, and both passwords are
        # rotated in the Secrets: the next start (the init container again) applies the
        # Secrets and takes the admin rights back.
        sign_in(admin["MLFLOW_AUTH_ADMIN_USERNAME"], admin["MLFLOW_AUTH_ADMIN_PASSWORD"])
        get_app_client("basic-auth", url).update_user_admin("lopt-pipeline", True)
        old_pipeline, old_admin = pipeline["MLFLOW_TRACKING_PASSWORD"], admin["MLFLOW_AUTH_ADMIN_PASSWORD"]
        pipeline["MLFLOW_TRACKING_PASSWORD"] = "rotated-pipeline-" + "3" * 16
        admin["MLFLOW_AUTH_ADMIN_PASSWORD"] = "rotated-admin-" + "4" * 16
        printed = run_init()
        assert "admin user 'admin': password reset to the Secret's\n" in printed, printed
        assert ("pipeline user 'lopt-pipeline': password reset to the Secret's, admin rights removed"
                in printed), printed
        assert status("lopt-pipeline", old_pipeline) == 401 and status("admin", old_admin) == 401
        assert status("lopt-pipeline", pipeline["MLFLOW_TRACKING_PASSWORD"]) == 200
        assert can_create_user("admin", admin["MLFLOW_AUTH_ADMIN_PASSWORD"], "reader2")
        assert not can_create_user("lopt-pipeline", pipeline["MLFLOW_TRACKING_PASSWORD"], "intruder")

        # One database holds the tracking store and the users; no password in the server's log.
        with contextlib.closing(psycopg2.connect(cluster.dsn("mlflow"))) as connection:
            with connection.cursor() as cursor:
                cursor.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
                tables = {row[0] for row in cursor.fetchall()}
        assert {"users", "alembic_version_auth", "experiments", "registered_models", "alembic_version"} <= tables
        server_log = log.read_text(errors="replace")
        for password in (old_pipeline, old_admin, pipeline["MLFLOW_TRACKING_PASSWORD"], admin["MLFLOW_AUTH_ADMIN_PASSWORD"]):
            assert password not in server_log


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
    """Same MLflow as the client, same driver and auth packages as the tests, same uid as the
    pod."""
    pins = constraint_pins()
    run = " ".join(args for op, args in instructions(IMAGE_DIR / "mlflow-server.Dockerfile") if op == "RUN")
    installed = {canonicalize_name(Requirement(word).name): Requirement(word)
                 for word in shlex.split(run) if "==" in word}
    assert installed["mlflow"].specifier == SpecifierSet(f"=={pins['mlflow']}")
    # The basic-auth app (--app-name=basic-auth) imports Flask-WTF: mlflow's `auth` extra.
    assert "auth" in installed["mlflow"].extras
    test_extra = {canonicalize_name(Requirement(r).name): Requirement(r)
                  for r in pyproject()["project"]["optional-dependencies"]["test"]}
    for name in ("psycopg2-binary", "flask-wtf"):
        assert installed[name].specifier == test_extra[name].specifier, name
    # What the auth extra pulls in beyond constraints.txt: the versions the tests ran with.
    for name in ("flask-wtf", "wtforms"):
        assert installed[name].specifier == SpecifierSet(f"=={importlib.metadata.version(name)}"), name
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
                     "lopt/__pycache__/l3rs.cpython-311.pyc", "tests/manifests/test_manifests.py", "lopt.egg-info/PKG-INFO"):
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
