"""The pipeline: load pretrained → meta-train (fanned out over variants) → select → validate →
register.

One graph serves both targets. :func:`build_pipeline` without a :class:`ClusterTarget` gives
the lightweight pipeline ``lopt run`` executes with kfp.local in the current venv; with one,
every step runs in the project's image, gets the MLflow credentials from a Kubernetes Secret
(never from the pipeline spec) and the tracking URI from a ConfigMap, and asks for the CPU and
memory it needs.

The whole graph sits in a ``dsl.ExitHandler`` whose exit task, ``finish-run``, runs last
whatever happened: the register step closes the pipeline's MLflow run FINISHED and a failing
step closes it FAILED with its error (:func:`pipeline.steps.record_failure`); the exit task ends
a run still RUNNING (a step killed without a word) FAILED, fails itself for a failed run, and
is the pipeline's output (a pipeline output cannot come from inside the handler): the
register step's summary, read back from the MLflow run.

Every step reads or writes registry state (the base model may be pretrained and registered by
the first step, aliases move in the last), so KFP caching is off for all of them: a cached
step would replay a stale registry decision.
"""

import dataclasses
from typing import Callable, Optional

from kfp import dsl, kubernetes

from components import finish_run, meta_train, prepare_base_model, register, select_best, validate

PIPELINE_NAME = "lopt-l3rs"
# Names the manifests create (manifests/README.md): the Secret with the MLflow credentials
# and the ConfigMap with the tracking URI, both in the namespace pipelines run in.
MLFLOW_SECRET = "mlflow-credentials"
MLFLOW_SECRET_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
CONFIG_MAP = "lopt-config"
CONFIG_MAP_KEYS = ("MLFLOW_TRACKING_URI",)
# The label of every step's pod: the MLflow server accepts connections only from pods that
# carry it (manifests/base/networkpolicies.yaml).
POD_LABELS = {"lopt-mlflow-client": "true"}


@dataclasses.dataclass(frozen=True)
class Resources:
    cpu_request: str
    cpu_limit: str
    memory_request: str
    memory_limit: str


# Meta-training and validation are the heavy steps; ES pairs use every core they get.
STEP_RESOURCES = {
    "prepare-base-model": Resources("1", "2", "2Gi", "4Gi"),
    "meta-train": Resources("2", "4", "4Gi", "8Gi"),
    "select-best": Resources("1", "2", "2Gi", "4Gi"),
    "validate": Resources("2", "4", "4Gi", "8Gi"),
    "register": Resources("500m", "1", "1Gi", "2Gi"),
    "finish-run": Resources("250m", "1", "512Mi", "1Gi"),
}


@dataclasses.dataclass(frozen=True)
class ClusterTarget:
    """How the steps run on a Kubeflow Pipelines cluster."""

    image: str
    mlflow_secret: str = MLFLOW_SECRET
    config_map: str = CONFIG_MAP

    def __post_init__(self) -> None:
        name = self.image.rsplit("/", 1)[-1]
        if ":" not in name and "@" not in name or name.endswith(":latest"):
            raise ValueError(
                f"Cluster image {self.image!r} is not pinned: give a tag or digest, e.g. "
                "registry.example.com/lopt:0.1.0 (see manifests/README.md), not :latest."
            )

    def apply(self, task: dsl.PipelineTask, step: str) -> None:
        task.set_container_image(self.image)
        res = STEP_RESOURCES[step]
        task.set_cpu_request(res.cpu_request).set_cpu_limit(res.cpu_limit)
        task.set_memory_request(res.memory_request).set_memory_limit(res.memory_limit)
        kubernetes.use_secret_as_env(
            task, secret_name=self.mlflow_secret, secret_key_to_env={k: k for k in MLFLOW_SECRET_KEYS}
        )
        # An explicit tracking_uri parameter wins over this (lopt.store.registry.resolve_tracking_uri).
        kubernetes.use_config_map_as_env(
            task, config_map_name=self.config_map, config_map_key_to_env={k: k for k in CONFIG_MAP_KEYS}
        )
        for key, value in POD_LABELS.items():
            kubernetes.add_pod_label(task, key, value)


def build_pipeline(cluster: Optional["ClusterTarget"] = None) -> Callable:
    # (No `from __future__ import annotations` here: kfp reads the pipeline's annotations.)
    """The L3RS pipeline, for kfp.local (``cluster=None``) or for a cluster."""

    def configure(task: dsl.PipelineTask, step: str) -> dsl.PipelineTask:
        task.set_caching_options(False)
        if cluster is not None:
            cluster.apply(task, step)
        return task

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description=(
            "Meta-train an L3RS learned optimizer specialized to a registered pretrained model, "
            "validate it against tuned baselines on held-out tasks, and register it in MLflow as "
            "l3rs-<base-model> (champion only when it passes the gate)."
        ),
    )
    def l3rs_pipeline(
        base_model: str = "cnn-mnist",
        budget: str = "default",
        overrides: str = "",
        tracking_uri: str = "",
        data_dir: str = "",
        if_stale: bool = False,
        variants: list = ["{}"],
    ) -> str:
        """``variants``: meta_train overrides (JSON strings), one meta-training run each; the
        best on meta-validation goes on ("{}" alone: one run with the config as given)."""
        common = dict(budget=budget, overrides=overrides, tracking_uri=tracking_uri, data_dir=data_dir)
        # Runs after everything else, on success or failure; its output is the pipeline's.
        finish = configure(finish_run(
            pipeline_run=dsl.PIPELINE_JOB_NAME_PLACEHOLDER, tracking_uri=tracking_uri,
        ), "finish-run")
        with dsl.ExitHandler(finish, name="l3rs-steps"):
            base = configure(prepare_base_model(
                base_model=base_model, pipeline_run=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
                if_stale=if_stale, **common,
            ), "prepare-base-model")
            ids = dict(base_model_uri=base.outputs["base_model_uri"], run_id=base.outputs["run_id"])
            # Skipping is data flow, not dsl.If: the later steps see a "skipped" optimizer and
            # pass the champion through, which runs the same on kfp.local and on a cluster.
            # Inside the loop the first step's results arrive as one artifact, not as
            # parameters: kfp.local 2.17 replaces every task-output *parameter* of a loop
            # iteration with the loop item (kfp/local/orchestrator/task_spec_utils.py),
            # artifacts pass intact. Locally the variants take turns: each already spreads its
            # ES pairs over every core.
            parallelism = None if cluster is not None else 1
            with dsl.ParallelFor(items=variants, name="meta-train-variants", parallelism=parallelism) as variant:
                trained = configure(meta_train(
                    context=base.outputs["context"], variant=variant, **common,
                ), "meta-train")
            selected = configure(select_best(
                candidates=dsl.Collected(trained.outputs["optimizer"]), **ids, **common,
            ), "select-best")
            validated = configure(validate(
                optimizer=selected.outputs["optimizer"], **ids, **common,
            ), "validate")
            configure(register(
                pipeline_run=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
                optimizer=selected.outputs["optimizer"],
                report=validated.outputs["report"],
                **ids, **common,
            ), "register")
        return finish.output

    return l3rs_pipeline


l3rs_pipeline = build_pipeline()
"""The pipeline as ``lopt run`` executes it locally."""
