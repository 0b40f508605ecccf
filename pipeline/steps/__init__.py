"""The pipeline's steps as plain functions: what each Kubeflow component calls.

Components (``components/``) only translate between KFP artifacts/parameters and these
functions, so every step can be run and tested without kfp. Each step takes one
:class:`StepContext`, keyword-only: the run's config (parsed once), tracking URI, data
directory, and, after the first step, the base model (loaded once) and the MLflow run. Steps
exchange small JSON-able values and directories; the MLflow run of a pipeline run is created
by the first step and carries everything later steps log (config, meta-training curve,
validation numbers, the registered optimizer's files), so one run in the MLflow UI tells the
whole story.

One module per step, in pipeline order: :mod:`~pipeline.steps.prepare` (with the retrain
decision of :mod:`~pipeline.steps.staleness`), :mod:`~pipeline.steps.meta_train`,
:mod:`~pipeline.steps.select`, :mod:`~pipeline.steps.validate` (its report:
:mod:`~pipeline.steps.report`), :mod:`~pipeline.steps.register`; the run's MLflow run opens,
fails and finishes in :mod:`~pipeline.steps.mlflow_run`.
"""

from pipeline.steps.context import BaseModel, StepContext
from pipeline.steps.in_process import run_all
from pipeline.steps.meta_train import SKIPPED, meta_train_optimizer
from pipeline.steps.mlflow_run import (
    ERROR_TAG,
    EXPERIMENT,
    FAILED_STEP_TAG,
    SUMMARY,
    PipelineRunFailed,
    finish_pipeline_run,
    record_failure,
)
from pipeline.steps.prepare import check_inputs, prepare_base_model
from pipeline.steps.register import register_validated_optimizer
from pipeline.steps.select import SELECTION, select_optimizer
from pipeline.steps.staleness import data_lineage, retrain_decision
from pipeline.steps.validate import validate_optimizer

__all__ = [
    "ERROR_TAG",
    "EXPERIMENT",
    "FAILED_STEP_TAG",
    "SELECTION",
    "SKIPPED",
    "SUMMARY",
    "BaseModel",
    "PipelineRunFailed",
    "StepContext",
    "check_inputs",
    "data_lineage",
    "finish_pipeline_run",
    "meta_train_optimizer",
    "prepare_base_model",
    "record_failure",
    "register_validated_optimizer",
    "retrain_decision",
    "run_all",
    "select_optimizer",
    "validate_optimizer",
]
