"""The ``lopt`` command line: run the pipeline locally, or compile it for a cluster.

``lopt run`` executes the Kubeflow pipeline with ``kfp.local.SubprocessRunner(use_venv=False)``
against the embedded MLflow store under ``$LOPT_HOME`` (or ``$MLFLOW_TRACKING_URI``): the
same components a cluster runs, in subprocesses of this interpreter, offline.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence


def _home(path: str | None) -> Path:
    home = Path(path or os.environ.get("LOPT_HOME") or ".lopt").resolve()
    home.mkdir(parents=True, exist_ok=True)
    # The steps run in subprocesses that inherit the environment: they must agree on the home.
    os.environ["LOPT_HOME"] = str(home)
    return home


def _use_all_cores() -> None:
    """One JAX CPU device per core, so ES pairs run in parallel (set before JAX loads; the
    pipeline's steps inherit it)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count or 1}".strip()


def cmd_compile(args: argparse.Namespace) -> int:
    from kfp import compiler

    from pipeline.pipeline import l3rs_pipeline

    compiler.Compiler().compile(l3rs_pipeline, package_path=args.output)
    print(f"wrote {args.output}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    home = _home(args.home)
    _use_all_cores()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from kfp import local

    from lopt import registry
    from lopt.data import default_data_dir
    from lopt.steps import check_inputs
    from pipeline.pipeline import l3rs_pipeline

    # Bad budget, override or dataset name: a clear error now, not a failed step later.
    check_inputs(args.budget, args.overrides, str(default_data_dir()))
    tracking_uri = registry.resolve_tracking_uri(args.tracking_uri)
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(home / "pipeline_runs"),
    )
    start = time.perf_counter()
    task = l3rs_pipeline(
        base_model=args.base_model,
        budget=args.budget,
        overrides=args.overrides,
        tracking_uri=tracking_uri,
        data_dir=str(default_data_dir()),
    )
    summary = json.loads(task.output)
    print(_summary(summary, time.perf_counter() - start, home))
    return 0


def _summary(summary: dict, seconds: float, home: Path) -> str:
    aliases = ", ".join(summary["aliases"])
    lines = [
        "",
        f"lopt run finished in {seconds / 60:.1f} min",
        f"registered {summary['optimizer']} version {summary['version']} (aliases: {aliases})",
        f"  for base model {summary['base_model']}; MLflow run {summary['mlflow_run_id']}",
        f"  tracking URI {summary['tracking_uri']}",
        "",
        "validation (test loss after fine-tuning; Adam's learning rate tuned per task and horizon;",
        "ratio = Adam loss / L3RS loss, > 1 means the learned optimizer wins):",
        summary["table"],
        "",
        f"fetch it: lopt.fetch_optimizer(\"{summary['uri']}\", num_steps=T)",
        f"browse:   mlflow ui --backend-store-uri {summary['tracking_uri']}",
        f"outputs:  {home}",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lopt", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the pipeline locally (kfp.local) against the embedded MLflow")
    run.add_argument("--base-model", default="cnn-mnist", help="registered base model name (default: %(default)s)")
    run.add_argument("--budget", default="default", help="config budget: tiny, default or full (default: %(default)s)")
    run.add_argument("--overrides", default="", help='JSON overrides, e.g. \'{"meta_train": {"meta_steps": 10}}\'')
    run.add_argument("--home", default=None, help="LOPT_HOME: where the store, data and outputs go (default: $LOPT_HOME or .lopt)")
    run.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or the embedded SQLite store)")
    run.set_defaults(func=cmd_run)

    comp = sub.add_parser("compile", help="compile the pipeline to a KFP YAML package")
    comp.add_argument("-o", "--output", default="lopt-pipeline.yaml", help="output file (default: %(default)s)")
    comp.set_defaults(func=cmd_compile)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, LookupError) as err:
        # Bad input (unknown dataset, budget, model URI...): the message says what to do.
        print(f"lopt: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
