"""L3RS: a learned, per-layer mixture of normalized base-optimizer directions.

The update rule (arXiv 2408.09310, "Narrowing the Focus") for every layer ``l`` at step ``t``::

    Δθ_l = -λ_l(t) · Σ_p μ_{p,l}(t) · d̂_{p,l}

The rules, and why (the measurements behind the defaults are in docs/measurements.md):

* **A layer is one parameter tensor** (one leaf of the params pytree, biases included): leaves
  are what optax sees, so the rule composes with any optax wrapper.
* **Base directions come from Adam's moments** ``m`` and ``v``: ``adam`` (m̂/√v̂), ``momentum``
  (``m``), ``gradient`` (g), ``rmsprop`` (g/√v̂) and ``sign_momentum`` (sign(m), Lion-like).
  One copy of the moments keeps the state at Adam's size.
* **Directions are normalized per layer** (``d̂``), so the mixture compares like with like and
  ``λ_l`` alone sets the step's size. ``normalization="unit_rms"`` scales every direction to
  unit RMS; ``"scale_free"`` only those that carry the gradient's units (``momentum``,
  ``gradient``), so Adam's magnitude, which shrinks as the gradient's signal-to-noise ratio
  falls, still brakes noisy small-data steps. The mixture is scalars times element-wise
  directions, which XLA fuses into one kernel per layer.
* **One tiny MLP shared by all layers** maps per-layer features to
  ``λ_l = base_learning_rate · (T_ref / T)^γ · s(t/T) · exp(o_0)`` and
  ``μ_{·,l} = softmax(o_1..o_P)``. Its inputs are a learned per-layer embedding, ``t/T`` and
  ``log T``, and EMAs at several timescales of the loss, the layer's gradient norm and its
  weight norm, each as a log-ratio to its first-step value: scale-free, so they transfer
  across tasks. The fixed priors, a schedule ``s`` (``schedule``) and a horizon factor
  ``(T_ref / T)^γ`` (``reference_horizon``, ``horizon_exponent``), give the MLP a good
  schedule to modulate: fine-tuning on small data wants a smaller peak step the longer it runs.
* **The untrained optimizer is per-layer-normalized Adam** at ``base_learning_rate`` under the
  priors (output layer near zero, mixing bias on ``init_direction``), so meta-training starts
  from a good point rather than from noise.
* **The controller refreshes every ``control_interval`` steps**: layer statistics, the MLP and
  the directions' ``1 / rms`` normalizers. In between, the last refresh's per-layer scalars
  scale the current directions, so such a step costs about Adam's. Two corrections keep the
  stale scalars safe: one undoes the growth of ``m``'s bias since the refresh, and a gradient
  larger than the refresh's shrinks a normalized step by ``min(1, |g_refresh| / |g_t|)``, so no
  gradient spike becomes a step larger than ``λ``. The refresh is a ``lax.cond`` that only the
  small per-layer arrays pass through.
* **Optional schedule-free averaging** (``averaging="schedule_free"``): the rule's step moves a
  fast iterate ``z``, ``x`` is its running average, and gradients are taken at
  ``y = β_l·x + (1 − β_l)·z`` with β_l a further output of the MLP: schedule-free's
  interpolation (Defazio et al., 2024), learned per layer, for one more parameter copy.
* **A step with a non-finite loss or gradient changes nothing** but ``skipped_steps``: the loss
  enters EMAs that every later step reads, so one NaN would otherwise poison the run.

The split between meta-parameters and the optimizer follows learned_optimization:
:meth:`L3RS.init` draws θ (a small pytree of arrays) and :meth:`L3RS.opt_fn` turns θ into an
``optax.GradientTransformationExtraArgs``. θ may be traced, so a jitted inner-training unroll
takes it as an argument (ES perturbs it without recompiling), while the architecture
(:class:`L3RS`: config and layout, frozen and compared by value) is the unroll's static part.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Annotated, Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lopt.optim.layout import LayerLayout
from lopt.schema import COUNT, DECAY, NON_NEGATIVE, POSITIVE

DIRECTIONS: tuple[str, ...] = ("adam", "momentum", "gradient", "rmsprop", "sign_momentum")
SCHEDULES: tuple[str, ...] = ("cosine", "constant", "warmup_constant")
AVERAGING: tuple[str, ...] = ("none", "schedule_free")
NORMALIZATIONS: tuple[str, ...] = ("unit_rms", "scale_free")
# Directions without the gradient's units: Adam's and RMSProp's ratios to √v̂, and signs.
DIMENSIONLESS: frozenset[str] = frozenset({"adam", "rmsprop", "sign_momentum"})

MetaParams = dict[str, Any]
"""θ: ``{"layer_embeddings": [L, E], "mlp": {"w1", "b1", "w2", "b2"}}``."""


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
        """The config :meth:`to_json` wrote: every field, none unknown (a file written before a
        field existed is upgraded by :mod:`lopt.store.serialization`, which knows its version)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown, missing = set(data) - fields, fields - set(data)
        if unknown:
            raise ValueError(f"Unknown L3RS config fields {sorted(unknown)}.")
        if missing:
            raise ValueError(f"Missing L3RS config fields {sorted(missing)}.")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


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


