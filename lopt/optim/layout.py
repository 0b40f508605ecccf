"""The layers an L3RS optimizer was meta-trained for: its per-layer embeddings are tied to them.

A layer is one leaf of the params pytree, named by its path (``"PatchConv_0/Dense_0/kernel"``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import numpy as np


class LayoutMismatchError(ValueError):
    """The optimizer was built for parameters of another architecture."""


@dataclasses.dataclass(frozen=True)
class LayerLayout:
    """Names and shapes of the layers (params leaves) an L3RS optimizer was meta-trained for.

    The per-layer embeddings are tied to these layers, so applying the optimizer to another
    architecture is an error that names the layers that differ, not a silent misuse. Layers
    under ``flexible_prefix`` (the classifier head) may change size but not rank: a model
    fine-tuned on a task with another number of classes is still the same architecture.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    flexible_prefix: str = "head/"

    @classmethod
    def from_params(cls, params: Any, flexible_prefix: str = "head/") -> "LayerLayout":
        leaves = jax.tree_util.tree_leaves_with_path(params)
        return cls(
            names=tuple(jax.tree_util.keystr(path, simple=True, separator="/") for path, _ in leaves),
            shapes=tuple(tuple(int(d) for d in np.shape(leaf)) for _, leaf in leaves),
            flexible_prefix=flexible_prefix,
        )

    @property
    def num_layers(self) -> int:
        return len(self.names)

    def _fits(self, name: str, expected: tuple[int, ...], actual: tuple[int, ...]) -> bool:
        if self.flexible_prefix and name.startswith(self.flexible_prefix):
            return len(expected) == len(actual)
        return expected == actual

    def differences(self, other: "LayerLayout") -> list[str]:
        """What keeps an optimizer for this layout from running on ``other``'s layers
        (empty when it can)."""
        mine = dict(zip(self.names, self.shapes))
        theirs = dict(zip(other.names, other.shapes))
        problems = [f"missing {n} {list(s)}" for n, s in mine.items() if n not in theirs]
        problems += [f"unexpected {n} {list(s)}" for n, s in theirs.items() if n not in mine]
        problems += [
            f"{n}: expected shape {list(s)}, got {list(theirs[n])}"
            for n, s in mine.items()
            if n in theirs and not self._fits(n, s, theirs[n])
        ]
        if not problems and other.names != self.names:
            problems = ["same layers in a different order"]
        return problems

    def check(self, params: Any) -> None:
        """Raises :class:`LayoutMismatchError` naming the layers that differ from ``params``."""
        problems = self.differences(LayerLayout.from_params(params))
        if problems:
            raise LayoutMismatchError(
                "This L3RS optimizer was meta-trained for a different architecture: "
                + "; ".join(problems)
                + ". Fetch the optimizer registered for this model (l3rs-<base-model>), or "
                "meta-train one for it."
            )

    def to_json(self) -> dict[str, Any]:
        return {
            "names": list(self.names),
            "shapes": [list(s) for s in self.shapes],
            "flexible_prefix": self.flexible_prefix,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "LayerLayout":
        return cls(
            names=tuple(data["names"]),
            shapes=tuple(tuple(int(d) for d in s) for s in data["shapes"]),
            flexible_prefix=data.get("flexible_prefix", ""),
        )
