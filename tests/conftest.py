"""Suite-wide ordering for parallel runs.

``make test`` runs the suite on every core with pytest-xdist (``--dist loadgroup``: one test
per work unit, handed out in collection order). The end-to-end runs take minutes, the rest
seconds each, so they go first: each starts on its own worker at once and the short tests
fill in around them, instead of one long run starting last and holding up the end.

Every test process, and every pipeline step the end-to-end tests start, shares one JAX
persistent compilation cache under ``.pytest_cache``: the suite compiles the same inner-training
programs many times over (each pipeline step is a process of its own).
"""

from __future__ import annotations

import pytest

from lopt.host import use_compilation_cache

# Longest first: the local pipeline run, then the run against an MLflow server.
FIRST = ("tests/test_pipeline.py::", "tests/test_mlflow_server.py::")


def _rank(item: pytest.Item) -> tuple[int, int]:
    for i, prefix in enumerate(FIRST):
        if item.nodeid.startswith(prefix) and item.get_closest_marker("slow"):
            return (0, i)
    return (1, 0) if item.get_closest_marker("slow") else (2, 0)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=_rank)  # stable: within a rank, the usual order


def pytest_configure(config: pytest.Config) -> None:
    # Inherited by the pipeline steps the end-to-end tests start. A clean checkout starts empty.
    if getattr(config, "cache", None) is not None:  # None under -p no:cacheprovider
        use_compilation_cache(config.cache.mkdir("jax_compilation_cache"))
