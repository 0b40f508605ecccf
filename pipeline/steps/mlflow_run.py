"""The pipeline run's MLflow run: how it ends FINISHED, FAILED or KILLED, never RUNNING.

The first step opens it; the register step closes it FINISHED with the run's summary; a step
that fails closes it FAILED with its error (:func:`records_failure`); the pipeline's exit task
(:func:`finish_pipeline_run`) closes a run that a step died in without a word.
"""

from __future__ import annotations

import functools
import json
import re
import sys
from typing import Any, Callable, TypeVar

from lopt.store import registry

from pipeline.steps.context import StepContext

EXPERIMENT = "lopt"

# A pipeline run's MLflow run ends FINISHED (the register step) or FAILED with these tags
# (the step that failed, or the pipeline's exit task when a step died without a word).
ERROR_TAG = "lopt.error"
FAILED_STEP_TAG = "lopt.failed_step"
# The register step's summary, an artifact of the run; the exit task returns it.
SUMMARY = "summary.json"
_MAX_ERROR_CHARS = 4000  # MLflow keeps 8000 characters of a tag (5000 before 2.x)

Step = TypeVar("Step", bound=Callable[..., Any])


def record_failure(run_id: str, step: str, error: BaseException | str, tracking_uri: str | None = None) -> None:
    """Ends the pipeline's MLflow run ``run_id`` FAILED (KILLED for an interrupt), tagged with
    the step that failed (``lopt.failed_step``) and its error (``lopt.error``, one line,
    passwords in URLs redacted). Never raises: a store that cannot be reached must not hide
    the step's own error; it is reported on stderr instead."""
    message = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    message = re.sub(r"(//[^/\s:@]+):[^@\s/]+@", r"\1:***@", " ".join(message.split()))
    status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
    try:
        registry.set_run_tags(run_id, {FAILED_STEP_TAG: step, ERROR_TAG: message[:_MAX_ERROR_CHARS]}, tracking_uri)
        registry.end_run(run_id, status, tracking_uri)
    except Exception as err:  # noqa: BLE001 - the step's error is the one to raise
        print(f"lopt: could not mark MLflow run {run_id} {status}: {type(err).__name__}: {err}", file=sys.stderr)


def records_failure(step: str) -> Callable[[Step], Step]:
    """Makes a step that logs to the pipeline's MLflow run (its context's ``run_id``) end that
    run FAILED with the error before re-raising it, so no failed step leaves it RUNNING."""

    def decorate(function: Step) -> Step:
        @functools.wraps(function)
        def wrapper(*, ctx: StepContext, **kwargs: Any) -> Any:
            try:
                return function(ctx=ctx, **kwargs)
            except BaseException as err:
                if ctx.run_id:
                    record_failure(ctx.run_id, step, err, ctx.tracking_uri)
                raise

        return wrapper  # type: ignore[return-value]

    return decorate


def close_run(run_id: str, summary: dict[str, Any], tracking_uri: str | None) -> dict[str, Any]:
    """Stores the pipeline's outcome on its MLflow run (``summary.json``, what the exit task
    returns as the pipeline's output) and ends the run FINISHED."""
    registry.log_text(run_id, json.dumps(summary, indent=1, default=str), SUMMARY, tracking_uri)
    registry.end_run(run_id, "FINISHED", tracking_uri)
    return summary


class PipelineRunFailed(RuntimeError):
    """The pipeline run did not get to register: the message says which step and why."""


def finish_pipeline_run(*, pipeline_run: str, tracking_uri: str = "") -> dict[str, Any]:
    """The pipeline's exit task (``dsl.ExitHandler``): runs after every other step, whether
    they succeeded or not, and makes sure the run's MLflow run does not stay RUNNING.

    Finds the MLflow run the first step opened for ``pipeline_run`` (its ``pipeline_run``
    tag). Finished (the register step closed it): returns its summary. Still RUNNING: a step
    died without reporting (killed, out of memory, timed out, the pipeline terminated), so it
    ends the run FAILED saying so. Then, for a failed run, raises :class:`PipelineRunFailed`
    with the failing step and its error (from the run's tags), which also fails the pipeline
    on KFP backends where a succeeding exit task would otherwise report it succeeded. Needs no
    ``PipelineTaskFinalStatus``, which not every KFP backend supports.
    """
    uri = tracking_uri or None
    runs = registry.find_runs(EXPERIMENT, {"pipeline_run": pipeline_run}, uri)
    if not runs:
        raise PipelineRunFailed(
            f"Pipeline run {pipeline_run} ended before its first step opened its MLflow run: "
            "see the prepare-base-model step's log."
        )
    run = runs[0]
    status, tags = run.status, dict(run.tags)
    if status == "FINISHED":
        text = registry.read_text(run.run_id, SUMMARY, uri)
        if text is None:
            raise PipelineRunFailed(f"MLflow run {run.run_id} of pipeline run {pipeline_run} finished without {SUMMARY}.")
        return json.loads(text)
    if status == "RUNNING":
        step = tags.get(FAILED_STEP_TAG, "unknown")
        error = (
            "the pipeline ended before its register step closed this run: a step stopped "
            "without reporting an error (killed, out of memory, timed out, or the pipeline was "
            "terminated); see the pipeline run's logs"
        )
        record_failure(run.run_id, step, error, uri)
        status, tags = "FAILED", {**tags, FAILED_STEP_TAG: step, ERROR_TAG: error}
    raise PipelineRunFailed(
        f"MLflow run {run.run_id} of pipeline run {pipeline_run} is {status}: step "
        f"{tags.get(FAILED_STEP_TAG, 'unknown')} failed: {tags.get(ERROR_TAG, 'no error recorded')}"
    )
