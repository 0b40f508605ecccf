"""L3RS: a learned, per-layer mixture of normalized base-optimizer directions.

The update rule (arXiv 2408.09310, "Narrowing the Focus") for every layer ``l`` at step ``t``::

    Δθ_l = -λ_l(t) · Σ_p μ_{p,l}(t) · d̂_{p,l}

Design choices, and why:

* **A layer is one parameter tensor** (one leaf of the params pytree, biases included). Leaves
  are what optax sees, so the rule composes with any optax wrapper, and a leaf is the finest
  unit whose direction still has a meaningful norm.
* **Base directions come from shared moments.** Adam's first moment ``m`` and second moment
  ``v`` give five distinct directions for Adam's memory: ``adam`` (m̂/√v̂), ``momentum``
  (SGD-momentum, i.e. ``m``), ``gradient`` (g), ``rmsprop`` (g/√v̂) and ``sign_momentum``
  (sign(m), Lion-like). Keeping one copy of the moments keeps state bytes at Adam's.
* **Each direction is normalized per layer to unit RMS** (``d̂``) at every refresh of the
  controller (below), so the mixing coefficients compare like with like and ``λ_l`` alone sets
  the step's size: at a refresh the RMS of a layer's update is at most ``λ_l``. The mixture is
  computed as scalar coefficients ``−λ_l μ_{p,l} / rms`` times element-wise directions, which
  XLA fuses into one kernel per layer (no stacked copy). With ``normalization="scale_free"``
  only the directions that carry the gradient's units (``momentum``, ``gradient``) are
  normalized; ``adam``, ``rmsprop`` and ``sign_momentum`` are already dimensionless and keep
  their magnitude (Adam's bias-corrected), which shrinks as the gradient's signal-to-noise
  ratio falls. Unit RMS removes that brake, and small-data fine-tuning needs it
  (docs/measurements.md).
* **Optional schedule-free averaging** (``averaging="schedule_free"``): the rule's step moves
  a fast iterate ``z``, ``x`` is its running average, and gradients are taken at
  ``y = β_l·x + (1 − β_l)·z`` with β_l a further output of the MLP — schedule-free's
  interpolation (Defazio et al., 2024), learned per layer. The last step of the planned
  horizon lands on ``x``; :func:`eval_params` gives ``x`` in between. One more parameter copy.
* **A step with a non-finite loss or gradient changes nothing** but ``skipped_steps``: the
  loss enters EMAs that every later step reads, so one NaN would otherwise poison the run.
* **One tiny MLP shared by all layers** maps per-layer features to ``1 + P`` outputs:
  ``λ_l = base_learning_rate · (T_ref / T)^γ · s(t/T) · exp(o_0)`` and
  ``μ_{·,l} = softmax(o_1..o_P)``, where ``s`` is a fixed schedule prior (``schedule``: cosine
  decay from 1 to 0 over the horizon, or constant 1) and ``(T_ref / T)^γ`` a fixed horizon
  prior (``reference_horizon``, ``horizon_exponent``), both of which the MLP modulates per
  layer and step. Its inputs are
  a learned per-layer embedding; time features ``t/T`` and ``log T`` (so a longer horizon
  stretches the schedule, and the peak step size may depend on the horizon); and moving
  averages, at several timescales, of the loss, the layer's gradient norm and the layer's
  weight norm, each as a log-ratio to its value at the first step (scale-free across tasks).
* **Initialization makes the untrained optimizer a sensible fine-tuning Adam**: the output
  layer starts near zero with the mixing bias favouring ``adam``, so the untrained optimizer is
  per-layer-normalized Adam at ``base_learning_rate`` under the two priors, and
  meta-training starts from a good point rather than from noise. The prior and the step size
  were chosen on the meta-training family (16 task draws, T = 200, never the held-out
  datasets): mean final validation loss 0.1735 constant at 1e-3 (0.1717 at 7e-4, 0.1978 at
  2e-3), 0.1579 cosine at 1e-3, **0.1544 cosine at 1.4e-3**, 0.1615 cosine at 2e-3; tuned
  Adam reaches 0.169 (constant, 4e-3) and 0.166 (cosine, 8e-3) there. A larger step for the
  fresh head, which helps Adam (0.161 at 10×), hurts here (0.18 at 3×): per-layer
  normalization already gives the small head tensor a relatively larger step. Longer
  fine-tuning of a pretrained model on small data wants a smaller peak step (tuned baselines
  halve their learning rate per doubling of T on the meta-training task), and the untrained
  optimizer overfit at 4T without it: on the family at T = 800 the loss is 0.2559 at the
  T = 200 step size, 0.2110 at ½, **0.1649 at ¼** and 0.1674 at ⅛, hence γ = 1 around
  ``T_ref = 200``; it holds on both sides: at T = 400, 0.1768 at the T = 200 step, **0.1582
  at ½**, 0.1658 at ¼; at T = 100, 0.1868 at the T = 200 step, **0.1689 at 2×**.

* **The controller refreshes every ``control_interval`` steps (16)**: the layer statistics
  (gradient and weight norms, whose EMAs then take one update of ``decay^interval``), the MLP
  and the directions' ``1 / rms`` normalizers. In between, the last refresh's per-layer,
  per-direction scalars scale the current directions under the current step's prior, so such
  a step is Adam's step with a few more element-wise terms in the same fused kernel, plus one
  reduction per layer (its gradient norm): outside the refresh the compiled step has 79
  kernels, Adam's 77; refreshing every step, 229. The refresh is a ``lax.cond`` that only the
  small per-layer arrays pass through; under ``vmap`` with a batched step count it becomes a
  select and both branches run, as before. Between refreshes a direction keeps its relative
  magnitude (a layer whose gradient shrinks takes smaller steps until the next refresh), with
  two corrections: a scalar undoes the growth of ``m``'s bias since the refresh (normalization
  cancels it only at a refresh), and a gradient larger than the refresh's shrinks the step
  by ``min(1, |g_refresh| / |g_t|)``, so no spike becomes a step larger than the refresh's.
  Without that cap a spiky minibatch late in an overfitting run took a step sized by a
  normalizer from a tiny gradient: on a small-data family (60–120 images per class) the
  final validation loss at T = 800 was 0.559 refreshing every step and 1.97 every 8, and
  with it 0.438 every 8, 0.415 every 16. On the meta-training family (16 draws, untrained θ),
  T = 200 / 800: 0.1538 / 0.1657 every step, 0.1552 / 0.1607 every 4, 0.1541 / 0.1604
  every 8, **0.1546 / 0.1590 every 16**. Step time, large CNN at batch 64: 1.2–1.3× Adam's
  refreshing every step, ~1.1× every 8 or 16 (``benchmarks/step_cost.py``).

The split between meta-parameters and the optimizer follows learned_optimization:
:meth:`L3RS.init` draws meta-parameters θ (a small pytree of arrays), :meth:`L3RS.opt_fn`
turns θ into an ``optax.GradientTransformationExtraArgs``. θ may be a traced value, so a
jitted inner-training unroll can take θ as an argument (ES perturbs it without recompiling).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Annotated, Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lopt.schema import COUNT, DECAY, NON_NEGATIVE, POSITIVE

DIRECTIONS: tuple[str, ...] = ("adam", "momentum", "gradient", "rmsprop", "sign_momentum")
SCHEDULES: tuple[str, ...] = ("cosine", "constant", "warmup_constant")
AVERAGING: tuple[str, ...] = ("none", "schedule_free")
NORMALIZATIONS: tuple[str, ...] = ("unit_rms", "scale_free")
# Directions without the gradient's units: Adam's and RMSProp's ratios to √v̂, and signs.
DIMENSIONLESS: frozenset[str] = frozenset({"adam", "rmsprop", "sign_momentum"})

MetaParams = dict[str, Any]
"""θ: ``{"layer_embeddings": [L, E], "mlp": {"w1", "b1", "w2", "b2"}}``."""


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


@dataclasses.dataclass(frozen=True)
class L3RSConfig:
    """Static hyperparameters of the L3RS architecture (not meta-learned)."""

    directions: tuple[str, ...] = DIRECTIONS
    b1: Annotated[float, DECAY] = 0.9
    b2: Annotated[float, DECAY] = 0.999
    eps: Annotated[float, POSITIVE] = 1e-8
    ema_decays: tuple[float, ...] = (0.9, 0.99, 0.999)
    embedding_dim: Annotated[int, NON_NEGATIVE] = 4
    hidden_size: Annotated[int, COUNT] = 16
    base_learning_rate: Annotated[float, POSITIVE] = 1.4e-3
    # The priors (T_ref / T)^γ · s(t/T) on the step size that the MLP modulates (module
    # docstring); base_learning_rate is the peak step at T = reference_horizon.
    schedule: str = "cosine"
    # Of ``warmup_constant``: the fraction of the horizon over which the prior rises linearly
    # from 0 to 1 (as schedule-free AdamW's warmup).
    warmup_fraction: float = 0.05
    reference_horizon: int = 200
    horizon_exponent: float = 1.0
    # "schedule_free": the rule's step moves a fast iterate z; the parameters the gradient is
    # taken at interpolate between z and its running average x with a learned per-layer
    # weight (module docstring). "none": the step moves the parameters themselves.
    averaging: str = "none"
    # The interpolation weight β of x in y = β·x + (1 − β)·z the untrained optimizer uses.
    interpolation: float = 0.9
    # The untrained optimizer prefers this direction with softmax weight ~0.65 for 5 directions.
    init_direction: str = "adam"
    # "unit_rms": every direction is scaled to unit RMS per layer. "scale_free": only the
    # directions that carry the gradient's units (momentum, gradient) are; the dimensionless
    # ones keep their magnitude (Adam's is bias-corrected), which shrinks as the gradient's
    # signal-to-noise ratio falls: Adam's own brake on noisy, small-data steps.
    normalization: str = "unit_rms"
    init_direction_logit: float = 2.0
    init_output_scale: Annotated[float, NON_NEGATIVE] = 0.01
    # Steps between refreshes of the controller (layer statistics, MLP, direction
    # normalizers); in between, the last refresh's controls scale the current directions under
    # the per-step prior (module docstring).
    control_interval: int = 16

    def __post_init__(self) -> None:
        unknown = [d for d in self.directions if d not in DIRECTIONS]
        if unknown or not self.directions:
            raise ValueError(f"Unknown base directions {unknown}; choose from {list(DIRECTIONS)}.")
        if len(set(self.directions)) != len(self.directions):
            raise ValueError(f"Base directions must be distinct, got {list(self.directions)}.")
        if self.init_direction not in self.directions:
            raise ValueError(
                f"init_direction {self.init_direction!r} is not among directions {list(self.directions)}."
            )
        if self.reference_horizon < 1:
            raise ValueError(
                f"reference_horizon must be a positive number of steps, got {self.reference_horizon}."
            )
        if self.schedule not in SCHEDULES:
            raise ValueError(f"Unknown schedule {self.schedule!r}; choose from {list(SCHEDULES)}.")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must lie in [0, 1), got {self.warmup_fraction}.")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(
                f"Unknown normalization {self.normalization!r}; choose from {list(NORMALIZATIONS)}."
            )
        if self.averaging not in AVERAGING:
            raise ValueError(f"Unknown averaging {self.averaging!r}; choose from {list(AVERAGING)}.")
        if not _MIN_INTERPOLATION < self.interpolation < 1.0:
            raise ValueError(
                f"interpolation must lie in [{_MIN_INTERPOLATION}, 1), got {self.interpolation}."
            )
        if not all(0.0 < d < 1.0 for d in self.ema_decays):
            raise ValueError(f"ema_decays must lie in (0, 1), got {list(self.ema_decays)}.")
        if self.control_interval < 1:
            raise ValueError(
                f"control_interval must be a positive number of steps, got {self.control_interval}."
            )

    @property
    def num_features(self) -> int:
        # embedding + (t/T, log T) + EMAs of loss, gradient norm, weight norm.
        return self.embedding_dim + 2 + 3 * len(self.ema_decays)

    @property
    def averages(self) -> bool:
        """Whether the rule keeps a fast iterate and evaluates at its average."""
        return self.averaging != "none"

    @property
    def num_outputs(self) -> int:
        # log step size, P mixing logits, and the interpolation's logit when averaging.
        return 1 + len(self.directions) + int(self.averages)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "L3RSConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise ValueError(f"Unknown L3RS config fields {sorted(unknown)}.")
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        # Optimizers saved before the priors existed had none: keep their behaviour.
        kwargs.setdefault("schedule", "constant")
        kwargs.setdefault("horizon_exponent", 0.0)
        # ... and refreshed their controller at every step ...
        kwargs.setdefault("control_interval", 1)
        # ... and moved the parameters themselves, along unit-RMS directions.
        kwargs.setdefault("averaging", "none")
        kwargs.setdefault("normalization", "unit_rms")
        return cls(**kwargs)


class Controls(NamedTuple):
    """What the MLP decided for one step: per-layer step sizes ``[L]``, mixtures ``[L, P]``
    and, when the rule averages, the weight β of the average in the interpolation ``[L]``."""

    learning_rates: jax.Array
    mixing_coefficients: jax.Array
    interpolation: jax.Array | None = None


class L3RSState(NamedTuple):
    """State of the L3RS transformation.

    Attributes:
      count: number of updates taken so far.
      mu: Adam's first moment; every momentum-based direction is derived from it.
      nu: Adam's second moment; every preconditioned direction is derived from it.
      loss_ema: EMAs of the loss, one per decay, bias-uncorrected ``[K]``.
      grad_norm_ema: EMAs of each layer's gradient norm ``[L, K]``, updated at refreshes.
      weight_norm_ema: EMAs of each layer's weight norm ``[L, K]``, updated at refreshes.
      reference: the loss, gradient norms and weight norms at the first step, ``[1 + 2L]``;
        features are log-ratios to them, so the MLP sees the same numbers on any task scale.
      controls: the MLP's controls from the last refresh, before the step-size prior.
      inverse_rms: ``1 / rms(d)`` of every layer's base directions at the last refresh
        ``[L, P]``.
      refresh_gradient_norms: each layer's gradient norm at the last refresh ``[L]``; no step
        before the next refresh is larger than it would be with the refresh's gradient norm.
      fast_iterate: schedule-free's z, the iterate the rule's steps move (``None`` without
        averaging). The parameters are ``y = β·x + (1 − β)·z``; x, the average, is derived
        from y and z (:func:`eval_params`), so averaging costs one copy of the parameters.
      interpolation: the β of every layer that formed the current parameters ``[L]``.
      average_weight: the sum of the averaging weights so far (x averages z's with them).
      skipped_steps: updates skipped because the loss or a gradient was not finite; such a
        step leaves every other field as it was.
    """

    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates
    loss_ema: jax.Array
    grad_norm_ema: jax.Array
    weight_norm_ema: jax.Array
    reference: jax.Array
    controls: Controls
    inverse_rms: jax.Array
    refresh_gradient_norms: jax.Array
    fast_iterate: optax.Params | None
    interpolation: jax.Array | None
    average_weight: jax.Array
    skipped_steps: jax.Array


# The step count is an int32.
_MAX_STEPS = 2**31 - 1

# The smallest interpolation weight: x is recovered from y and z by dividing by β.
_MIN_INTERPOLATION = 0.05


# Added under square roots, which have an infinite derivative at 0: exact zeros occur (dead
# ReLUs give exactly-zero gradient entries) and would turn a backpropagated meta-gradient
# (truncated backprop through the optimizer) into NaN. Far below eps, so updates are unchanged.
_SQRT_FLOOR = 1e-30


def _last_refresh(count: jax.Array, interval: int) -> jax.Array:
    """The step (counted from 1) at which the controller last refreshed by step ``count``:
    it refreshes at steps 1, 1 + interval, 1 + 2·interval, …"""
    return jnp.floor((count - 1.0) / interval) * interval + 1.0


def _progress(count: jax.Array, num_steps: int) -> jax.Array:
    """t/T of the step being taken: 0 at the first step (``count`` already counts it)."""
    return (count - 1.0) / num_steps


def _norm(x: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32))) + _SQRT_FLOOR)


class L3RS:
    """The L3RS learned optimizer for one layer layout.

    Example::

        l3rs = L3RS(L3RSConfig(), LayerLayout.from_params(params))
        theta = l3rs.init(jax.random.key(0))
        opt = l3rs.opt_fn(theta, num_steps=200)
        state = opt.init(params)
        updates, state = opt.update(grads, state, params, value=loss)
    """

    def __init__(self, config: L3RSConfig, layout: LayerLayout):
        self.config = config
        self.layout = layout

    # ----------------------------------------------------------------------------------------
    # Meta-parameters.

    def init(self, key: jax.Array) -> MetaParams:
        """Draws θ so that the untrained optimizer behaves like Adam at ``base_learning_rate``."""
        c = self.config
        k_emb, k_w1, k_w2 = jax.random.split(key, 3)
        num_outputs = c.num_outputs
        mixing_bias = jnp.zeros(len(c.directions)).at[c.directions.index(c.init_direction)].set(
            c.init_direction_logit
        )
        if c.averages:
            # The interpolation's output is a logit offset from the configured β.
            mixing_bias = jnp.concatenate([mixing_bias, jnp.zeros(1)])
        return {
            "layer_embeddings": jax.random.normal(k_emb, (self.layout.num_layers, c.embedding_dim)),
            "mlp": {
                "w1": jax.random.normal(k_w1, (c.num_features, c.hidden_size))
                / math.sqrt(c.num_features),
                "b1": jnp.zeros(c.hidden_size),
                "w2": c.init_output_scale
                * jax.random.normal(k_w2, (c.hidden_size, num_outputs))
                / math.sqrt(c.hidden_size),
                "b2": jnp.concatenate([jnp.zeros(1), mixing_bias]),
            },
        }

    def check_meta_params(self, theta: MetaParams) -> None:
        """Raises ``ValueError`` when θ's shapes do not fit this config and layout."""
        expected = jax.tree.map(jnp.shape, jax.eval_shape(self.init, jax.random.key(0)))
        actual = jax.tree.map(jnp.shape, theta)
        if expected != actual:
            raise ValueError(
                f"Meta-parameter shapes {actual} do not match the L3RS config and layout "
                f"(expected {expected}); was θ saved with another config?"
            )

    # ----------------------------------------------------------------------------------------
    # The rule.

    def features(self, theta: MetaParams, state: L3RSState, num_steps: int) -> jax.Array:
        """Per-layer MLP inputs ``[L, F]`` from θ's embeddings and the optimizer state (after
        at least one update)."""
        c = self.config
        num_layers = self.layout.num_layers
        t = state.count.astype(jnp.float32)
        decays = jnp.asarray(c.ema_decays, jnp.float32)
        # EMAs start at zero; dividing by (1 - decay^t) removes that bias. The norms' EMAs
        # took one update of decay^interval per refresh: interval · refreshes steps' worth.
        loss_correction = 1.0 - jnp.power(decays, t)
        norm_steps = _last_refresh(t, c.control_interval) - 1.0 + c.control_interval
        norm_correction = 1.0 - jnp.power(decays, norm_steps)
        reference = state.reference
        tiny = 1e-12
        loss_feat = jnp.log(state.loss_ema / loss_correction + tiny) - jnp.log(reference[0] + tiny)
        grad_ref = reference[1 : 1 + num_layers, None]
        weight_ref = reference[1 + num_layers :, None]
        grad_feat = jnp.log(state.grad_norm_ema / norm_correction + tiny) - jnp.log(grad_ref + tiny)
        weight_feat = jnp.log(state.weight_norm_ema / norm_correction + tiny) - jnp.log(
            weight_ref + tiny
        )
        log_horizon = jnp.log(jnp.asarray(num_steps, jnp.float32))
        time_feat = jnp.stack([_progress(t, num_steps), log_horizon / 10.0])
        return jnp.concatenate(
            [
                theta["layer_embeddings"],
                jnp.broadcast_to(time_feat, (num_layers, 2)),
                jnp.broadcast_to(loss_feat, (num_layers, len(c.ema_decays))),
                grad_feat,
                weight_feat,
            ],
            axis=1,
        )

    def controls(self, theta: MetaParams, features: jax.Array) -> Controls:
        """The shared MLP: features ``[L, F]`` to step sizes ``λ`` (before the priors) and
        mixtures ``μ``."""
        c = self.config
        mlp = theta["mlp"]
        hidden = jnp.tanh(features @ mlp["w1"] + mlp["b1"])
        out = hidden @ mlp["w2"] + mlp["b2"]
        num_directions = len(c.directions)
        interpolation = None
        if c.averages:
            # β in [_MIN_INTERPOLATION, 1), at c.interpolation for a zero output.
            share = (c.interpolation - _MIN_INTERPOLATION) / (1.0 - _MIN_INTERPOLATION)
            logit = out[:, 1 + num_directions] + math.log(share / (1.0 - share))
            interpolation = _MIN_INTERPOLATION + (1.0 - _MIN_INTERPOLATION) * jax.nn.sigmoid(logit)
        return Controls(
            learning_rates=c.base_learning_rate * jnp.exp(out[:, 0]),
            mixing_coefficients=jax.nn.softmax(out[:, 1 : 1 + num_directions], axis=-1),
            interpolation=interpolation,
        )

    def step_size_prior(self, count: jax.Array, num_steps: int) -> jax.Array:
        """``(T_ref / T)^γ · s(t/T)``, the fixed factor the MLP's step sizes are multiplied by
        at step ``count`` (1 for the first) of a ``num_steps``-step run."""
        c = self.config
        return jnp.float32((c.reference_horizon / num_steps) ** c.horizon_exponent) * self.schedule(
            count, num_steps
        )

    def schedule(self, count: jax.Array, num_steps: int) -> jax.Array:
        """``s(t/T)``, the schedule part of the step-size prior, at step ``count``."""
        c = self.config
        # Clipped: past the horizon a cosine prior stays at 0, as a cosine schedule does.
        progress = jnp.clip(_progress(count.astype(jnp.float32), num_steps), 0.0, 1.0)
        if c.schedule == "cosine":
            return 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        if c.schedule == "warmup_constant" and c.warmup_fraction > 0:
            # As optax's linear warmup: the first step is at 1 / warmup_steps of the peak.
            warmup_steps = max(1.0, c.warmup_fraction * num_steps)
            return jnp.minimum(1.0, count.astype(jnp.float32) / warmup_steps)
        return jnp.float32(1.0)

    def averaging_weight(self, count: jax.Array, num_steps: int) -> jax.Array:
        """The weight of step ``count``'s fast iterate in the average: the square of the
        schedule's running maximum, as schedule-free weights its iterates by ``max_lr²`` (the
        iterates of the warm-up count less). Every prior here rises or falls monotonically,
        so the running maximum is the current value or the first one."""
        if self.config.schedule == "warmup_constant":
            return jnp.square(self.schedule(count, num_steps))
        return jnp.float32(1.0)

    def base_directions(
        self, grads: optax.Updates, mu: optax.Updates, nu_hat: optax.Updates
    ) -> list[list[jax.Array]]:
        """Per layer, the P base directions ``d`` (element-wise; unnormalized).

        ``m``'s bias correction is left out: a constant factor cancels under normalization.
        """
        c = self.config

        def per_layer(g, m, v_hat):
            g = g.astype(jnp.float32)
            inverse_denom = 1.0 / (jnp.sqrt(v_hat + _SQRT_FLOOR) + c.eps)
            candidates = {
                "adam": lambda: m * inverse_denom,
                "momentum": lambda: m,
                "gradient": lambda: g,
                "rmsprop": lambda: g * inverse_denom,
                # sign(m) as two selects: jnp.sign is several times slower on XLA's CPU backend.
                "sign_momentum": lambda: (m > 0).astype(jnp.float32) - (m < 0).astype(jnp.float32),
            }
            return [candidates[name]() for name in c.directions]

        return [
            per_layer(*leaves)
            for leaves in zip(jax.tree.leaves(grads), jax.tree.leaves(mu), jax.tree.leaves(nu_hat))
        ]

    def direction_inverse_rms(
        self, grads: optax.Updates, mu: optax.Updates, nu_hat: optax.Updates, count: jax.Array
    ) -> jax.Array:
        """``1 / rms(d)`` for every layer's base directions ``[L, P]``, the scalars that scale
        each to unit RMS (``d̂ = d / rms(d)``); with ``scale_free`` normalization the
        dimensionless directions get their bias correction instead (``1 / (1 − b1^t)`` for
        Adam's uncorrected ``m``, 1 for the others).

        They are kept apart from the directions so that the mixture multiplies scalars first
        and each element once (dividing every element of every direction cost a pass per
        direction).
        """
        c = self.config
        # Adam's m is stored uncorrected; momentum_correction carries this to later steps.
        adam_correction = 1.0 / (1.0 - c.b1 ** count.astype(jnp.float32))

        def factor(name: str, normalized: bool, d: jax.Array, m: jax.Array) -> jax.Array:
            if not normalized:
                return adam_correction if name == "adam" else jnp.float32(1.0)
            # sign(m)'s mean square is the fraction of nonzero entries, read off m. One
            # reduction per direction, not one over a stacked [P, *shape] copy, which measured
            # twice as slow.
            mean_square = (
                jnp.mean((m != 0).astype(jnp.float32)) if name == "sign_momentum"
                else jnp.mean(jnp.square(d))
            )
            return 1.0 / (jnp.sqrt(mean_square + _SQRT_FLOOR) + 1e-12)

        def per_layer(directions, m):
            return jnp.stack([
                factor(name, normalized, d, m)
                for name, normalized, d in zip(c.directions, self.normalized_directions, directions)
            ])

        return jnp.stack(
            [
                per_layer(directions, m)
                for directions, m in zip(self.base_directions(grads, mu, nu_hat), jax.tree.leaves(mu))
            ]
        )

    def opt_fn(self, theta: MetaParams, num_steps: int) -> optax.GradientTransformationExtraArgs:
        """Builds the optimizer from θ for a run of ``num_steps`` steps (the horizon ``T``).

        ``update`` needs ``params`` (for weight norms) and the loss as ``value=``. With
        averaging, evaluate at :func:`eval_params` (the last step of the horizon lands the
        parameters on the average, so a run of ``num_steps`` steps ends there by itself).
        """
        num_steps = check_horizon(num_steps)
        c = self.config
        layout = self.layout
        num_decays = len(c.ema_decays)
        decays = jnp.asarray(c.ema_decays, jnp.float32)
        # The norms' EMAs are updated once per refresh, with the decay of that many steps.
        interval_decays = decays**c.control_interval
        ema = lambda decay, old, x: decay * old + (1.0 - decay) * x

        def init_fn(params: optax.Params) -> L3RSState:
            layout.check(params)
            moment = lambda: jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
            num_directions = len(c.directions)
            per_layer = lambda: jnp.zeros(layout.num_layers, jnp.float32)
            return L3RSState(
                count=jnp.zeros([], jnp.int32),
                mu=moment(),
                nu=moment(),
                loss_ema=jnp.zeros(num_decays, jnp.float32),
                grad_norm_ema=jnp.zeros((layout.num_layers, num_decays), jnp.float32),
                weight_norm_ema=jnp.zeros((layout.num_layers, num_decays), jnp.float32),
                reference=jnp.ones(1 + 2 * layout.num_layers, jnp.float32),
                controls=Controls(
                    learning_rates=per_layer(),
                    mixing_coefficients=jnp.zeros((layout.num_layers, num_directions), jnp.float32),
                    interpolation=per_layer() if c.averages else None,
                ),
                inverse_rms=jnp.zeros((layout.num_layers, num_directions), jnp.float32),
                refresh_gradient_norms=per_layer(),
                # A distinct copy: z and the parameters may both be donated to a jitted step.
                fast_iterate=jax.tree.map(jnp.copy, params) if c.averages else None,
                # Before the first step y = z = x, which any β describes; 1 divides exactly.
                interpolation=jnp.ones(layout.num_layers, jnp.float32) if c.averages else None,
                average_weight=jnp.zeros([], jnp.float32),
                skipped_steps=jnp.zeros([], jnp.int32),
            )

        def update_fn(updates, state, params=None, *, value=None, **extra_args):
            del extra_args
            if params is None or value is None:
                raise ValueError(
                    "L3RS needs the parameters and the loss: call "
                    "opt.update(grads, state, params, value=loss)."
                )
            grads = updates
            loss = jnp.asarray(value, jnp.float32).reshape(())
            # Every step: a layer's gradient norm is one reduction over its gradient, bounds
            # the step between refreshes (below), and is not finite when any entry is not.
            grad_norms = jnp.stack([_norm(g) for g in jax.tree.leaves(grads)])
            finite = jnp.isfinite(loss) & jnp.all(jnp.isfinite(grad_norms))
            new_updates, new_state = step(grads, state, params, loss, grad_norms)
            # A non-finite loss or gradient would enter the EMAs and moments and poison every
            # later step: such a step changes nothing but the count of skipped steps.
            keep = lambda new, old: jnp.where(finite, new, old)
            new_state = jax.tree.map(keep, new_state, state._replace(
                skipped_steps=state.skipped_steps + 1
            ))
            new_updates = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), new_updates)
            return new_updates, new_state

        def step(grads, state, params, loss, grad_norms):
            count = optax.safe_increment(state.count)
            mu = optax.tree.update_moment(grads, state.mu, c.b1, 1)
            nu = optax.tree.update_moment_per_elem_norm(grads, state.nu, c.b2, 2)
            # Computed where it is used (in the refresh and in the mixture), so that no
            # full-size copy of it is written for the conditional refresh to read.
            nu_hat = lambda: optax.tree.bias_correction(nu, c.b2, count)
            state = state._replace(
                count=count, mu=mu, nu=nu, loss_ema=ema(decays, state.loss_ema, loss)
            )

            def refresh() -> L3RSState:
                weight_norms = jnp.stack([_norm(p) for p in jax.tree.leaves(params)])
                # Features are log-ratios to the first step's values, which become the reference.
                current = jnp.concatenate([loss[None], grad_norms, weight_norms])
                refreshed = state._replace(
                    grad_norm_ema=ema(interval_decays, state.grad_norm_ema, grad_norms[:, None]),
                    weight_norm_ema=ema(interval_decays, state.weight_norm_ema, weight_norms[:, None]),
                    reference=jnp.where(count == 1, current, state.reference),
                )
                return refreshed._replace(
                    controls=self.controls(theta, self.features(theta, refreshed, num_steps)),
                    inverse_rms=self.direction_inverse_rms(grads, mu, nu_hat(), count),
                    refresh_gradient_norms=grad_norms,
                )

            refreshed_fields = (
                "grad_norm_ema", "weight_norm_ema", "reference", "controls", "inverse_rms",
                "refresh_gradient_norms",
            )
            if c.control_interval == 1:
                state = refresh()
            else:
                # Only the small fields pass through the conditional: the moments stay outside,
                # so neither branch copies a full-size array.
                small = lambda s: tuple(getattr(s, f) for f in refreshed_fields)
                refreshed = jax.lax.cond(
                    (count - 1) % c.control_interval == 0,
                    lambda: small(refresh()),
                    lambda: small(state),
                )
                state = state._replace(**dict(zip(refreshed_fields, refreshed)))

            controls = self.controls_in_effect(state, num_steps)
            # Σ_p (−λ_l μ_{p,l} / rms(d_{p,l})) · d_{p,l}: scalars times element-wise
            # directions, which XLA fuses into one kernel per layer.
            coefficients = (
                -controls.learning_rates[:, None]
                * controls.mixing_coefficients
                * state.inverse_rms
                * self.momentum_correction(count)
                # A gradient larger than at the refresh shrinks a normalized direction's step by
                # the ratio, so a stale normalizer cannot turn a gradient spike into a step
                # larger than λ (a scale-free direction has no normalizer to go stale).
                * jnp.where(
                    self.normalized_directions,
                    jnp.minimum(1.0, state.refresh_gradient_norms / grad_norms)[:, None],
                    1.0,
                )
            )
            leaves, treedef = jax.tree.flatten(grads)
            steps = [
                sum(coefficients[i, p] * d for p, d in enumerate(directions))
                for i, directions in enumerate(self.base_directions(grads, mu, nu_hat()))
            ]
            if not c.averages:
                new_leaves = [s.astype(g.dtype) for s, g in zip(steps, leaves)]
                return jax.tree.unflatten(treedef, new_leaves), state
            return self._averaged_step(steps, treedef, state, params, controls, num_steps)

        return optax.GradientTransformationExtraArgs(init_fn, update_fn)

    def _averaged_step(
        self,
        steps: list[jax.Array],
        treedef: Any,
        state: L3RSState,
        params: optax.Params,
        controls: Controls,
        num_steps: int,
    ) -> tuple[optax.Updates, L3RSState]:
        """Schedule-free's interpolation (Defazio et al., 2024) around the rule's steps.

        The rule's step moves the fast iterate ``z``; ``x`` averages the ``z``'s (weights
        from :meth:`averaging_weight`), and the parameters, where the next gradient is taken,
        are ``y = β·x + (1 − β)·z`` with a learned per-layer β. Taking gradients between the
        fast iterate and its average is what lets schedule-free AdamW run a step ~30× larger
        than Adam's stably; a bare average of Adam's iterates does not reproduce its lead.
        At the horizon's last step β is 1, so a run of the planned length ends on ``x``.
        """
        count = state.count
        weight = self.averaging_weight(count, num_steps)
        average_weight = state.average_weight + weight
        share = weight / jnp.maximum(average_weight, 1e-30)
        interpolation = jnp.where(count >= num_steps, 1.0, controls.interpolation)
        updates, fast = [], []
        for i, (step, y, z) in enumerate(
            zip(steps, jax.tree.leaves(params), jax.tree.leaves(state.fast_iterate))
        ):
            beta = interpolation[i]
            x = _average(y, z, state.interpolation[i])
            z = z + step.astype(z.dtype)
            x = x + share * (z - x)
            updates.append((beta * x + (1.0 - beta) * z - y).astype(y.dtype))
            fast.append(z)
        return jax.tree.unflatten(treedef, updates), state._replace(
            fast_iterate=jax.tree.unflatten(treedef, fast),
            interpolation=interpolation,
            average_weight=average_weight,
        )

    @property
    def normalized_directions(self) -> np.ndarray:
        """Per direction ``[P]``, whether it is scaled to unit RMS at refreshes."""
        c = self.config
        return np.asarray(
            [c.normalization == "unit_rms" or name not in DIMENSIONLESS for name in c.directions]
        )

    def momentum_correction(self, count: jax.Array) -> jax.Array:
        """Per direction ``[P]``, the factor that undoes the growth of ``m``'s bias since the
        last refresh: ``(1 - b1^t_refresh) / (1 - b1^t)`` for ``adam`` and ``momentum``, 1 for
        the others (and at refreshes).

        ``m`` is left bias-uncorrected, a factor that normalization cancels at a refresh but
        not between refreshes: without this, early in a run the ``adam`` direction would grow
        by up to ``(1 - b1^k) / (1 - b1)`` (3.4× for k = 4) before the next refresh rescaled it.
        """
        c = self.config
        t = count.astype(jnp.float32)
        correction = (1.0 - c.b1 ** _last_refresh(t, c.control_interval)) / (1.0 - c.b1**t)
        uses_m = jnp.asarray([d in ("adam", "momentum") for d in c.directions])
        return jnp.where(uses_m, correction, 1.0)

    def controls_in_effect(self, state: L3RSState, num_steps: int) -> Controls:
        """The controls of the step that produced ``state`` (also for analysis and plots): the
        last refresh's MLP output under this step's step-size prior."""
        prior = self.step_size_prior(state.count, num_steps)
        return state.controls._replace(learning_rates=state.controls.learning_rates * prior)