def _ema(decay: jax.Array, old: jax.Array, x: jax.Array) -> jax.Array:
    return decay * old + (1.0 - decay) * x


def _norm(x: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32))) + _SQRT_FLOOR)


class _Run(NamedTuple):
    """What :meth:`L3RS.opt_fn` fixes for every step of one run."""

    theta: MetaParams
    num_steps: int
    decays: jax.Array  # of the loss's EMAs, per step [K]
    interval_decays: jax.Array  # of the norms' EMAs, updated once per refresh: decay^interval [K]


# The fields of L3RSState that a refresh of the controller writes: the small per-layer arrays.
_REFRESHED_FIELDS = (
    "grad_norm_ema", "weight_norm_ema", "reference", "controls", "inverse_rms",
    "refresh_gradient_norms",
)


@dataclasses.dataclass(frozen=True)
class L3RS:
    """The L3RS learned optimizer for one layer layout: the architecture, without θ.

    Frozen and compared by ``config`` and ``layout``: two equal architectures are
    interchangeable, and as the optimizer factory of a jitted unroll (a static argument) they
    share one compiled program.

    Example::

        l3rs = L3RS(L3RSConfig(), LayerLayout.from_params(params))
        theta = l3rs.init(jax.random.key(0))
        opt = l3rs.opt_fn(theta, num_steps=200)
        state = opt.init(params)
        updates, state = opt.update(grads, state, params, value=loss)
    """

    config: L3RSConfig
    layout: LayerLayout

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
    # The transformation.

    def __call__(self, theta: MetaParams, num_steps: int) -> optax.GradientTransformationExtraArgs:
        """Builds the optimizer from θ for a run of ``num_steps`` steps (the horizon ``T``).

        ``update`` needs ``params`` (for weight norms) and the loss as ``value=``. With
        averaging, evaluate at :func:`eval_params` (the last step of the horizon lands the
        parameters on the average, so a run of ``num_steps`` steps ends there by itself).
        """
        num_steps = check_horizon(num_steps)
        decays = jnp.asarray(self.config.ema_decays, jnp.float32)
        run = _Run(theta, num_steps, decays, decays**self.config.control_interval)

        def init_fn(params: optax.Params) -> L3RSState:
            return self.init_state(params)

        def update_fn(
            updates: optax.Updates,
            state: L3RSState,
            params: optax.Params | None = None,
            *,
            value: jax.Array | None = None,
            **extra_args: Any,
        ) -> tuple[optax.Updates, L3RSState]:
            del extra_args
            if params is None or value is None:
                raise ValueError(
                    "L3RS needs the parameters and the loss: call "
                    "opt.update(grads, state, params, value=loss)."
                )
            return self._update_if_finite(run, updates, state, params, value)

        return optax.GradientTransformationExtraArgs(init_fn, update_fn)

    @property
    def opt_fn(self) -> L3RS:
        """The optimizer factory ``opt_fn(θ, num_steps)``, as learned_optimization names it:
        this architecture itself (:meth:`__call__`). Passed as a jit-static argument it then
        compares by value, so equal architectures share a compilation; a bound method would
        compare by identity and compile once per object."""
        return self

    def init_state(self, params: optax.Params) -> L3RSState:
        """The state before the first step; :class:`LayoutMismatchError` when ``params`` are not
        the layers this optimizer was built for."""
        c = self.config
        layout = self.layout
        layout.check(params)
        num_decays = len(c.ema_decays)
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

    def _update_if_finite(
        self,
        run: _Run,
        grads: optax.Updates,
        state: L3RSState,
        params: optax.Params,
        value: jax.Array,
    ) -> tuple[optax.Updates, L3RSState]:
        """The rule's step, unless the loss or a gradient is not finite: such a step would enter
        the EMAs and moments and poison every later step, so it changes nothing but
        ``skipped_steps`` (and its updates are zero)."""
        loss = jnp.asarray(value, jnp.float32).reshape(())
        # Every step: a layer's gradient norm is one reduction over its gradient, bounds the
        # step between refreshes (:meth:`_directions_step`), and is not finite when any entry is not.
        grad_norms = jnp.stack([_norm(g) for g in jax.tree.leaves(grads)])
        finite = jnp.isfinite(loss) & jnp.all(jnp.isfinite(grad_norms))
        new_updates, new_state = self._step(run, grads, state, params, loss, grad_norms)
        keep = lambda new, old: jnp.where(finite, new, old)
        new_state = jax.tree.map(keep, new_state, state._replace(
            skipped_steps=state.skipped_steps + 1
        ))
        new_updates = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), new_updates)
        return new_updates, new_state

    def _step(
        self,
        run: _Run,
        grads: optax.Updates,
        state: L3RSState,
        params: optax.Params,
        loss: jax.Array,
        grad_norms: jax.Array,
    ) -> tuple[optax.Updates, L3RSState]:
        """One step of the rule: the moments and the loss's EMAs, the controller when it is due
        for a refresh, then the mixture of directions (around which, with averaging,
        schedule-free's interpolation)."""
        c = self.config
        count = optax.safe_increment(state.count)
        mu = optax.tree.update_moment(grads, state.mu, c.b1, 1)
        nu = optax.tree.update_moment_per_elem_norm(grads, state.nu, c.b2, 2)
        # Computed where it is used (in the refresh and in the mixture), so that no full-size
        # copy of it is written for the conditional refresh to read.
        nu_hat = lambda: optax.tree.bias_correction(nu, c.b2, count)
        state = state._replace(
            count=count, mu=mu, nu=nu, loss_ema=_ema(run.decays, state.loss_ema, loss)
        )
        refreshed = functools.partial(self._refreshed, run, state, grads, params, loss, grad_norms, nu_hat)
        state = self._refresh_when_due(state, refreshed)
        controls = self.controls_in_effect(state, run.num_steps)
        steps = self._directions_step(state, controls, grads, grad_norms, nu_hat)
        treedef = jax.tree.structure(grads)
        if not c.averages:
            new_leaves = [s.astype(g.dtype) for s, g in zip(steps, jax.tree.leaves(grads))]
            return jax.tree.unflatten(treedef, new_leaves), state
        return self._averaged_step(steps, treedef, state, params, controls, run.num_steps)

    def _refresh_when_due(self, state: L3RSState, refreshed: Callable[[], L3RSState]) -> L3RSState:
        """``refreshed()``, the state with the controller refreshed (:meth:`_refreshed`), at
        steps 1, 1 + interval, 1 + 2·interval, …; ``state`` at the others."""
        interval = self.config.control_interval
        if interval == 1:
            return refreshed()
        # Only the small fields pass through the conditional: the moments stay outside, so
        # neither branch copies a full-size array.
        small = lambda s: tuple(getattr(s, f) for f in _REFRESHED_FIELDS)
        fields = jax.lax.cond(
            (state.count - 1) % interval == 0,
            lambda: small(refreshed()),
            lambda: small(state),
        )
        return state._replace(**dict(zip(_REFRESHED_FIELDS, fields)))

    def _refreshed(
        self,
        run: _Run,
        state: L3RSState,
        grads: optax.Updates,
        params: optax.Params,
        loss: jax.Array,
        grad_norms: jax.Array,
        nu_hat: Callable[[], optax.Updates],
    ) -> L3RSState:
        """The controller's refresh: the norms' EMAs take one update of ``decay^interval``, the
        MLP decides the controls, and the directions' ``1 / rms`` normalizers are measured."""
        weight_norms = jnp.stack([_norm(p) for p in jax.tree.leaves(params)])
        # Features are log-ratios to the first step's values, which become the reference.
        current = jnp.concatenate([loss[None], grad_norms, weight_norms])
        refreshed = state._replace(
            grad_norm_ema=_ema(run.interval_decays, state.grad_norm_ema, grad_norms[:, None]),
            weight_norm_ema=_ema(run.interval_decays, state.weight_norm_ema, weight_norms[:, None]),
            reference=jnp.where(state.count == 1, current, state.reference),
        )
        return refreshed._replace(
            controls=self.controls(run.theta, self.features(run.theta, refreshed, run.num_steps)),
            inverse_rms=self.direction_inverse_rms(grads, state.mu, nu_hat(), state.count),
            refresh_gradient_norms=grad_norms,
        )

    def _directions_step(
        self,
        state: L3RSState,
        controls: Controls,
        grads: optax.Updates,
        grad_norms: jax.Array,
        nu_hat: Callable[[], optax.Updates],
    ) -> list[jax.Array]:
        """Per layer, the rule's step ``Σ_p (−λ_l μ_{p,l} / rms(d_{p,l})) · d_{p,l}`` in float32:
        scalars times element-wise directions, which XLA fuses into one kernel per layer."""
        coefficients = (
            -controls.learning_rates[:, None]
            * controls.mixing_coefficients
            * state.inverse_rms
            * self.momentum_correction(state.count)
            # A gradient larger than at the refresh shrinks a normalized direction's step by the
            # ratio, so a stale normalizer cannot turn a gradient spike into a step larger than
            # λ (a scale-free direction has no normalizer to go stale).
            * jnp.where(
                self.normalized_directions,
                jnp.minimum(1.0, state.refresh_gradient_norms / grad_norms)[:, None],
                1.0,
            )
        )
        return [
            sum(coefficients[i, p] * d for p, d in enumerate(directions))
            for i, directions in enumerate(self.base_directions(grads, state.mu, nu_hat()))
        ]

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
        fast iterate and its average is what lets schedule-free AdamW run a much larger step
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

    # ----------------------------------------------------------------------------------------
    # The controller.

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

    def controls_in_effect(self, state: L3RSState, num_steps: int) -> Controls:
        """The controls of the step that produced ``state`` (also for analysis and plots): the
        last refresh's MLP output under this step's step-size prior."""
        prior = self.step_size_prior(state.count, num_steps)
        return state.controls._replace(learning_rates=state.controls.learning_rates * prior)

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

    # ----------------------------------------------------------------------------------------
    # The base directions.

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

