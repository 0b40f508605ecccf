"""Lineage: what an optimizer version was made from, in a form a registry tag can hold.

Every registered optimizer records its base model (name and version), the datasets it was
meta-trained and validated on (TFDS name and version, and a content hash of the bytes
actually used), the config hash, the code version and the pipeline run. The same functions
compute these for a version being registered and for the staleness check
(:func:`lopt.steps.retrain_decision`), so "same data" means the same hash either way.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import subprocess
from pathlib import Path
from typing import Any, Mapping, Sequence

_SOURCE_ROOT = Path(__file__).resolve().parents[1]


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


def data_hash(datasets: Sequence[Mapping[str, Any]]) -> str:
    """One short hash of a list of dataset lineage records (order-independent)."""
    canonical = sorted(json.dumps(dict(d), sort_keys=True) for d in datasets)
    return hashlib.sha256("\n".join(canonical).encode()).hexdigest()[:16]
