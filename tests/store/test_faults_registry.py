"""Faults in the registry (issue #16, items 3, 4 and 13's fetch parts), as a user meets them.

Corrupted or malformed files of a registered version, a registration that fails half-way and
is retried, and `lopt fetch` onto a non-empty folder or against a store that does not exist.
Everything goes through the public API (`lopt.fetch_optimizer`, `lopt.load_pretrained`,
`lopt.hub`) and the CLI (`pipeline.cli.main`), against a real embedded MLflow store; the files
are damaged where MLflow keeps them, in the store's local artifact root.

Versions "registered before the hashes" are made by deleting the ``lopt.files`` tag of a fresh
version: exactly what a version registered by an earlier lopt looks like.
"""

from __future__ import annotations

import json
import shutil
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Callable

import jax
import numpy as np
import pytest
from mlflow import MlflowClient

import lopt
from lopt.store import registry, serialization
from lopt.hub import fetch_files, register_base_model, register_optimizer
from lopt.optim.l3rs import L3RS, L3RSConfig
from lopt.optim.layout import LayerLayout
from lopt.inner.models import ModelSpec
from conftest import store_with_base_model
from pipeline import cli


SPEC = ModelSpec(num_classes=3, input_shape=(8, 8, 1), conv_features=(4,), hidden_size=8)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store with a base model; each test registers the optimizer versions it damages."""
    home = tmp_path_factory.mktemp("home")
    with store_with_base_model(home, "tiny", SPEC) as (uri, params):
        l3rs = L3RS(L3RSConfig(), LayerLayout.from_params(params))
        yield {"uri": uri, "home": home, "l3rs": l3rs, "theta": l3rs.init(jax.random.key(1)),
               "base": registry.resolve("models:/tiny@champion", uri), "params": params}


@pytest.fixture(autouse=True)
def isolated(store, monkeypatch):
    monkeypatch.setenv("LOPT_HOME", str(store["home"]))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def register_version(store, run_id: str | None = None) -> str:
    """A new optimizer version; returns its pinned URI."""
    run_id = run_id or registry.start_run("faults", tracking_uri=store["uri"])
    name, version = register_optimizer(
        store["base"], store["l3rs"], store["theta"], 30, run_id=run_id, tags={},
        description="test", tracking_uri=store["uri"],
    )
    return f"models:/{name}/{version}"


def stored_files(store, uri: str) -> Path:
    """The version's files where the store keeps them (the local artifact root)."""
    info = registry.resolve(uri, store["uri"])
    client = MlflowClient(store["uri"], store["uri"])
    root = urllib.parse.urlsplit(client.get_run(info.run_id).info.artifact_uri).path
    return Path(urllib.request.url2pathname(root)) / info.source.rsplit("/", 1)[1]


def forget_hashes(store, uri: str) -> None:
    """Make the version look registered by an lopt that recorded no hashes."""
    info = registry.resolve(uri, store["uri"])
    MlflowClient(store["uri"], store["uri"]).delete_model_version_tag(
        info.name, str(info.version), registry.FILES_TAG
    )


def fetch_cli(store, uri: str, out: Path, *extra: str) -> int:
    return cli.main(["fetch", uri, "--out", str(out), "--tracking-uri", store["uri"], *extra])


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("lopt: error: ") and "\n" not in err, err
    return err


# --- item 3: the files of a version are checked on every fetch ---------------------------------


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_a_truncated_file_is_caught_by_every_reader(store, tmp_path, capsys):
    uri = register_version(store)
    truncate(stored_files(store, uri) / "meta_params.msgpack")
    expected = rf"{uri}: meta_params\.msgpack was truncated after registration .*rerun `lopt run`"
    for read in (lambda: lopt.fetch_optimizer(uri, num_steps=10, tracking_uri=store["uri"]),
                 lambda: lopt.load_optimizer(uri, tracking_uri=store["uri"]),
                 lambda: fetch_files(uri, tmp_path / "api", store["uri"])):
        with pytest.raises(registry.IntegrityError, match=expected):
            read()
    assert not (tmp_path / "api").exists()  # nothing written before the check
    assert fetch_cli(store, uri, tmp_path / "cli") == 2
    assert "meta_params.msgpack was truncated" in one_line_error(capsys)
    assert not (tmp_path / "cli").exists()


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "optimizer.json").write_text((d / "optimizer.json").read_text().replace('"horizon"', '"horizen"')),
         r"optimizer\.json was changed after registration"),
        (lambda d: (d / "meta_params.msgpack").unlink(), r"meta_params\.msgpack is missing from the artifact store"),
        (lambda d: (d / "stale.txt").write_text("x"), r"stale\.txt was never registered"),
    ],
    ids=["changed", "missing", "extra"],
)
def test_any_change_to_the_registered_files_is_caught(store, damage, message):
    uri = register_version(store)
    damage(stored_files(store, uri))
    with pytest.raises(registry.IntegrityError, match=rf"{uri}: {message}"):
        lopt.fetch_optimizer(uri, tracking_uri=store["uri"])


