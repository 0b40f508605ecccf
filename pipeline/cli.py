"""The ``lopt`` command line: run the pipeline locally, compile it, submit and schedule it on a
cluster, check staleness, fetch the optimizer and fine-tune with it.

``lopt run`` executes the Kubeflow pipeline with ``kfp.local.SubprocessRunner(use_venv=False)``
against the embedded MLflow store under ``$LOPT_HOME`` (or ``$MLFLOW_TRACKING_URI``): the
same components a cluster runs, in subprocesses of this interpreter, offline.

Exit codes (:data:`EXIT_CODES`): 0 success; 1 "no": ``retrain-check`` found retraining due,
or a step of ``lopt run`` failed (its MLflow run is marked FAILED with the error); 2 bad input,
or the MLflow tracking server unreachable or refusing (one line that says what to do; a
password in the tracking URI is never printed); 3 the Kubeflow Pipelines API was unreachable
or refused (submit, schedule); 4 an unexpected error (the traceback is printed). A crash is
never 1, so ``lopt retrain-check; [ $? -eq 1 ] && lopt run`` retrains only when retraining is
due.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Sequence

EXIT_OK, EXIT_NO, EXIT_BAD_INPUT, EXIT_CLUSTER, EXIT_UNEXPECTED = 0, 1, 2, 3, 4
EXIT_CODES = {
    EXIT_OK: "success (retrain-check: the champion optimizer is up to date)",
    EXIT_NO: "retrain-check: retraining is due; run: a pipeline step failed (its MLflow run is FAILED)",
    EXIT_BAD_INPUT: "bad input: the message says what was wrong and what to do",
    EXIT_CLUSTER: "the Kubeflow Pipelines API was unreachable or refused the request",
    EXIT_UNEXPECTED: "an unexpected error (a bug or the environment): the traceback is printed",
}


def _tracking_uri(args: argparse.Namespace) -> str:
    """The tracking URI a command uses, with its password moved out, and the store checked.

    A user name and password in an ``http(s)://`` URI go to ``MLFLOW_TRACKING_USERNAME`` /
    ``MLFLOW_TRACKING_PASSWORD`` (which MLflow, and the pipeline's steps, read), and the URI is
    used without them from here on: nothing this command prints, passes to a step or logs can
    carry the password (:func:`lopt.redaction.split_credentials`). A remote store gets one
    request now, so that a server that is down fails the command at once, in one line (exit 2),
    after MLflow's bounded retries (:data:`lopt.store.registry.HTTP_DEFAULTS`).
    """
    from lopt.store import registry

    uri, credentials = registry.split_credentials(registry.resolve_tracking_uri(args.tracking_uri))
    os.environ.update(credentials)
    if from_env := os.environ.get("MLFLOW_TRACKING_URI"):
        # Inherited by the steps: no password there either.
        os.environ["MLFLOW_TRACKING_URI"] = registry.split_credentials(from_env)[0]
    if not uri.startswith("sqlite:"):
        registry.ping(uri)
    return uri


def cmd_compile(args: argparse.Namespace) -> int:
    from pipeline.cluster import compile_package
    from pipeline.pipeline import ClusterTarget

    target = ClusterTarget(args.image) if args.image else None
    compile_package(target, args.output)
    where = f"for a cluster, steps in {args.image}" if target else "lightweight steps, for kfp.local"
    print(f"wrote {args.output} ({where})")
    return 0


def _variants(args: argparse.Namespace, budget: str, overrides: str) -> list[str]:
    """The meta-training variants a run fans out over (``["{}"]``: one run, no fan-out)."""
    from lopt.config import get_config, seed_variants, with_variant

    if args.variant and args.fan_out > 1:
        raise ValueError("Give either --fan-out K (K seeds) or --variant JSON (repeated), not both.")
    if args.variant:
        for variant in args.variant:
            get_config(budget, with_variant(overrides, variant))  # a clear error now, not in a step
        return list(args.variant)
    if args.fan_out > 1:
        return seed_variants(args.fan_out, get_config(budget, overrides).meta_train.seed)
    return ["{}"]


def cmd_run(args: argparse.Namespace) -> int:
    from lopt import paths

    home = paths.pin_home(args.home, create=True)
    tracking_uri = _tracking_uri(args)
    from lopt.host import use_all_cores, use_compilation_cache

    use_all_cores()
    # The steps are separate processes that compile many of the same programs, as does every
    # later run.
    use_compilation_cache(paths.jax_cache_dir())
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from kfp import local

    from lopt.store import registry
    from pipeline.pipeline import l3rs_pipeline
    from pipeline.steps import StepContext, check_inputs

    from lopt.config import with_suite

    overrides = with_suite(args.overrides, args.suite)
    # Bad budget, override or dataset name: a clear error now, not a failed step later.
    check_inputs(ctx=StepContext.create(budget=args.budget, overrides=overrides, data_dir=str(paths.data_dir())))
    variants = _variants(args, args.budget, overrides)
    parameter_uri = tracking_uri
    if registry.redact(tracking_uri) != tracking_uri:
        # A database URI with a password: the executor logs every parameter, so the steps get
        # the URI from the environment they inherit instead.
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
        parameter_uri = ""
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(paths.pipeline_root()),
    )
    start = time.perf_counter()
    started_ms = int(time.time() * 1000)
    try:
        task = l3rs_pipeline(
            base_model=args.base_model,
            budget=args.budget,
            overrides=overrides,
            tracking_uri=parameter_uri,
            data_dir=str(paths.data_dir()),
            if_stale=args.if_stale,
            variants=variants,
        )
    except RuntimeError as err:
        # kfp.local: "Pipeline 'lopt-l3rs' finished with status FAILURE. Inner task failed: …",
        # after the exit task closed the MLflow run; the step's traceback is in its log above.
        if "finished with status FAILURE" not in re.sub(r"\x1b\[[0-9;]*m", "", str(err)):  # colours off
            raise
        print(_failure(tracking_uri, started_ms), file=sys.stderr)
        return EXIT_NO
    summary = json.loads(task.output)
    print(_summary(summary, time.perf_counter() - start, home))
    return 0


def _failure(tracking_uri: str, started_ms: int) -> str:
    """What ``lopt run`` says when a step failed: the step and its error, from the MLflow run
    this run opened (its tags), and what to do."""
    from lopt.store import registry
    from pipeline.steps import ERROR_TAG, EXPERIMENT, FAILED_STEP_TAG

    # Oldest first: this command's run started before any that began while it ran.
    runs = registry.find_runs(EXPERIMENT, None, tracking_uri, started_after_ms=started_ms)[::-1]
    failed = [r for r in runs if r.status in ("FAILED", "KILLED")]
    if runs and not failed:
        return (
            f"lopt: error: the pipeline's last task (finish-run) failed after MLflow run "
            f"{runs[0].run_id} ended {runs[0].status}; its error is in its log above."
        )
    if not runs:
        return (
            "lopt: error: the pipeline failed before it opened its MLflow run; the first step's "
            "error is in its log above. Nothing was registered."
        )
    run = failed[0]
    return "\n".join([
        f"lopt: error: the pipeline failed in step {run.tags.get(FAILED_STEP_TAG, 'unknown')}: "
        f"{run.tags.get(ERROR_TAG, 'no error recorded')}",
        f"  MLflow run {run.run_id} is marked {run.status} (tags {FAILED_STEP_TAG}, {ERROR_TAG}); "
        "the step's log is above. Nothing was registered.",
        "  Fix the cause and run again: with the same config, meta-training resumes from its last checkpoint.",
    ])


def _summary(summary: dict, seconds: float, home: Path) -> str:
    aliases = ", ".join(summary["aliases"])
    head = [
        "",
        f"lopt run finished in {seconds / 60:.1f} min",
    ]
    if summary.get("skipped"):
        head += [
            f"meta-training skipped: {summary['reason']}",
            f"{summary['optimizer']} version {summary['version']} stays current (aliases: {aliases})",
        ]
    else:
        head += [
            f"registered {summary['optimizer']} version {summary['version']} (aliases: {aliases})",
            f"  for base model {summary['base_model']}; MLflow run {summary['mlflow_run_id']}",
            f"  promotion: {summary['promotion']['reason']}",
            "",
            "validation (test loss after fine-tuning; each baseline's learning rate tuned on the",
            "task's validation split; ratio = best baseline loss / L3RS loss, > 1: L3RS wins;",
            "steps-to-target = T / the step at which L3RS reaches the best baseline's final loss):",
            summary["table"],
        ]
    report = summary.get("html_report")
    return "\n".join(head + [
        "",
        f"fetch it: lopt.fetch_optimizer(\"{summary['uri']}\", num_steps=T)",
        f"          lopt fetch {summary['uri']} --out DIR",
        *([f"report:   {report}"] if report else []),
        f"browse:   {_browse(summary['tracking_uri'])}",
        f"outputs:  {home}",
    ])


def _browse(tracking_uri: str) -> str:
    """How to look at the store: a server's own UI, or `mlflow ui` over a local store."""
    from lopt.redaction import redact

    tracking_uri = redact(tracking_uri)
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri
    return f"mlflow ui --backend-store-uri {tracking_uri}"


def cmd_retrain_check(args: argparse.Namespace) -> int:
    from lopt import paths

    paths.pin_home(args.home, create=True)
    tracking_uri = _tracking_uri(args)
    from lopt.config import with_suite
    from pipeline.steps import StepContext, retrain_decision

    ctx = StepContext.create(
        budget=args.budget, overrides=with_suite(args.overrides, args.suite),
        tracking_uri=tracking_uri, data_dir=str(paths.data_dir()),
    )
    decision = retrain_decision(ctx=ctx, base_model=args.base_model)
    print(("retrain: " if decision["retrain"] else "up to date: ") + decision["reason"])
    if args.json:
        print(json.dumps(decision, indent=1))
    # Any error raised above exits 2 or more (main): never 1, which cron lines read as "due".
    return EXIT_NO if decision["retrain"] else EXIT_OK


def cmd_fetch(args: argparse.Namespace) -> int:
    """Read-only: creates no store or home (a missing one is an error saying where it looked),
    and writes only into ``--out``, once the version's files passed their checks."""
    from lopt import paths

    home = paths.pin_home(args.home, create=False)
    from lopt.store import registry
    from lopt.hub import fetch_files

    out = Path(args.out).resolve()
    if args.force and (out == Path.cwd().resolve() or out in Path.cwd().resolve().parents
                       or out == home or out in home.parents):
        raise ValueError(
            f"--force would empty {out}, which holds the working directory or LOPT_HOME ({home}); "
            f"fetch into a directory of its own."
        )
    tracking_uri = registry.resolve_tracking_uri(args.tracking_uri, create_home=False)
    version = registry.resolve(args.uri, tracking_uri)
    try:
        out = fetch_files(version.uri, out, tracking_uri, overwrite=args.force)
    except FileExistsError as err:
        print(f"lopt: error: {err}", file=sys.stderr)
        return 2
    checked = ("sha256 of every file checked against the version"
               if registry.FILES_TAG in version.tags
               else "registered before lopt recorded sha256s: format checked only")
    print(f"{version.uri} ({args.uri}) -> {out} ({checked})")
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        print(f"  {path.relative_to(out)}  {path.stat().st_size} bytes")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from lopt import paths

    paths.pin_home(args.home, create=True)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from lopt.store import registry
    from lopt.optim.baselines import get_baseline
    from lopt.finetune import finetune_loop, tuned_adam
    from lopt.hub import fetch_optimizer, load_pretrained
    from lopt.optim.l3rs import eval_params
    from lopt.inner.tasks import TaskSpec, load_task

    tracking_uri = _tracking_uri(args)
    optimizer_version = registry.resolve(args.optimizer, tracking_uri)
    base_uri = args.base_model or _base_model_of(optimizer_version)
    classes = tuple(int(c) for c in args.classes.split(",")) if args.classes else None
    _, _, info = load_pretrained(base_uri, tracking_uri=tracking_uri)
    task = load_task(TaskSpec(args.dataset, classes), info["input_shape"], paths.data_dir())
    model_fn, params, info = load_pretrained(
        base_uri, num_classes=task.num_classes, rng=args.seed, tracking_uri=tracking_uri
    )
    optimizer = fetch_optimizer(optimizer_version.uri, num_steps=args.steps, tracking_uri=tracking_uri)
    curves = [
        finetune_loop(model_fn, params, optimizer, task, args.steps, batch_size=args.batch_size,
                      seed=args.seed, name="l3rs", eval_params=eval_params)[1]
    ]
    if args.compare == "adam":
        grid = get_baseline("adam").grid(args.grid_size)
        curves.append(tuned_adam(model_fn, params, task, args.steps, grid,
                                 batch_size=args.batch_size, seed=args.seed))
    with registry.run_logger(
        "lopt-finetune", run_name=f"finetune-{task.name}", tracking_uri=tracking_uri,
        params={"dataset": task.name, "steps": args.steps, "optimizer": optimizer_version.uri,
                "base_model": info["uri"], "seed": args.seed, "batch_size": args.batch_size},
    ) as run:
        for curve in curves:
            for i, step in enumerate(curve.steps):
                run.log_metrics({f"{curve.name}/val_loss": curve.val_loss[i],
                                 f"{curve.name}/test_loss": curve.test_loss[i],
                                 f"{curve.name}/test_accuracy": curve.test_accuracy[i]}, step)
        run_id = run.run_id
    print(f"fine-tuned {info['uri']} on {task.name} for {args.steps} steps with {optimizer_version.uri}")
    names = [c.name + (f" (lr {c.learning_rate:g})" if c.learning_rate else "") for c in curves]
    print(f"{'step':>6} " + " ".join(f"{n + ' test loss':>24} {'acc':>6}" for n in names))
    for i, step in enumerate(curves[0].steps):
        print(f"{step:>6} " + " ".join(f"{c.test_loss[i]:>24.4f} {c.test_accuracy[i]:>6.3f}" for c in curves))
    print(f"MLflow run {run_id} (experiment lopt-finetune) at {registry.redact(tracking_uri)}")
    return 0


def _cluster_request(args: argparse.Namespace):
    """Checks the run's inputs here, then the package and parameters to send to the cluster."""
    from lopt.config import get_config, with_suite
    from pipeline import cluster

    from lopt.redaction import redact, split_credentials

    if args.tracking_uri and redact(args.tracking_uri) != args.tracking_uri:
        raise ValueError(
            f"--tracking-uri {redact(args.tracking_uri)} carries a password, which the cluster "
            f"would store and show with the run's parameters. Pass it without "
            f"(--tracking-uri {split_credentials(args.tracking_uri)[0]}) and put the credentials "
            f"in the 'mlflow-credentials' Secret (MLFLOW_TRACKING_USERNAME, "
            f"MLFLOW_TRACKING_PASSWORD; manifests/README.md), which the steps read."
        )
    overrides = with_suite(args.overrides, args.suite)
    get_config(args.budget, overrides)
    variants = _variants(args, args.budget, overrides)
    package = cluster.package_for(args.image, args.package)
    return cluster.Submission(
        package=package,
        arguments=cluster.arguments(args.base_model, args.budget, overrides, args.tracking_uri, args.if_stale, variants),
        experiment=args.experiment,
        namespace=args.namespace,
    )


def cmd_submit(args: argparse.Namespace) -> int:
    from pipeline import cluster

    request = _cluster_request(args)
    run_name = args.run_name or f"lopt-{args.base_model}-{time.strftime('%Y%m%d-%H%M%S')}"
    result = cluster.submit(args.host, request, run_name)
    print(f"submitted run {result['run_id']} ({run_name}) to {args.host}, experiment {request.experiment}")
    print(json.dumps(dict(request.arguments), indent=1))
    return 0


def cmd_schedule(args: argparse.Namespace) -> int:
    from pipeline import cluster

    cluster.check_cron(args.cron)  # before compiling anything
    request = _cluster_request(args)
    result = cluster.schedule(args.host, request, args.name, args.cron)
    print(f"scheduled {args.name!r} ({result['recurring_run_id']}) on {args.host}: cron {args.cron!r} "
          f"(seconds first), no catch-up, at most one run at a time")
    print("next runs (UTC): " + ", ".join(result["next_runs"]))
    return 0


def _base_model_of(optimizer_version) -> str:
    """The base model version an optimizer version was meta-trained for (its lineage tags)."""
    tags = optimizer_version.tags
    if "base_model" not in tags or "base_model_version" not in tags:
        raise ValueError(
            f"{optimizer_version.uri} has no base_model lineage tags; pass --base-model URI."
        )
    return f"models:/{tags['base_model']}/{tags['base_model_version']}"


# JAX's int32: larger step counts and seeds overflow. (Not imported from lopt.schema: building
# the parser must not import lopt, hence JAX.)
INT32_MAX = 2**31 - 1


def _int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer in ``[low, INT32_MAX]``, else argparse's usage error
    (exit 2) saying what the option accepts."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        if value > INT32_MAX:
            raise argparse.ArgumentTypeError(f"expected an integer <= {INT32_MAX}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


POSITIVE_INT = _int_at_least(1)
NON_NEGATIVE_INT = _int_at_least(0)


def _class_list(text: str) -> str:
    """``--classes``: comma-separated distinct labels >= 0 (kept as text; parsed where used)."""
    parts = [p.strip() for p in text.split(",")] if text.strip() else []
    if not all(p.isdigit() for p in parts) or len(set(map(int, parts))) != len(parts):
        raise argparse.ArgumentTypeError(f"expected distinct labels >= 0 separated by commas, e.g. 5,6,7; got {text!r}")
    return text


HOME_HELP = "LOPT_HOME: where the store, data and outputs go (default: $LOPT_HOME or .lopt)"
TRACKING_HELP = "MLflow tracking URI (default: $MLFLOW_TRACKING_URI or the embedded SQLite store)"


def _fan_out_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fan-out", type=POSITIVE_INT, default=1, metavar="K", help="meta-train K seeds in parallel (dsl.ParallelFor); the best on meta-validation goes on")
    parser.add_argument("--variant", action="append", default=[], metavar="JSON", help='one meta-training variant, e.g. \'{"meta_train": {"sigma": 0.1}}\'; repeat to fan out over several')


def _cluster_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", required=True, help="Kubeflow Pipelines API endpoint, e.g. http://localhost:8080 (port-forwarded ml-pipeline-ui)")
    parser.add_argument("--image", default=None, help="the steps' image, e.g. registry.example.com/lopt:0.1.0 (or --package)")
    parser.add_argument("--package", default=None, help="a package compiled with `lopt compile --image` instead of compiling now")
    parser.add_argument("--experiment", default="lopt", help="KFP experiment (default: %(default)s)")
    parser.add_argument("--namespace", default=None, help="KFP namespace (multi-user installs)")
    parser.add_argument("--base-model", default="cnn-mnist", help="registered base model name (default: %(default)s)")
    parser.add_argument("--budget", default="default", help="config budget: tiny, default or full (default: %(default)s)")
    parser.add_argument("--overrides", default="", help="JSON config overrides")
    parser.add_argument("--suite", default="default", help="validation suite: default or full")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI as the steps see it (default: the lopt-config ConfigMap's)")
    _fan_out_arguments(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lopt", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the pipeline locally (kfp.local) against the embedded MLflow")
    run.add_argument("--base-model", default="cnn-mnist", help="registered base model name (default: %(default)s)")
    run.add_argument("--budget", default="default", help="config budget: tiny, default or full (default: %(default)s)")
    run.add_argument("--overrides", default="", help='JSON overrides, e.g. \'{"meta_train": {"meta_steps": 10}}\'')
    run.add_argument("--home", default=None, help=HOME_HELP)
    run.add_argument("--tracking-uri", default=None, help=TRACKING_HELP)
    run.add_argument("--suite", default="default", help="validation suite: default (fits make run) or full (every baseline, 10-point grids)")
    run.add_argument("--if-stale", action="store_true", help="skip meta-training when the champion optimizer is up to date (see retrain-check)")
    _fan_out_arguments(run)
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("retrain-check", help="say whether the champion optimizer is stale; exit 0 up to date, 1 retraining due, 2 or more an error")
    check.add_argument("--base-model", default="cnn-mnist", help="registered base model name (default: %(default)s)")
    check.add_argument("--budget", default="default", help="the config the next run would use (default: %(default)s)")
    check.add_argument("--overrides", default="", help="JSON config overrides the next run would use")
    check.add_argument("--suite", default="default", help="validation suite the next run would use")
    check.add_argument("--json", action="store_true", help="also print the decision as JSON")
    check.add_argument("--home", default=None, help=HOME_HELP)
    check.add_argument("--tracking-uri", default=None, help=TRACKING_HELP)
    check.set_defaults(func=cmd_retrain_check)

    fetch = sub.add_parser("fetch", help="write a registered optimizer's files (JSON + msgpack) to a folder")
    fetch.add_argument("uri", help="e.g. models:/l3rs-cnn-mnist@champion")
    fetch.add_argument("--out", required=True, help="output folder: new or empty (see --force)")
    fetch.add_argument("--force", action="store_true", help="replace the content of a non-empty --out folder")
    fetch.add_argument("--home", default=None, help=HOME_HELP)
    fetch.add_argument("--tracking-uri", default=None, help=TRACKING_HELP)
    fetch.set_defaults(func=cmd_fetch)

    tune = sub.add_parser("finetune", help="fine-tune the registered base model with a registered optimizer")
    tune.add_argument("--dataset", required=True, help="TFDS dataset name, e.g. sklearn_digits")
    tune.add_argument("--classes", type=_class_list, default="", help="comma-separated class subset, e.g. 5,6,7,8,9")
    tune.add_argument("--optimizer", required=True, help="e.g. models:/l3rs-cnn-mnist@champion")
    tune.add_argument("--steps", type=POSITIVE_INT, required=True, help="fine-tuning steps (the horizon T)")
    tune.add_argument("--base-model", default=None, help="base model URI (default: the one the optimizer was meta-trained for)")
    tune.add_argument("--compare", choices=["adam"], default=None, help="also run Adam, its learning rate tuned on the validation split")
    tune.add_argument("--grid-size", type=POSITIVE_INT, default=6, help="Adam learning-rate grid points for --compare (default: %(default)s)")
    tune.add_argument("--batch-size", type=POSITIVE_INT, default=64, help="minibatch size (default: %(default)s)")
    tune.add_argument("--seed", type=NON_NEGATIVE_INT, default=0, help="draws the fresh head and the minibatch order")
    tune.add_argument("--home", default=None, help=HOME_HELP)
    tune.add_argument("--tracking-uri", default=None, help=TRACKING_HELP)
    tune.set_defaults(func=cmd_finetune)

    comp = sub.add_parser("compile", help="compile the pipeline to a KFP YAML package")
    comp.add_argument("-o", "--output", default="lopt-pipeline.yaml", help="output file (default: %(default)s)")
    comp.add_argument("--image", default=None, help="compile for a cluster: the steps' image, e.g. registry.example.com/lopt:0.1.0 (manifests/image/Dockerfile)")
    comp.set_defaults(func=cmd_compile)

    submit = sub.add_parser("submit", help="create a run on a Kubeflow Pipelines cluster")
    _cluster_arguments(submit)
    submit.add_argument("--run-name", default=None, help="default: lopt-<base model>-<timestamp>")
    submit.add_argument("--if-stale", action="store_true", help="skip meta-training when the champion optimizer is up to date")
    submit.set_defaults(func=cmd_submit)

    sched = sub.add_parser("schedule", help="create a recurring run on a Kubeflow Pipelines cluster")
    _cluster_arguments(sched)
    sched.add_argument("--cron", required=True, help="6 fields, seconds first: '0 0 3 * * *' is daily at 03:00:00")
    sched.add_argument("--name", default="lopt-retrain", help="recurring run name (default: %(default)s)")
    sched.add_argument("--always", dest="if_stale", action="store_false", help="meta-train on every run (default: only when stale)")
    sched.set_defaults(func=cmd_schedule, if_stale=True)
    return parser


def _redact(text: str) -> str:
    """:func:`lopt.redaction.redact`, imported when an error is printed (importing ``lopt``
    starts JAX, which ``lopt --help`` should not wait for)."""
    from lopt.redaction import redact

    return redact(text)


def _tracking_failure(err: Exception) -> str | None:
    """One line for a failure of the MLflow tracking store, or None for any other error."""
    registry = sys.modules.get("lopt.store.registry")  # not imported: MLflow cannot have failed
    return registry.failure_message(err) if registry is not None else None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # bad arguments: argparse's message, exit 2
    try:
        return args.func(args)
    except (ValueError, LookupError) as err:
        # Bad input (unknown dataset, budget, model URI...): the message says what to do.
        print(f"lopt: error: {_redact(str(err))}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ConnectionError as err:
        # The KFP API (pipeline.cluster.ClusterError): unreachable, or it refused the request.
        print(f"lopt: error: {err}", file=sys.stderr)
        return EXIT_CLUSTER
    except Exception as err:  # noqa: BLE001 - a crash must not exit 1 (retrain-check's "due")
        # The MLflow tracking server down, unreachable or refusing (after bounded retries):
        # one line naming it, password redacted, instead of MLflow's traceback.
        message = _tracking_failure(err)
        if message is not None:
            print(f"lopt: error: {message}", file=sys.stderr)
            return EXIT_BAD_INPUT
        traceback.print_exc()
        print(f"lopt: error: unexpected {type(err).__name__} (traceback above): {_redact(str(err))}", file=sys.stderr)
        return EXIT_UNEXPECTED


if __name__ == "__main__":
    sys.exit(main())
