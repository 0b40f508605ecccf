"""The home and the directories under it, and the one name sanitizer."""

from __future__ import annotations

import os
import pathlib

import pytest

from lopt import paths


@pytest.fixture
def workdir(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    monkeypatch.delenv("LOPT_HOME", raising=False)
    monkeypatch.delenv("TFDS_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_default_paths(workdir: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert paths.home() == workdir / ".lopt"
    assert paths.data_dir() == workdir / ".lopt" / "tensorflow_datasets"

    monkeypatch.setenv("LOPT_HOME", "home")
    assert paths.data_dir() == workdir / "home" / "tensorflow_datasets"
    monkeypatch.setenv("TFDS_DATA_DIR", str(workdir / "tfds"))
    assert paths.data_dir() == workdir / "tfds"


def test_lookups_create_nothing_and_writers_create_the_home(workdir: pathlib.Path) -> None:
    paths.home(), paths.data_dir(), paths.tracking_database(create_home=False)
    assert not (workdir / ".lopt").exists()
    assert paths.tracking_database() == workdir / ".lopt" / "mlflow.db"
    assert (workdir / ".lopt").is_dir()
    for directory, name in [
        (paths.artifact_root(), "mlartifacts"), (paths.checkpoints_dir(), "checkpoints"),
        (paths.reports_dir(), "reports"), (paths.jax_cache_dir(), "jax_cache"),
        (paths.pipeline_root(), "pipeline_runs"),
    ]:
        assert directory == workdir / ".lopt" / name and not directory.exists()


def test_pin_home_resolves_exports_and_creates_only_when_asked(workdir: pathlib.Path) -> None:
    (workdir / "real").mkdir()
    (workdir / "link").symlink_to(workdir / "real")
    assert paths.pin_home("link/../link/h", create=False) == workdir / "real" / "h"
    assert os.environ["LOPT_HOME"] == str(workdir / "real" / "h")
    assert not (workdir / "real" / "h").exists()
    assert paths.home() == workdir / "real" / "h"  # what the steps, inheriting it, see
    assert paths.pin_home(None, create=True) == workdir / "real" / "h"  # $LOPT_HOME when no --home
    assert (workdir / "real" / "h").is_dir()


@pytest.mark.parametrize(
    "text, kwargs, expected",
    [
        # Checkpoint directories: letters of any script stay, one "_" per other character.
        ("models:/cnn-mnist@champion-0123abcd", {}, "models__cnn-mnist_champion-0123abcd"),
        ("modèle  v1", {}, "modèle__v1"),
        # Experiments' artifact directories: a run of other characters is one "_".
        ("my  exp/é:1", {"collapse": True}, "my_exp_é_1"),
        # Lock files and host names: ASCII only.
        ("modèle.v1", {"ascii_only": True}, "mod_le.v1"),
        # Variant labels, MLflow metric keys: spaces, ":" and "/" stay.
        ("seed:1 lr:0.1/x?", {"keep": "-. :/", "ascii_only": True}, "seed:1 lr:0.1/x_"),
    ],
)
def test_safe_name(text: str, kwargs: dict, expected: str) -> None:
    assert paths.safe_name(text, **kwargs) == expected
