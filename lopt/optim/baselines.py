"""Hand-designed baselines, each a learning-rate-parametrized optimizer factory with a grid.

One implementation serves validation (the promotion gate) and the quality benchmark, so a
baseline is tuned the same way wherever it is compared: every point of its log-spaced
learning-rate grid runs with the same seeds and budget as the learned optimizer, the point
with the lowest mean *validation* loss is kept (see :func:`lopt.eval.evaluation.tune`). When that
point is an edge of the grid, validation extends the grid past it at the same spacing, never
beyond the baseline's ``bounds`` (:func:`lopt.eval.evaluation.search_grid`).

The learning rate is a traced argument of the factory, so a whole grid reuses one
compilation. Schedule-free AdamW evaluates at its averaged iterate, as its authors intend.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import optax
from optax import contrib

from lopt.inner.training import EvalParamsFn, OptimizerFactory


@dataclasses.dataclass(frozen=True)
class Baseline:
    """A baseline optimizer family indexed by its (peak) learning rate."""

    name: str
    make_optimizer: OptimizerFactory
    learning_rates: tuple[float, ...]
    eval_params: EvalParamsFn | None = None
    # The widest range a tuning grid may grow to when its best point is at an edge
    # (lopt.eval.evaluation.search_grid): beyond it the family's learning rate is not sane.
    bounds: tuple[float, float] = (1e-6, 1.0)

    def grid(self, size: int | None = None) -> tuple[float, ...]:
        """``size`` log-spaced points over the baseline's own range (its default grid when
        ``size`` is None or equal), so every baseline gets the same grid density."""
        if size is None or size == len(self.learning_rates):
            return self.learning_rates
        if size < 1:
            raise ValueError(f"A learning-rate grid needs at least one point, got {size}.")
        low, high = self.learning_rates[0], self.learning_rates[-1]
        return log_grid(low, high, size) if size > 1 else (float(f"{(low * high) ** 0.5:.3g}"),)


def log_grid(low: float, high: float, num: int) -> tuple[float, ...]:
    """``num`` log-spaced values from ``low`` to ``high``, rounded to 3 significant digits."""
    return tuple(float(f"{x:.3g}") for x in np.geomspace(low, high, num))


# Each accepts (and ignores) ``value=`` and other extra args, as optax's own transformations do:
# the inner-training loop passes the loss to every optimizer, as L3RS needs it.


def adam(learning_rate: jax.Array, num_steps: int) -> optax.GradientTransformationExtraArgs:
    del num_steps
    return optax.with_extra_args_support(optax.adam(learning_rate))


def adam_cosine(learning_rate: jax.Array, num_steps: int) -> optax.GradientTransformationExtraArgs:
    return optax.with_extra_args_support(optax.adam(optax.cosine_decay_schedule(learning_rate, num_steps)))


def sgd_momentum(learning_rate: jax.Array, num_steps: int) -> optax.GradientTransformationExtraArgs:
    del num_steps
    return optax.with_extra_args_support(optax.sgd(learning_rate, momentum=0.9))


def schedule_free_adamw(learning_rate: jax.Array, num_steps: int) -> optax.GradientTransformationExtraArgs:
    return optax.with_extra_args_support(
        contrib.schedule_free_adamw(learning_rate, warmup_steps=max(1, num_steps // 20))
    )


def prodigy(learning_rate: jax.Array, num_steps: int) -> optax.GradientTransformationExtraArgs:
    del num_steps
    return optax.with_extra_args_support(contrib.prodigy(learning_rate))


BASELINES: dict[str, Baseline] = {
    b.name: b
    for b in (
        Baseline("adam", adam, log_grid(1e-4, 3e-2, 10)),
        Baseline("adam_cosine", adam_cosine, log_grid(1e-4, 3e-2, 10)),
        Baseline("sgd_momentum", sgd_momentum, log_grid(1e-3, 1.0, 10), bounds=(1e-5, 10.0)),
        Baseline(
            "schedule_free_adamw", schedule_free_adamw, log_grid(1e-4, 3e-2, 10),
            eval_params=contrib.schedule_free_eval_params,
        ),
        # Prodigy estimates its own step size; the grid scales it around 1.
        Baseline("prodigy", prodigy, log_grid(0.03, 3.0, 10), bounds=(1e-3, 100.0)),
    )
}


def get_baseline(name: str) -> Baseline:
    if name not in BASELINES:
        raise ValueError(f"Unknown baseline {name!r}; choose from {sorted(BASELINES)}.")
    return BASELINES[name]
