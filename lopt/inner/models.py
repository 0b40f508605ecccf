"""Small Flax image classifiers that can be rebuilt from a JSON spec.

A registered base model is two files: ``model.json`` (a :class:`ModelSpec`) and
``params.msgpack``. The spec is everything needed to rebuild the network, so a consumer never
unpickles code. The classifier head is the submodule ``head``: fine-tuning on a task with a
different number of classes replaces exactly that subtree (:func:`with_fresh_head`).

Convolutions are computed as im2col + matmul (:class:`PatchConv`): for these tiny CNNs on CPU,
``lax.conv`` is several times slower than patches + one matmul, above all inside ``lax.scan``
(docs/design.md §3). The parameters have the meaning of a 3×3 conv kernel, flattened to
``[kh·kw·C_in, C_out]``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Annotated, Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lopt.schema import COUNT

Params = Any
ModelFn = Callable[[Params, jax.Array], jax.Array]
"""``model_fn(params, images) -> logits``; images float32 ``[N, H, W, C]`` in [0, 1]."""

ARCHITECTURES = ("cnn",)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The architecture of a classifier: enough to rebuild it."""

    num_classes: int
    input_shape: Annotated[tuple[int, int, int], COUNT] = (14, 14, 1)
    architecture: str = "cnn"
    conv_features: Annotated[tuple[int, ...], COUNT] = (16, 32)
    hidden_size: Annotated[int, COUNT] = 64

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"Unknown architecture {self.architecture!r}; known: {list(ARCHITECTURES)}."
            )
        if self.num_classes < 2:
            raise ValueError(f"A classifier needs at least 2 classes, got {self.num_classes}.")
        if len(self.input_shape) != 3:
            raise ValueError(f"input_shape must be (H, W, C), got {self.input_shape}.")

    def with_num_classes(self, num_classes: int) -> "ModelSpec":
        return dataclasses.replace(self, num_classes=num_classes)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "ModelSpec":
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**kwargs)


class PatchConv(nn.Module):
    """A ``SAME``-padded strided convolution: shifted strided slices (im2col), then one matmul.

    Slices + concatenate measured fastest here, both per step and inside ``lax.scan``
    (1.3 ms vs 2.3 ms for ``lax.conv_general_dilated_patches`` and 8 ms for ``nn.Conv`` per
    scanned training step of the default CNN at batch 64).
    """

    features: int
    kernel_size: int = 3
    stride: int = 2

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        _, height, width, _ = x.shape
        k, s = self.kernel_size, self.stride
        out_h, out_w = -(-height // s), -(-width // s)
        pad_h = max((out_h - 1) * s + k - height, 0)
        pad_w = max((out_w - 1) * s + k - width, 0)
        x = jnp.pad(x, ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
        patches = jnp.concatenate(
            [
                x[:, i : i + s * (out_h - 1) + 1 : s, j : j + s * (out_w - 1) + 1 : s, :]
                for i in range(k)
                for j in range(k)
            ],
            axis=-1,
        )
        return nn.Dense(self.features)(patches)


class CNN(nn.Module):
    """Strided 3×3 convs, a dense layer and a classifier head named ``head``."""

    num_classes: int
    conv_features: tuple[int, ...]
    hidden_size: int

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        x = images
        for features in self.conv_features:
            x = nn.relu(PatchConv(features)(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(self.hidden_size)(x))
        return nn.Dense(self.num_classes, name="head")(x)


def build(spec: ModelSpec) -> nn.Module:
    return CNN(
        num_classes=spec.num_classes,
        conv_features=spec.conv_features,
        hidden_size=spec.hidden_size,
    )


@functools.lru_cache(maxsize=None)
def model_fn(spec: ModelSpec) -> ModelFn:
    """The apply function of ``spec``'s network; one object per spec, so that jitted code
    taking it as a static argument compiles once."""
    module = build(spec)

    def apply(params: Params, images: jax.Array) -> jax.Array:
        return module.apply({"params": params}, images)

    return apply


def init_params(spec: ModelSpec, key: jax.Array) -> Params:
    """Fresh parameters of ``spec``'s network drawn from ``key``."""
    return _jitted_init(spec)(key)


@functools.lru_cache(maxsize=None)
def _jitted_init(spec: ModelSpec) -> Callable[[jax.Array], Params]:
    # One compiled program per spec, the same numbers as eager ``init``: op by op, Flax's init
    # dispatched dozens of tiny programs (5 s for the first call, ~0.7 s for each new head).
    module = build(spec)
    # A NumPy constant: a jnp array made while the first caller is being traced (init inside a
    # jitted unroll) would be a tracer, and the cached function would leak it to later calls.
    dummy = np.zeros((1, *spec.input_shape), np.float32)
    return jax.jit(lambda key: module.init(key, dummy)["params"])


def with_fresh_head(spec: ModelSpec, params: Params, num_classes: int, key: jax.Array) -> Params:
    """``params`` with the ``head`` subtree re-initialized for ``num_classes`` classes.

    The body is kept as it is; the new head's initialization is drawn from ``key`` exactly as a
    fresh model's would be, so different keys give different head initializations.
    """
    fresh = init_params(spec.with_num_classes(num_classes), key)
    return {**params, "head": fresh["head"]}


STARTS = ("pretrained", "scratch")
"""Where a fine-tuning run starts; see :func:`starting_params`."""


def starting_params(
    spec: ModelSpec, pretrained: Params, num_classes: int, key: jax.Array, start: str = "pretrained"
) -> Params:
    """The parameters a meta-training unroll starts from.

    ``pretrained``: the pretrained body with a fresh head (what the specialized optimizer is
    for). ``scratch``: a whole freshly initialized model of the same architecture, so that an
    optimizer meta-trained on it learns to train this architecture in general and never sees
    the pretrained checkpoint (the *general* optimizer the specialization claim is tested
    against).
    """
    if start == "pretrained":
        return with_fresh_head(spec, pretrained, num_classes, key)
    if start == "scratch":
        return init_params(spec.with_num_classes(num_classes), key)
    raise ValueError(f"Unknown start {start!r}; choose from {list(STARTS)}.")


def num_parameters(params: Params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))
