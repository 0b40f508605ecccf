"""Kubeflow Pipelines components of the lopt pipeline, one module per step.

Components are thin: each builds the step's :class:`pipeline.steps.StepContext` from its KFP
parameters and artifacts and calls the matching function in :mod:`pipeline.steps`, imported
inside the function body, so compiling the pipeline never imports JAX, and the step logic
stays testable without kfp.
"""

from components.base_model import prepare_base_model
from components.finish import finish_run
from components.meta_training import meta_train
from components.registration import register
from components.selection import select_best
from components.validation import validate

__all__ = ["finish_run", "meta_train", "prepare_base_model", "register", "select_best", "validate"]