def test_a_version_whose_files_are_gone_says_so(store, tmp_path, capsys):
    uri = register_version(store)
    shutil.rmtree(stored_files(store, uri))
    with pytest.raises(registry.IntegrityError, match=rf"{uri}: its files are gone from the artifact store"):
        lopt.load_optimizer(uri, tracking_uri=store["uri"])
    assert fetch_cli(store, uri, tmp_path / "out") == 2
    assert "its files are gone" in one_line_error(capsys)


def test_an_alias_is_named_by_the_version_it_points_to(store):
    uri = register_version(store)  # holds @challenger now
    truncate(stored_files(store, uri) / "optimizer.json")
    alias = uri.rsplit("/", 1)[0] + "@challenger"
    with pytest.raises(registry.IntegrityError, match=rf"{uri}: optimizer\.json was truncated"):
        lopt.fetch_optimizer(alias, tracking_uri=store["uri"])


def _header_without(key: str) -> Callable[[Path], None]:
    def damage(directory: Path) -> None:
        header = json.loads((directory / "optimizer.json").read_text())
        del header[key]
        (directory / "optimizer.json").write_text(json.dumps(header))
    return damage


def _theta(transform) -> Callable[[Path], None]:
    def damage(directory: Path) -> None:
        theta = serialization.load_pytree(directory / "meta_params.msgpack")
        serialization.save_pytree(directory / "meta_params.msgpack", transform(theta))
    return damage


def _set_leaf(theta, value):
    theta = jax.tree.map(np.array, theta)
    theta["mlp"]["b1"] = value(theta["mlp"]["b1"])
    return theta


def _b1_nan(b1):
    b1[0] = np.nan
    return b1


LEGACY_DAMAGE = {
    "no config": (_header_without("config"), r"optimizer\.json: has no 'config' field"),
    "bad config": (lambda d: d.joinpath("optimizer.json").write_text(
        d.joinpath("optimizer.json").read_text().replace('"config": {', '"config": {"nonsense": 1, ', 1)),
        r"optimizer\.json: field 'config' is invalid"),
    "not json": (lambda d: d.joinpath("optimizer.json").write_text("{"), r"optimizer\.json: is not valid JSON"),
    "msgpack missing": (lambda d: (d / "meta_params.msgpack").unlink(), r"meta_params\.msgpack: is missing"),
    "msgpack truncated": (lambda d: truncate(d / "meta_params.msgpack"),
                          r"meta_params\.msgpack: is not a readable msgpack file"),
    "NaN": (_theta(lambda t: _set_leaf(t, _b1_nan)), r"meta_params\.msgpack: mlp/b1 holds NaN or inf"),
    "int32": (_theta(lambda t: jax.tree.map(lambda x: np.asarray(x, np.int32), t)), r"meta_params\.msgpack: \S+ is int32, expected float32"),
    "float16": (_theta(lambda t: jax.tree.map(lambda x: np.asarray(x, np.float16), t)), r"meta_params\.msgpack: \S+ is float16, expected float32"),
    "wrong shape": (_theta(lambda t: _set_leaf(t, lambda b1: np.concatenate([b1, b1]))),
                    r"meta_params\.msgpack: mlp/b1 has shape \[\d+\], expected \[\d+\]"),
    "missing array": (_theta(lambda t: {k: v for k, v in t.items() if k != "mlp"}), r"meta_params\.msgpack: arrays do not match the config and layout: missing mlp/"),
}


@pytest.mark.parametrize("case", LEGACY_DAMAGE, ids=list(LEGACY_DAMAGE))
def test_versions_without_hashes_still_get_every_format_check(store, tmp_path, capsys, case):
    damage, message = LEGACY_DAMAGE[case]
    uri = register_version(store)
    forget_hashes(store, uri)
    damage(stored_files(store, uri))
    pattern = rf"{uri}: {message}.*register a new one \(rerun `lopt run`\)"
    with pytest.raises(serialization.FormatError, match=pattern) as raised:
        lopt.fetch_optimizer(uri, tracking_uri=store["uri"])
    assert "lopt-" not in str(raised.value) and "/tmp" not in str(raised.value)  # no temp path
    assert fetch_cli(store, uri, tmp_path / "out") == 2
    assert f"{uri}: " in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_a_version_without_hashes_keeps_loading(store, tmp_path, capsys):
    uri = register_version(store)
    forget_hashes(store, uri)
    _, theta, header = lopt.load_optimizer(uri, tracking_uri=store["uri"])
    jax.tree.map(np.testing.assert_array_equal, theta, store["theta"])
    assert lopt.fetch_optimizer(uri, num_steps=5, tracking_uri=store["uri"]) is not None
    assert fetch_cli(store, uri, tmp_path / "out") == 0
    assert "format checked only" in capsys.readouterr().out


