"""What every step of a pipeline run is given, gathered once per step."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

from lopt.config import RunConfig, get_config
from lopt.hub import load_pretrained
from lopt.inner.models import ModelSpec, Params


class BaseModel(NamedTuple):
    """The registered pretrained model the run specializes an optimizer to."""

    params: Params
    spec: ModelSpec
    info: dict[str, Any]  # what lopt.hub.load_pretrained reports: name, version, input shape


@dataclasses.dataclass(frozen=True)
class StepContext:
    """The run's inputs as one value, so a step cannot receive them swapped.

    Build it with :meth:`create`, which parses the config (a bad budget or override fails
    there, before any work). The first step knows neither the base model's pinned URI nor the
    MLflow run; later steps get both (:meth:`for_run`). The base model is loaded on first use
    and then kept: steps that never need it (a single or skipped candidate) never touch the
    registry for it.
    """

    config: RunConfig
    budget: str
    overrides: str
    tracking_uri: str | None = None  # None: lopt.store.registry's default store
    data_dir: str | None = None  # None: lopt.data's default directory
    base_model_uri: str = ""  # models:/name/version, pinned by the first step
    run_id: str = ""  # the pipeline run's MLflow run, opened by the first step

    @classmethod
    def create(
        cls,
        *,
        budget: str = "default",
        overrides: str = "",
        tracking_uri: str = "",
        data_dir: str = "",
        base_model_uri: str = "",
        run_id: str = "",
    ) -> StepContext:
        """The context from the pipeline's string parameters ("" meaning the default)."""
        return cls(
            config=get_config(budget, overrides),
            budget=budget,
            overrides=overrides,
            tracking_uri=tracking_uri or None,
            data_dir=data_dir or None,
            base_model_uri=base_model_uri,
            run_id=run_id,
        )

    def for_run(self, *, base_model_uri: str, run_id: str) -> StepContext:
        """This context for the steps after the first: its base model and MLflow run."""
        return dataclasses.replace(self, base_model_uri=base_model_uri, run_id=run_id)

    def with_base_model(self, uri: str) -> StepContext:
        """This context with the base model at ``uri``: itself when it names that model already,
        so a model loaded once stays loaded."""
        return self if uri == self.base_model_uri else dataclasses.replace(self, base_model_uri=uri)

    @functools.cached_property
    def base_model(self) -> BaseModel:
        """The pretrained model at ``base_model_uri``, read from the registry once."""
        if not self.base_model_uri:
            raise ValueError("This step's context names no base model (base_model_uri is empty).")
        _, params, info = load_pretrained(self.base_model_uri, tracking_uri=self.tracking_uri)
        return BaseModel(params, info["spec"], info)
