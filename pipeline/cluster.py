"""Runs on a Kubeflow Pipelines cluster: compile for it, submit a run, schedule recurring runs.

Everything here talks to the KFP API through ``kfp.Client``; nothing needs kubectl. The
compiled package carries no credentials: the steps read them from the Kubernetes Secret the
manifests create (:data:`pipeline.pipeline.MLFLOW_SECRET`), and the tracking URI from the
ConfigMap unless a run passes ``tracking_uri`` explicitly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

from pipeline.pipeline import ClusterTarget, build_pipeline

DEFAULT_EXPERIMENT = "lopt"
# robfig/cron, which KFP's scheduler uses, accepts these shorthands besides 6 fields.
CRON_DESCRIPTORS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
CRON_FIELDS = (
    "second (0-59) minute (0-59) hour (0-23) day-of-month (1-31) month (1-12 or JAN-DEC) "
    "day-of-week (0-6 or SUN-SAT)"
)


def compile_package(target: ClusterTarget | None, path: str | Path) -> Path:
    """Compiles the pipeline to a KFP YAML package: for a cluster (steps in
    ``target.image``), or with ``None`` the lightweight one kfp.local runs."""
    from kfp import compiler

    path = Path(path)
    compiler.Compiler().compile(build_pipeline(target), package_path=str(path))
    return path


def check_cron(expression: str, count: int = 3, now: dt.datetime | None = None) -> list[dt.datetime]:
    """Validates a KFP cron expression (6 fields, seconds first) and returns its next
    ``count`` firing times after ``now`` (UTC), or raises ValueError saying what is wrong."""
    from croniter import CroniterError, croniter

    text = " ".join(expression.split())
    fields = text.split(" ") if text else []
    example = "e.g. '0 0 3 * * *' runs daily at 03:00:00"
    if text not in CRON_DESCRIPTORS:
        if len(fields) == 5:
            raise ValueError(
                f"Cron {expression!r} has 5 fields, but Kubeflow Pipelines' cron has 6 with "
                f"seconds first: {CRON_FIELDS}. Did you mean '0 {text}'?"
            )
        if len(fields) != 6:
            raise ValueError(
                f"Cron {expression!r} has {len(fields)} fields; Kubeflow Pipelines' cron has 6 "
                f"with seconds first: {CRON_FIELDS}; {example}, or one of {', '.join(CRON_DESCRIPTORS)}."
            )
    start = now or dt.datetime.now(dt.timezone.utc)
    try:
        times = croniter(text, start, second_at_beginning=True)
        return [times.get_next(dt.datetime) for _ in range(count)]
    except (CroniterError, ValueError, KeyError) as err:
        raise ValueError(f"Cron {expression!r} is not valid ({err}). Fields: {CRON_FIELDS}; {example}.") from None


@dataclasses.dataclass(frozen=True)
class Submission:
    """What ``lopt submit`` / ``lopt schedule`` sends: the package and the run parameters."""

    package: Path
    arguments: Mapping[str, Any]
    experiment: str = DEFAULT_EXPERIMENT
    namespace: str | None = None


class ClusterError(ConnectionError):
    """The KFP API could not be reached or refused the request; the message says what to check."""


@contextlib.contextmanager
def _api(host: str) -> Iterator[None]:
    from kfp_server_api.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        yield
    except ApiException as err:
        raise ClusterError(
            f"The Kubeflow Pipelines API at {host} refused the request: HTTP {err.status} "
            f"{err.reason}: {(err.body or '').strip()[:500]}"
        ) from None
    except (HTTPError, OSError) as err:
        raise ClusterError(
            f"Cannot reach the Kubeflow Pipelines API at {host} ({err}). Check the URL; for a "
            "standalone install, `kubectl port-forward -n kubeflow svc/ml-pipeline-ui 8080:80` "
            "and use --host http://localhost:8080."
        ) from None


def _client(host: str, namespace: str | None):
    import kfp

    return kfp.Client(host=host, namespace=namespace or "kubeflow")


def submit(host: str, submission: Submission, run_name: str) -> dict[str, str]:
    """Creates one run from the package; returns its id and the experiment's."""
    with _api(host):
        client = _client(host, submission.namespace)
        result = client.create_run_from_pipeline_package(
            str(submission.package),
            arguments=dict(submission.arguments),
            run_name=run_name,
            experiment_name=submission.experiment,
            namespace=submission.namespace,
            # Every step reads registry state (pipeline.pipeline): never replay a cached one.
            enable_caching=False,
        )
    return {"run_id": result.run_id, "run_name": run_name, "experiment": submission.experiment}


def schedule(host: str, submission: Submission, name: str, cron: str) -> dict[str, Any]:
    """Creates a recurring run: the cron (checked first), no catch-up of missed runs after a
    pause, and at most one run at a time, since two runs of one schedule would race on the
    registry's aliases for nothing."""
    next_times = check_cron(cron)
    with _api(host):
        client = _client(host, submission.namespace)
        experiment = client.create_experiment(submission.experiment, namespace=submission.namespace)
        recurring = client.create_recurring_run(
            experiment_id=experiment.experiment_id,
            job_name=name,
            description="Retrains the L3RS optimizer when stale (lopt schedule).",
            cron_expression=" ".join(cron.split()),
            max_concurrency=1,
            no_catchup=True,
            params=dict(submission.arguments),
            pipeline_package_path=str(submission.package),
            enable_caching=False,
        )
    return {
        "recurring_run_id": recurring.recurring_run_id,
        "name": name,
        "experiment_id": experiment.experiment_id,
        "cron": cron,
        "next_runs": [t.isoformat() for t in next_times],
    }


def package_for(image: str | None, package: str | None, workdir: str | None = None) -> Path:
    """The package to send: ``package`` as given, or the pipeline compiled for ``image``."""
    if package:
        path = Path(package)
        if not path.is_file():
            raise ValueError(f"Pipeline package {package!r} does not exist; compile one with `lopt compile --image IMAGE -o FILE`.")
        return path
    if not image:
        raise ValueError(
            "Say which image the steps run in: --image REGISTRY/lopt:TAG (build it from "
            "manifests/image/Dockerfile), or --package FILE compiled with `lopt compile --image`."
        )
    out = Path(workdir or tempfile.mkdtemp(prefix="lopt-")) / "lopt-pipeline.yaml"
    return compile_package(ClusterTarget(image), out)


def arguments(
    base_model: str, budget: str, overrides: str, tracking_uri: str | None, if_stale: bool, variants: list[str]
) -> dict[str, Any]:
    """The pipeline's parameters for a cluster run (the data dir is the image's default)."""
    args: dict[str, Any] = {
        "base_model": base_model, "budget": budget, "overrides": overrides,
        "if_stale": if_stale, "variants": variants,
    }
    if tracking_uri:
        args["tracking_uri"] = tracking_uri
    return args
