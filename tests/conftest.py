"""Suite-wide ordering for parallel runs.

``make test`` runs the suite on every core with pytest-xdist (``--dist loadgroup``: one test
per work unit, handed out in collection order). The end-to-end runs take minutes, the rest
seconds each, so they go first: each starts on its own worker at once and the short tests
fill in around them, instead of one long run starting last and holding up the end.
"""

from __future__ import annotations

import pytest

# Longest first: the local pipeline run, then the run against an MLflow server.
FIRST = ("tests/test_pipeline.py::", "tests/test_mlflow_server.py::")


def _rank(item: pytest.Item) -> tuple[int, int]:
    for i, prefix in enumerate(FIRST):
        if item.nodeid.startswith(prefix) and item.get_closest_marker("slow"):
            return (0, i)
    return (1, 0) if item.get_closest_marker("slow") else (2, 0)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=_rank)  # stable: within a rank, the usual order
