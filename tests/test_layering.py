"""The dependency rules of docs/design.md §2, checked: the core never imports kfp nor the
application built on it (``pipeline/``, ``components/``), only its registry module imports
MLflow, the pipeline's steps run without kfp, and meta-training runs from arrays where neither
MLflow nor TFDS is installed (an accelerator machine, ``benchmarks/es_pairs.py``)."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOPT = ROOT / "lopt"
STEPS = ROOT / "pipeline" / "steps"


def _imported_packages(path: Path) -> set[str]:
    packages = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            packages |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            packages.add(node.module.split(".")[0])
    return packages


def test_core_never_imports_kfp_and_only_the_registry_imports_mlflow():
    imports = {str(p.relative_to(LOPT)): _imported_packages(p) for p in LOPT.rglob("*.py")}
    assert len(imports) > 10
    assert [name for name, packages in imports.items() if "kfp" in packages] == []
    assert [name for name, packages in imports.items() if "mlflow" in packages] == ["registry.py"]


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
        from lopt import models
        from lopt.config import get_config
        from lopt.l3rs import L3RS, LayerLayout
        from lopt.meta_training import make_estimator
        from lopt.serialization import load_model, save_model
        from lopt.tasks import TaskFamily, TaskFamilySpec

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
