"""The dependency rules of docs/design.md §2, checked: the core never imports kfp nor the
application built on it (``pipeline/``, ``components/``), only the store's MLflow modules
import MLflow, its modules import each other one way (no cycle), the pipeline's steps run without kfp,
and meta-training runs from arrays where neither MLflow nor TFDS is installed (an accelerator
machine, ``benchmarks/es_pairs.py``)."""

from __future__ import annotations

import ast
import graphlib
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOPT = ROOT / "lopt"
STEPS = ROOT / "pipeline" / "steps"


def _module_name(path: Path) -> str:
    parts = path.relative_to(LOPT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at module level or inside functions: ``import a.b`` gives
    ``a.b``; ``from a.b import c`` gives ``a.b`` and ``a.b.c`` (``c`` may be a module), relative
    imports resolved."""
    name = _module_name(path).split(".")
    package = name if path.name == "__init__.py" else name[:-1]
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            modules |= {module} | {f"{module}.{alias.name}" for alias in node.names}
    return modules


def _imported_packages(path: Path) -> set[str]:
    return {module.split(".")[0] for module in _imported_modules(path)}


def test_core_never_imports_kfp_and_only_the_stores_mlflow_modules_import_mlflow():
    imports = {str(p.relative_to(LOPT)): _imported_packages(p) for p in LOPT.rglob("*.py")}
    assert len(imports) > 10
    assert [name for name, packages in imports.items() if "kfp" in packages] == []
    assert sorted(name for name, packages in imports.items() if "mlflow" in packages) == [
        "store/locks.py", "store/models.py", "store/tracking.py"
    ]


def test_lopt_has_no_import_cycle():
    """Dependencies point one way, function-level imports included: an import deferred into a
    function hides a cycle from the interpreter, not from the reader. (A module's own packages
    are left out: Python imports them first whatever the module says.)"""
    modules = {_module_name(p): p for p in LOPT.rglob("*.py")}
    graph = {
        name: {m for m in _imported_modules(path) if m in modules and not f"{name}.".startswith(f"{m}.")}
        for name, path in modules.items()
    }
    assert sum(map(len, graph.values())) > len(graph) > 10  # the imports were found
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as error:
        pytest.fail(f"lopt imports in a circle: {' -> '.join(error.args[1])}")


def test_every_configurable_estimator_is_built_by_one_factory():
    # The config (plain data, below the estimators) names them; meta-training maps the names.
    from lopt.config import ESTIMATORS
    from lopt.meta.loop import ESTIMATOR_FACTORIES

    assert sorted(ESTIMATOR_FACTORIES) == sorted(ESTIMATORS)


def test_the_library_never_imports_the_application():
    imports = {str(p.relative_to(LOPT)): _imported_packages(p) for p in LOPT.rglob("*.py")}
    assert [name for name, packages in imports.items() if packages & {"pipeline", "components"}] == []


def test_the_pipelines_steps_are_plain_python():
    imports = {str(p.relative_to(STEPS)): _imported_packages(p) for p in STEPS.rglob("*.py")}
    assert "context.py" in imports
    assert [name for name, packages in imports.items() if packages & {"kfp", "components"}] == []


def test_meta_training_needs_neither_mlflow_nor_tfds():
    code = textwrap.dedent(
        """
        import sys

        class Absent:  # as if these were not installed
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("mlflow", "kfp", "tensorflow_datasets", "array_record"):
                    raise ModuleNotFoundError(f"No module named {name!r}")

        sys.meta_path.insert(0, Absent())
        import jax, jax.numpy as jnp
        from lopt.inner import models
        from lopt.config import get_config
        from lopt.optim.l3rs import L3RS
        from lopt.optim.layout import LayerLayout
        from lopt.meta.loop import make_estimator
        from lopt.store.serialization import read_model, write_model
        from lopt.inner.tasks import TaskFamily, TaskFamilySpec

        cfg = get_config("tiny", {"meta_train": {"num_pairs": 2}}).meta_train
        spec = models.ModelSpec(num_classes=3, input_shape=(8, 8, 1), conv_features=(4,), hidden_size=8)
        family = TaskFamily(TaskFamilySpec("arrays", classes_per_task=3),
                            jnp.zeros((4, 6, 8, 8, 1)), jnp.zeros((4, 2, 8, 8, 1)), "zeros")
        params = models.init_params(spec, jax.random.key(0))
        l3rs = L3RS(cfg.l3rs, LayerLayout.from_params(params))
        estimator = make_estimator(cfg, l3rs, spec, params, family)
        print(type(estimator).__name__, sorted(estimator.estimators))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["RandomHorizon", "[20]"]
