"""lopt: learned optimizers (L3RS) specialized to one pretrained model and its kind of data.

The public contract (docs/design.md §2)::

    import lopt
    model_fn, params, info = lopt.load_pretrained("models:/cnn-mnist@champion", num_classes=k)
    opt = lopt.fetch_optimizer("models:/l3rs-cnn-mnist@champion", num_steps=T)

``lopt`` is pure JAX/optax/flax/TFDS; only :mod:`lopt.store.registry` talks to MLflow, and nothing
here imports kfp. The registry-backed functions are imported lazily, so code that only
needs the optimizer or the data (``lopt.optim.l3rs``, ``lopt.data``) never pays for importing MLflow.
"""

import importlib
from typing import Any

from lopt.optim.l3rs import L3RS, L3RSConfig, L3RSState, eval_params
from lopt.optim.layout import LayerLayout, LayoutMismatchError

__version__ = "0.1.0"

_LAZY = {name: "lopt.hub" for name in ("fetch_optimizer", "load_optimizer", "load_pretrained", "optimizer_name")}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lopt' has no attribute {name!r}")


__all__ = [
    "L3RS",
    "L3RSConfig",
    "L3RSState",
    "LayerLayout",
    "LayoutMismatchError",
    "eval_params",
    "fetch_optimizer",
    "load_optimizer",
    "load_pretrained",
    "optimizer_name",
]
