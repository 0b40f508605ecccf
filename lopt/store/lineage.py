"""Lineage: what an optimizer version was made from, in a form a registry tag can hold.

Every registered optimizer records its base model (name and version), the datasets it was
meta-trained and validated on (TFDS name and version, and a content hash of the bytes
actually used), the config hash, the code version and the pipeline run. The same functions
compute these for a version being registered and for the pipeline's staleness check
(``pipeline/steps/staleness.py``), so "same data" means the same hash either way.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import subprocess
from pathlib import Path
from typing import Any, Mapping, Sequence

_SOURCE_ROOT = Path(__file__).resolve().parents[2]  # the checkout holding lopt/
_PACKAGE = Path(__file__).resolve().parents[1]  # lopt/, this module being lopt/store/lineage.py


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """``git:<commit>`` (``-dirty`` with uncommitted changes to tracked files) when lopt runs
    from a git checkout, else ``lopt==<package version>``."""
    if (_SOURCE_ROOT / ".git").exists():
        try:
            git = lambda *args: subprocess.run(  # noqa: E731
                ["git", *args], cwd=_SOURCE_ROOT, capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
            commit = git("rev-parse", "HEAD")
            dirty = git("status", "--porcelain", "--untracked-files=no")
            return f"git:{commit}{'-dirty' if dirty else ''}"
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        return f"lopt=={importlib.metadata.version('lopt')}"
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@functools.lru_cache(maxsize=1)
def source_hash() -> str:
    """A short sha256 of the lopt sources (every ``lopt/**/*.py``, path and bytes).

    It changes with any edit of the code, committed or not, and is the same for an installed
    package and a checkout of the same sources: what caches of lopt's results (meta-training
    checkpoints, the benchmark's trained optimizers) are keyed on, so that none outlives the
    code that made it. Cached: the sources of a running process do not change under it.
    """
    digest = hashlib.sha256()
    for path in sorted(_PACKAGE.rglob("*.py")):
        digest.update(str(path.relative_to(_PACKAGE)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def code_fingerprint() -> str:
    """``lopt==<package version>+<source hash>``: the code, whether installed or checked out."""
    try:
        version = importlib.metadata.version("lopt")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return f"lopt=={version}+{source_hash()}"


def data_hash(datasets: Sequence[Mapping[str, Any]]) -> str:
    """One short hash of a list of dataset lineage records (order-independent)."""
    canonical = sorted(json.dumps(dict(d), sort_keys=True) for d in datasets)
    return hashlib.sha256("\n".join(canonical).encode()).hexdigest()[:16]