def constant_meta_params(
    l3rs: L3RS, direction: str, log_learning_rate_scale: float = 0.0, key: jax.Array | None = None
) -> MetaParams:
    """θ whose optimizer always uses ``direction`` alone at ``base_learning_rate · e^scale``.

    With the MLP's output weights at zero and a dominant mixing logit, L3RS reduces to one
    normalized base optimizer: a reference point for tests and ablations.
    """
    theta = l3rs.init(jax.random.key(0) if key is None else key)
    index = l3rs.config.directions.index(direction)
    logits = jnp.full(len(l3rs.config.directions), -1e4).at[index].set(0.0)
    theta["mlp"]["w2"] = jnp.zeros_like(theta["mlp"]["w2"])
    interpolation_logit = jnp.zeros(int(l3rs.config.averages))
    theta["mlp"]["b2"] = jnp.concatenate(
        [jnp.array([log_learning_rate_scale]), logits, interpolation_logit]
    )
    return theta


def eval_params(state: L3RSState, params: optax.Params) -> optax.Params:
    """The parameters to evaluate, like ``optax.contrib.schedule_free_eval_params``: with
    averaging, the average ``x = (y − (1 − β)·z) / β`` of every layer; else ``params``.

    A run of the planned number of steps already ends on ``x`` (the last step lands there),
    so this matters when evaluating in the middle of a run, e.g. for a learning curve.
    """
    if state.fast_iterate is None:
        return params
    leaves, treedef = jax.tree.flatten(params)
    return jax.tree.unflatten(treedef, [
        _average(y, z, beta).astype(y.dtype)
        for y, z, beta in zip(leaves, jax.tree.leaves(state.fast_iterate), state.interpolation)
    ])


def _average(y: jax.Array, z: jax.Array, beta: jax.Array) -> jax.Array:
    """The average x that ``y = β·x + (1 − β)·z`` interpolates from, given y and z."""
    return (y - (1.0 - beta) * z) / beta


def check_horizon(num_steps: Any) -> int:
    """``num_steps`` as an int, or a ``ValueError`` unless it is a positive int that the int32
    step count can reach (floats, bools and strings are refused, not rounded)."""
    if (
        isinstance(num_steps, bool)
        or not isinstance(num_steps, (int, np.integer))
        or not 1 <= num_steps <= _MAX_STEPS
    ):
        raise ValueError(
            f"num_steps must be a positive int number of steps (at most {_MAX_STEPS}: the step "
            f"count is an int32), got {num_steps!r}."
        )
    return int(num_steps)

