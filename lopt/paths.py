"""Where lopt keeps its files, and the one rule that turns a name into a file name or a key.

Everything lopt writes on its own goes under one home, ``$LOPT_HOME`` (default ``.lopt`` in
the working directory), read here and nowhere else::

    <home>/mlflow.db             the embedded tracking store (lopt.store.registry)
    <home>/mlartifacts/          its artifacts, one directory per experiment
    <home>/tensorflow_datasets/  the prepared datasets, unless $TFDS_DATA_DIR names another
    <home>/checkpoints/          meta-training checkpoints, one directory per run key
    <home>/reports/              validation reports, one directory per MLflow run
    <home>/jax_cache/            JAX's compilation cache of `lopt run` and its steps
    <home>/pipeline_runs/        kfp.local's pipeline root

Read-only commands (``lopt fetch``) must not leave a home behind, so looking a path up creates
nothing; the directories something is about to write into create the home with them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

DEFAULT_HOME = ".lopt"


def home(*, create: bool = False) -> Path:
    """``$LOPT_HOME``, else ``.lopt`` in the working directory; absolute, ``~`` expanded.
    ``create`` makes it when missing."""
    path = _chosen(None).expanduser().absolute()
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def pin_home(explicit: str | os.PathLike[str] | None = None, *, create: bool) -> Path:
    """The home of a command and of every process it starts: ``explicit`` (``--home``), else
    :func:`home`'s choice, with symbolic links resolved, exported as ``$LOPT_HOME`` (the
    pipeline's steps run in subprocesses that inherit it, so they all agree on one directory),
    and created when ``create``."""
    path = _chosen(explicit).expanduser().resolve()
    if create:
        path.mkdir(parents=True, exist_ok=True)
    os.environ["LOPT_HOME"] = str(path)
    return path


def _chosen(explicit: str | os.PathLike[str] | None) -> Path:
    return Path(explicit or os.environ.get("LOPT_HOME") or DEFAULT_HOME)


def data_dir() -> Path:
    """The TFDS data directory: ``$TFDS_DATA_DIR`` if set, else ``<home>/tensorflow_datasets``."""
    if tfds_data_dir := os.environ.get("TFDS_DATA_DIR"):
        return Path(tfds_data_dir).expanduser().absolute()
    return home() / "tensorflow_datasets"


def tracking_database(*, create_home: bool = True) -> Path:
    """The embedded MLflow store's SQLite file, ``<home>/mlflow.db``."""
    return home(create=create_home) / "mlflow.db"


def artifact_root() -> Path:
    """Where the embedded store's artifacts go (no tracking server decides it)."""
    return home(create=True) / "mlartifacts"


def checkpoints_dir() -> Path:
    """Meta-training checkpoints: one directory per run key below."""
    return home(create=True) / "checkpoints"


def reports_dir() -> Path:
    """Validation reports: one directory per MLflow run below."""
    return home(create=True) / "reports"


def jax_cache_dir() -> Path:
    """JAX's persistent compilation cache of a pipeline run and its steps."""
    return home(create=True) / "jax_cache"


def pipeline_root() -> Path:
    """kfp.local's pipeline root: each step's outputs."""
    return home(create=True) / "pipeline_runs"


def safe_name(text: str, keep: str = "-.", *, ascii_only: bool = False, collapse: bool = False) -> str:
    """``text`` with every character that is not a letter, a digit, ``_`` or in ``keep``
    replaced by ``_``: a name that file systems, URI paths and MLflow keys accept.

    Letters and digits are Unicode ones (``str.isalnum``) unless ``ascii_only``; ``collapse``
    replaces each run of such characters by a single ``_``. The callers' choices are part of
    names already on disk and in stores (checkpoint directories, metric keys), so they stay.
    """
    pattern = f"[^\\w{re.escape(keep)}]" + ("+" if collapse else "")
    return re.sub(pattern, "_", text, flags=re.ASCII if ascii_only else 0)
