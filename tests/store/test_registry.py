"""lopt.store.registry against a temporary embedded SQLite store.

One store is shared by the module (creating a fresh MLflow SQLite database runs its migrations,
~5 s); every test uses its own registered model names, so tests stay independent.
"""

from __future__ import annotations

import json
import math
import shutil
import uuid
from pathlib import Path
from typing import NamedTuple

import mlflow
import pytest
from mlflow import MlflowClient

from lopt import paths
from lopt.store import registry


class Store(NamedTuple):
    home: Path  # $LOPT_HOME
    workdir: Path  # the working directory steps run in: must stay clean
    uri: str


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    root = tmp_path_factory.mktemp("registry")
    (root / "home").mkdir()
    (root / "work").mkdir()
    return Store(root / "home", root / "work", f"sqlite:///{root / 'home'}/mlflow.db")


@pytest.fixture(autouse=True)
def isolated(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOPT_HOME", str(store.home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(store.workdir)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "model"
    (directory / "arrays").mkdir(parents=True)
    (directory / "meta.json").write_text(json.dumps({"kind": "test", "input_shape": [8, 8, 1]}))
    (directory / "arrays" / "params.msgpack").write_bytes(bytes(range(256)) * 4)
    return directory


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def register(store: Store, name: str, directory: Path, **kwargs) -> int:
    run_id = registry.start_run("registry-tests", unique("run"), store.uri)
    return registry.register_directory(
        name, directory, run_id=run_id, artifact_path="model", tracking_uri=store.uri, **kwargs
    )


def same_files(a: Path, b: Path) -> bool:
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return files_a == files_b and all((a / f).read_bytes() == (b / f).read_bytes() for f in files_a)


def test_tracking_uri_resolution(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    assert registry.resolve_tracking_uri() == f"sqlite:///{store.home}/mlflow.db"
    assert paths.artifact_root() == store.home / "mlartifacts"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example:5000")
    assert registry.resolve_tracking_uri() == "http://example:5000"
    assert registry.resolve_tracking_uri("sqlite:///x.db") == "sqlite:///x.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.setenv("LOPT_HOME", "relative-home")
    assert registry.resolve_tracking_uri() == f"sqlite:///{store.workdir}/relative-home/mlflow.db"
    assert (store.workdir / "relative-home").is_dir()


def test_register_and_download_every_uri_form(
    store: Store, model_dir: Path, tmp_path: Path
) -> None:
    name = unique("base")
    version = register(
        store,
        name,
        model_dir,
        tags={"input_shape": "8,8,1", "format": "msgpack"},
        description="a test model",
        aliases=["champion", "challenger"],
    )
    assert version == 1
    uris = [f"models:/{name}@champion", f"models:/{name}/1", f"models:/{name}/latest"]
    for i, uri in enumerate(uris):
        local = registry.download(uri, store.uri, dst=tmp_path / f"dl{i}")
        assert same_files(local, model_dir), uri
    # Without dst the result is a private copy, never the store's own directory.
    local = registry.download(f"models:/{name}@champion", store.uri)
    assert same_files(local, model_dir)
    assert store.home not in local.parents
    shutil.rmtree(local.parent)

    info = registry.resolve(f"models:/{name}@champion", store.uri)
    assert info.version == 1 and info.uri == f"models:/{name}/1"
    assert set(info.aliases) == {"champion", "challenger"}
    files = json.loads(info.tags.pop(registry.FILES_TAG))  # every file's size and sha256
    assert sorted(files) == ["arrays/params.msgpack", "meta.json"]
    assert files["arrays/params.msgpack"]["bytes"] == 1024
    assert info.tags == {"input_shape": "8,8,1", "format": "msgpack"}
    assert info.description == "a test model"
    assert info.source == f"runs:/{info.run_id}/model"
    assert registry.model_exists(name, store.uri)
    assert registry.model_exists(name)  # the embedded default under $LOPT_HOME is the same store
    assert registry.alias_exists(name, "champion", store.uri)
    assert not registry.alias_exists(name, "nope", store.uri)
    assert not registry.alias_exists(unique("missing"), "champion", store.uri)


def test_second_version_and_moving_aliases(store: Store, model_dir: Path, tmp_path: Path) -> None:
    name = unique("opt")
    assert register(store, name, model_dir, aliases=["champion"]) == 1
    (model_dir / "meta.json").write_text(json.dumps({"kind": "second"}))
    assert register(store, name, model_dir, aliases=["challenger"]) == 2

    assert registry.resolve(f"models:/{name}/latest", store.uri).version == 2
    assert registry.resolve(f"models:/{name}@champion", store.uri).version == 1
    # Version 1's files are untouched by the second registration.
    old = registry.download(f"models:/{name}/1", store.uri, dst=tmp_path / "v1")
    assert json.loads((old / "meta.json").read_text()) == {"kind": "test", "input_shape": [8, 8, 1]}

    registry.set_alias(name, "champion", 2, store.uri)
    assert registry.get_version(name, alias="champion", tracking_uri=store.uri).version == 2
    assert registry.get_version(name, version=1, tracking_uri=store.uri).aliases == ()
    registry.delete_alias(name, "challenger", store.uri)
    registry.delete_alias(name, "challenger", store.uri)  # idempotent
    assert not registry.alias_exists(name, "challenger", store.uri)


def test_unknown_model_lists_existing_ones(store: Store, model_dir: Path) -> None:
    name = unique("known")
    register(store, name, model_dir)
    with pytest.raises(registry.RegistryError) as error:
        registry.download(f"models:/{name}x@champion", store.uri)
    message = str(error.value)
    assert f"'{name}x' does not exist" in message
    assert name in message  # listed, and offered as the likely intended name
    assert "Did you mean" in message
    assert store.uri in message
    assert "MLFLOW_TRACKING_URI" in message
    assert isinstance(error.value, LookupError)
    assert not registry.model_exists(f"{name}x", store.uri)


def test_unknown_alias_and_version(store: Store, model_dir: Path) -> None:
    name = unique("partial")
    register(store, name, model_dir, aliases=["challenger"])
    with pytest.raises(registry.RegistryError) as error:
        registry.resolve(f"models:/{name}@champion", store.uri)
    message = str(error.value)
    assert "no alias 'champion'" in message and "@challenger -> 1" in message
    assert "[1]" in message  # the existing versions

    with pytest.raises(registry.RegistryError, match=r"no version 7 .*Existing versions.*\[1\]"):
        registry.resolve(f"models:/{name}/7", store.uri)
    with pytest.raises(registry.RegistryError, match="no version 7"):
        registry.set_alias(name, "champion", 7, store.uri)
    with pytest.raises(registry.RegistryError, match="does not exist"):
        registry.resolve(f"models:/{unique('absent')}/latest", store.uri)


@pytest.mark.parametrize(
    "uri, expected",
    [
        ("models:/m/3", registry.ModelRef("m", 3, None)),
        ("models:/m@champion", registry.ModelRef("m", None, "champion")),
        ("models:/l3rs-resnet@challenger", registry.ModelRef("l3rs-resnet", None, "challenger")),
        ("models:/m/latest", registry.ModelRef("m", None, None)),
    ],
)
def test_parse_model_uri(uri: str, expected: registry.ModelRef) -> None:
    assert registry.parse_model_uri(uri) == expected
    assert registry.parse_model_uri(expected.uri) == expected


@pytest.mark.parametrize(
    "uri",
    ["m@champion", "runs:/abc/model", "models:/m", "models:/m/Production", "models:/m/0",
     "models:/m/1/extra", "models:/@a", "models:/m@", "models://host/m/1", "models:/m@a b"],
)
def test_malformed_uri_says_which_forms_are_accepted(uri: str) -> None:
    with pytest.raises(ValueError, match=r"models:/<name>/<version>.*@<alias>.*/latest"):
        registry.parse_model_uri(uri)


def test_failed_registration_leaves_nothing_behind(
    store: Store, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    existing, fresh = unique("existing"), unique("fresh")
    register(store, existing, model_dir, aliases=["champion"])

    def broken(*args, **kwargs):
        raise RuntimeError("registry went away")

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", broken)
    for name in (existing, fresh):
        with pytest.raises(registry.RegistrationError, match="registry went away.*deleted again"):
            register(store, name, model_dir, aliases=["champion"])
    client = MlflowClient(tracking_uri=store.uri, registry_uri=store.uri)
    assert [v.version for v in client.search_model_versions(f"name='{existing}'")] == [1]
    assert registry.resolve(f"models:/{existing}@champion", store.uri).version == 1
    assert not registry.model_exists(fresh, store.uri)


def test_invalid_input_fails_before_writing(store: Store, model_dir: Path, tmp_path: Path) -> None:
    name = unique("invalid")
    with pytest.raises(ValueError, match="reserved"):
        register(store, name, model_dir, aliases=["latest"])
    with pytest.raises(ValueError, match="Nothing to register"):
        register(store, name, tmp_path / "empty")
    run_id = registry.start_run("registry-tests", None, store.uri)
    registry.register_directory(
        name, model_dir, run_id=run_id, artifact_path="model", tracking_uri=store.uri
    )
    with pytest.raises(ValueError, match="overwrite the files of an earlier version"):
        registry.register_directory(
            name, model_dir, run_id=run_id, artifact_path="model", tracking_uri=store.uri
        )
    assert registry.get_version(name, tracking_uri=store.uri).version == 1


def test_run_logging_accepts_nan(store: Store) -> None:
    params = {"sigma": 0.05}
    with registry.run_logger("registry-tests", "meta-train", store.uri, params=params) as log:
        for step in range(3):
            log(step, {"outer_loss": 1.0 / (step + 1), "grad_norm": math.nan})
        log.log_metrics({"diverged": math.inf}, step=3)
        log.set_tags({"phase": "test"})
        run_id = log.run_id
    run = MlflowClient(tracking_uri=store.uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"sigma": "0.05"}
    assert run.data.metrics["outer_loss"] == pytest.approx(1 / 3)
    assert math.isnan(run.data.metrics["grad_norm"])
    assert run.data.tags["phase"] == "test"

    with pytest.raises(ZeroDivisionError):
        with registry.run_logger("registry-tests", "crash", store.uri) as log:
            1 / 0
    assert MlflowClient(tracking_uri=store.uri).get_run(log.run_id).info.status == "FAILED"


def test_artifacts_stay_under_lopt_home(store: Store, model_dir: Path) -> None:
    global_uri = mlflow.get_tracking_uri()
    name = unique("placement")
    register(store, name, model_dir)
    info = registry.resolve(f"models:/{name}/1", store.uri)
    stored = list((store.home / "mlartifacts").rglob(f"{info.run_id}/artifacts/model/meta.json"))
    assert len(stored) == 1
    assert not (store.workdir / "mlruns").exists()
    assert not (store.workdir / "mlflow.db").exists()
    assert mlflow.get_tracking_uri() == global_uri  # no global state was changed