def test_the_base_model_is_checked_too(store):
    name = f"base-{uuid.uuid4().hex[:6]}"
    run_id = registry.start_run("faults", tracking_uri=store["uri"])
    register_base_model(name, SPEC, store["params"], run_id=run_id, metrics={}, description="",
                        tracking_uri=store["uri"])
    uri = f"models:/{name}/1"
    files = stored_files(store, uri)
    original = (files / "params.msgpack").read_bytes()
    truncate(files / "params.msgpack")
    with pytest.raises(registry.IntegrityError, match=rf"{uri}: params\.msgpack was truncated"):
        lopt.load_pretrained(uri, tracking_uri=store["uri"])
    forget_hashes(store, uri)  # without the hashes, the format check still finds it
    with pytest.raises(serialization.FormatError, match=rf"{uri}: params\.msgpack: is not a readable msgpack"):
        lopt.load_pretrained(uri, tracking_uri=store["uri"])
    (files / "params.msgpack").write_bytes(original)
    header = json.loads((files / "model.json").read_text())
    del header["spec"]
    (files / "model.json").write_text(json.dumps(header))
    with pytest.raises(serialization.FormatError, match=rf"{uri}: model\.json: has no 'spec' field"):
        lopt.load_pretrained(uri, tracking_uri=store["uri"])


# --- item 4: a failed registration leaves the run as it was; a retry succeeds ---------------------


def versions_of_run(store, run_id: str) -> list[str]:
    client = MlflowClient(store["uri"], store["uri"])
    return [f"{v.name}/{v.version}" for v in client.search_model_versions(f"run_id='{run_id}'")]


def fail_once(monkeypatch, method: str) -> None:
    """``MlflowClient.<method>`` raises ConnectionError on its first call, then works."""
    real = getattr(MlflowClient, method)
    calls = []

    def fails_once(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("registry went away")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, method, fails_once)


def test_a_registration_that_fails_before_the_version_exists_can_be_retried(store, monkeypatch):
    run_id = registry.start_run("faults", tracking_uri=store["uri"])
    fail_once(monkeypatch, "create_model_version")
    with pytest.raises(ConnectionError, match="registry went away"):
        register_version(store, run_id)
    client = MlflowClient(store["uri"], store["uri"])
    assert client.list_artifacts(run_id, "optimizer") == []  # the run is as it was
    assert versions_of_run(store, run_id) == []
    uri = register_version(store, run_id)  # the retried step: same run, same artifact path
    assert len(versions_of_run(store, run_id)) == 1
    lopt.fetch_optimizer(uri, tracking_uri=store["uri"])


def test_a_registration_rolled_back_after_the_version_existed_can_be_retried(store, monkeypatch):
    run_id = registry.start_run("faults", tracking_uri=store["uri"])
    fail_once(monkeypatch, "set_registered_model_alias")
    with pytest.raises(registry.RegistrationError, match="and its files were deleted again"):
        register_version(store, run_id)
    assert MlflowClient(store["uri"], store["uri"]).list_artifacts(run_id, "optimizer") == []
    register_version(store, run_id)
    assert len(versions_of_run(store, run_id)) == 1


def test_files_left_by_a_killed_registration_are_replaced_on_retry(store, tmp_path):
    # A process killed between logging the files and creating the version cleans nothing up.
    run_id = registry.start_run("faults", tracking_uri=store["uri"])
    leftovers = tmp_path / "leftovers"
    leftovers.mkdir()
    (leftovers / "stale.bin").write_bytes(b"half an upload")
    (leftovers / "optimizer.json").write_text("{")
    registry.log_artifacts(run_id, leftovers, "optimizer", store["uri"])
    uri = register_version(store, run_id)
    assert versions_of_run(store, run_id) == [uri.removeprefix("models:/")]
    out = fetch_files(uri, tmp_path / "out", store["uri"])  # hashes match: no stale file
    assert sorted(p.name for p in out.iterdir()) == ["meta_params.msgpack", "optimizer.json"]


def test_the_files_of_a_registered_version_are_never_replaced(store):
    run_id = registry.start_run("faults", tracking_uri=store["uri"])
    uri = register_version(store, run_id)
    with pytest.raises(ValueError, match=rf"the files of {uri}; registering there would overwrite"):
        register_version(store, run_id)
    lopt.fetch_optimizer(uri, tracking_uri=store["uri"])


# --- item 13: lopt fetch onto a non-empty folder, and against a store that does not exist --------


