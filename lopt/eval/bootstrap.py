"""Paired bootstrap confidence intervals for the gate's figures (numpy only).

The gate decides on small differences (a loss ratio of 0.98 or 1.02, a median speedup of
0.9 or 1.1) measured on a few seeds and a test split of a few hundred images: without an
interval a reader cannot tell a decision from a coin toss. The learned optimizer and the
baselines run on the *same* seeds (fresh head, minibatch order) and are measured on the
*same* test examples, so their numbers are resampled together, with the same indices — a
paired bootstrap, whose interval reflects the noise of the comparison, not of each number
alone.

A :class:`Paired` sample holds the arrays of one experimental unit group (e.g. one row of
the suite: the learned optimizer's and every baseline's per-seed losses). Its leading
``axes`` axes are resampled: axis 0 is the seeds, axis 1 (when ``axes == 2``) the test
examples, resampled independently of the seeds (a crossed design: every seed is measured on
every example). Several samples passed together are resampled independently of each other
(strata: the rows of the suite are different tasks and horizons, and stay in the resample).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Paired:
    """Arrays measured on the same units, resampled with the same indices along their
    leading ``axes`` axes (1: seeds; 2: seeds × test examples)."""

    arrays: tuple[np.ndarray, ...]
    axes: int = 1

    def __post_init__(self) -> None:
        if not self.arrays:
            raise ValueError("A paired sample needs at least one array.")
        if self.axes not in (1, 2):
            raise ValueError(f"Paired samples resample 1 or 2 leading axes, not {self.axes}.")
        shapes = {np.shape(a)[: self.axes] for a in self.arrays}
        if len(shapes) != 1 or len(next(iter(shapes))) != self.axes:
            raise ValueError(f"Paired arrays must share their leading {self.axes} axes, got {shapes}.")

    @property
    def units(self) -> tuple[int, ...]:
        return tuple(np.shape(self.arrays[0])[: self.axes])

    def resample(self, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        """One bootstrap draw: every array indexed by the same draws along each leading axis."""
        arrays = tuple(np.asarray(a) for a in self.arrays)
        for axis, size in enumerate(self.units):
            index = rng.integers(0, size, size)
            arrays = tuple(np.take(a, index, axis=axis) for a in arrays)
        return arrays


@dataclasses.dataclass(frozen=True)
class Interval:
    """A two-sided percentile interval at confidence ``level``."""

    low: float
    high: float
    level: float

    def contains(self, value: float) -> bool:
        """Whether ``value`` (a gate's threshold) lies within the interval: a decision on
        that threshold could go either way on another draw of seeds and test examples."""
        return bool(self.low <= value <= self.high)

    def width(self) -> float:
        return self.high - self.low

    def __str__(self) -> str:
        return f"[{_fmt(self.low)}, {_fmt(self.high)}]"


def _fmt(value: float) -> str:
    return f"{value:.3f}" if np.isfinite(value) else ("inf" if value > 0 else "-inf" if value < 0 else "nan")


Statistic = Callable[..., float]
"""``statistic(*draws)``: one float from one resampled tuple of arrays per :class:`Paired`."""


def bootstrap_distribution(
    statistic: Statistic,
    samples: Sequence[Paired],
    num_resamples: int = 1000,
    seed: int = 0,
) -> np.ndarray:
    """``statistic`` on ``num_resamples`` bootstrap draws of ``samples`` (each resampled
    independently); deterministic for a ``seed``. NaN (e.g. inf / inf) counts as ``inf``:
    a draw where the comparison is undefined is treated as the worst case, never dropped."""
    if not samples:
        raise ValueError("bootstrap_distribution needs at least one sample.")
    if num_resamples < 1:
        raise ValueError(f"num_resamples must be positive, got {num_resamples}.")
    rng = np.random.default_rng(seed)
    values = np.array(
        [statistic(*(s.resample(rng) for s in samples)) for _ in range(num_resamples)], float
    )
    return np.where(np.isnan(values), np.inf, values)


def bootstrap_interval(
    statistic: Statistic,
    *samples: Paired,
    num_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.9,
) -> Interval:
    """The percentile bootstrap interval of ``statistic`` over paired ``samples``.

    Percentiles use the inverted empirical CDF (no interpolation), so a distribution with
    ``inf`` draws (a target never reached, a diverged run) gives ``inf`` bounds, not NaN.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}.")
    values = bootstrap_distribution(statistic, samples, num_resamples, seed)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(values, [tail, 1.0 - tail], method="inverted_cdf")
    return Interval(float(low), float(high), level)