def test_fetch_refuses_a_non_empty_folder_unless_forced(store, tmp_path, capsys):
    uri = register_version(store)
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.json").write_text("{}")
    (out / "old").mkdir()
    assert fetch_cli(store, uri, out) == 2
    err = one_line_error(capsys)
    assert "is not empty" in err and "--force" in err
    assert sorted(p.name for p in out.iterdir()) == ["old", "stale.json"]
    with pytest.raises(FileExistsError, match="is not empty"):
        fetch_files(uri, out, store["uri"])
    assert fetch_cli(store, uri, out, "--force") == 0
    assert sorted(p.name for p in out.iterdir()) == ["meta_params.msgpack", "optimizer.json"]
    assert "sha256 of every file checked" in capsys.readouterr().out
    # A failed fetch with --force leaves the folder as it was.
    broken = register_version(store)
    truncate(stored_files(store, broken) / "meta_params.msgpack")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert fetch_cli(store, broken, out, "--force") == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_fetch_force_never_empties_the_working_directory(store, tmp_path, monkeypatch, capsys):
    uri = register_version(store)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.txt").write_text("keep")
    assert fetch_cli(store, uri, tmp_path, "--force") == 2
    assert "fetch into a directory of its own" in one_line_error(capsys)
    assert (tmp_path / "mine.txt").read_text() == "keep"


def test_fetch_from_a_store_that_does_not_exist_creates_none(tmp_path, monkeypatch, capsys):
    home = tmp_path / "no-home"
    monkeypatch.delenv("LOPT_HOME", raising=False)
    code = cli.main(["fetch", "models:/l3rs-tiny@champion", "--out", str(tmp_path / "out"), "--home", str(home)])
    assert code == 2
    err = one_line_error(capsys)
    assert f"There is no MLflow store at {home / 'mlflow.db'}" in err and "models:/l3rs-tiny@champion" in err
    assert not home.exists() and not (tmp_path / "out").exists()
    elsewhere = tmp_path / "other.db"
    assert fetch_cli({"uri": f"sqlite:///{elsewhere}"}, "models:/x/1", tmp_path / "out") == 2
    assert str(elsewhere) in one_line_error(capsys)
    with pytest.raises(registry.RegistryError, match="There is no MLflow store"):
        lopt.fetch_optimizer("models:/x/1", tracking_uri=f"sqlite:///{elsewhere}")
    assert not registry.model_exists("x", f"sqlite:///{elsewhere}")
    assert not elsewhere.exists() and not (tmp_path / "mlruns").exists()


# --- the same against a real `mlflow server` (PostgreSQL, proxied artifacts) ---------------------
# Over HTTP the files are deleted by the server (DELETE on its artifact proxy) and downloaded
# through it: the paths a cluster takes. Slow: starts PostgreSQL and the server (~30 s).


@pytest.mark.slow
def test_registration_retry_and_file_checks_against_an_mlflow_server(store, mlflow_server, tmp_path, monkeypatch, capsys):
    url = mlflow_server.url
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    server_store = {**store, "uri": url}
    run_id = registry.start_run("faults", tracking_uri=url)
    params = store["params"]
    register_base_model("tiny", SPEC, params, run_id=run_id, metrics={}, description="", tracking_uri=url)
    server_store["base"] = registry.resolve("models:/tiny/1", url)

    run_id = registry.start_run("faults", tracking_uri=url)
    with monkeypatch.context() as mp:
        fail_once(mp, "create_model_version")
        with pytest.raises(ConnectionError):
            register_version(server_store, run_id)
    client = MlflowClient(url, url)
    assert client.list_artifacts(run_id, "optimizer") == []  # deleted through the server
    uri = register_version(server_store, run_id)
    assert len(versions_of_run(server_store, run_id)) == 1
    lopt.fetch_optimizer(uri, tracking_uri=url)

    # Leftovers of a killed registration, replaced through the server.
    run_id = registry.start_run("faults", tracking_uri=url)
    (tmp_path / "leftovers").mkdir()
    (tmp_path / "leftovers" / "stale.bin").write_bytes(b"x")
    registry.log_artifacts(run_id, tmp_path / "leftovers", "optimizer", url)
    second = register_version(server_store, run_id)
    assert fetch_cli(server_store, second, tmp_path / "out") == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["meta_params.msgpack", "optimizer.json"]

    # A file truncated in the server's artifact store is caught on download.
    info = registry.resolve(uri, url)
    [stored] = mlflow_server.artifacts.rglob(f"{info.run_id}/artifacts/optimizer/meta_params.msgpack")
    truncate(stored)
    with pytest.raises(registry.IntegrityError, match=rf"{uri}: meta_params\.msgpack was truncated"):
        lopt.fetch_optimizer(uri, tracking_uri=url)
    assert fetch_cli(server_store, uri, tmp_path / "broken") == 2
    assert "meta_params.msgpack was truncated" in one_line_error(capsys)
