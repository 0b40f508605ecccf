"""Faults and bad input in the pipeline and its command line (issue #16, items 5, 6, 9, 13).

Each test drives the product as a user or an operator would: the ``lopt`` command
(``pipeline.cli.main``) or the pipeline's step functions, against a real MLflow SQLite store.

* 5: a failing step ends the pipeline's MLflow run FAILED with the step and its error as tags
  (the steps record it; the ExitHandler's ``finish-run`` closes a run a killed step left
  RUNNING), locally with kfp.local as on a cluster.
* 6: every config field is checked against its declaration before any work: exit 2, the
  field's path and what it accepts.
* 9: ``retrain-check`` exits 0 up to date, 1 due, 2 or more on an error.
* 13: numeric options are checked by argparse.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lopt.store import registry
from lopt.config import get_config
from lopt.schema import ConfigError
from pipeline import cli, steps
from pipeline.steps import StepContext

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture
def home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("LOPT_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return home


def _uri(home: Path) -> str:
    return f"sqlite:///{home}/mlflow.db"


def _run(run_id: str, uri: str):
    from mlflow import MlflowClient

    return MlflowClient(uri).get_run(run_id)


# --- 6: overrides are checked against the config dataclasses -------------------------------

BAD_OVERRIDES = [
    ('{"meta_train": {"meta_steps": "ten"}}', "meta_train.meta_steps must be an integer >= 0, got \"ten\""),
    ('{"meta_train": {"meta_steps": -3}}', "meta_train.meta_steps must be an integer >= 0, got -3"),
    ('{"meta_train": {"sigma": -1}}', "meta_train.sigma must be a number > 0, got -1"),
    ('{"meta_train": {"l3rs": {"b1": "x"}}}', "meta_train.l3rs.b1 must be a number in [0, 1), got \"x\""),
    ('{"meta_train": {"horizons": [100, 0]}}', "meta_train.horizons[1] must be an integer >= 1, got 0"),
    ('{"meta_train": {"samples_per_program": 1.5}}', "meta_train.samples_per_program must be an integer >= 1 or null"),
    ('{"meta_train": {"seed": 3000000000}}', "meta_train.seed must be an integer in [0, 2147483647]"),
    ('{"meta_train": {"sigma": NaN}}', "meta_train.sigma must be a number > 0, got NaN"),
    ('{"meta_train": {"num_pairs": true}}', "meta_train.num_pairs must be an integer >= 1, got true"),
    ('{"meta_train": {"family": {"contrast": [1]}}}', "meta_train.family.contrast must be a list of 2 numbers > 0"),
    ('{"validation": {"gate": {"beat_champion": "yes"}}}', "validation.gate.beat_champion must be true or false"),
    ('{"validation": {"tasks": [{"classes": [1, 2]}]}}', "validation.tasks[0].dataset is required: a string"),
    ('{"meta_train": 5}', "meta_train must be an object with fields"),
    ('{"meta_train": {"l3rs": {"warmup_fraction": 2}}}', "meta_train.l3rs: warmup_fraction must lie in [0, 1)"),
    ("[1]", "Config overrides must be a JSON object"),
    ("null", "Config overrides must be a JSON object"),
    ("5", "Config overrides must be a JSON object"),
]


@pytest.mark.parametrize("overrides, message", BAD_OVERRIDES)
def test_run_and_retrain_check_reject_a_bad_override_before_any_work(home, capsys, overrides, message):
    for command in (["run", "--budget", "tiny"], ["retrain-check", "--budget", "tiny"]):
        assert cli.main([*command, "--home", str(home), "--overrides", overrides]) == 2
        err = capsys.readouterr().err
        assert err.startswith("lopt: error: ") and message in err, err
    # Before any work: no store was created, nothing was downloaded or trained.
    assert not (home / "mlflow.db").exists() and not (home / "tensorflow_datasets").exists()


def test_submit_and_a_variant_are_checked_before_the_cluster_is_contacted(home, capsys):
    # Port 9 (discard) would refuse the connection: exit 3. The config error comes first.
    submit = ["submit", "--host", "http://127.0.0.1:9", "--image", "registry.example.com/lopt:0.1.0"]
    assert cli.main([*submit, "--overrides", '{"meta_train": {"sigma": -1}}']) == 2
    assert "meta_train.sigma must be a number > 0" in capsys.readouterr().err
    assert cli.main([*submit, "--variant", '{"meta_train": {"seed": "one"}}']) == 2
    assert "meta_train.seed must be an integer in [0, 2147483647], got \"one\"" in capsys.readouterr().err


def test_the_pipelines_first_step_rejects_a_bad_override_before_opening_a_run(home):
    # What a run submitted straight to a cluster (the KFP UI's parameters) meets.
    with pytest.raises(ConfigError, match=r"meta_train\.meta_steps must be an integer >= 0"):
        ctx = StepContext.create(budget="tiny", overrides='{"meta_train": {"meta_steps": "ten"}}', tracking_uri=_uri(home))
        steps.prepare_base_model(ctx=ctx, base_model="cnn-mnist")
    assert not (home / "mlflow.db").exists()


def test_a_task_may_still_be_given_as_a_dataset_name_and_good_overrides_keep_their_meaning():
    config = get_config("default", {"validation": {"tasks": ["sklearn_digits", {"dataset": "mnist_inverted", "classes": [0, 1]}]},
                                    "meta_train": {"samples_per_program": None, "horizons": [100, 200], "meta_steps": 0}})
    assert [t.name for t in config.validation.tasks] == ["sklearn_digits", "mnist_inverted[0,1]"]
    assert config.meta_train.horizons == (100, 200) and config.meta_train.meta_steps == 0
    # The checks change no valid config: the budgets hash as they did before them.
    assert get_config("default").hash() == "9a124b2f0c42f034"
    assert get_config("tiny").hash() == "b2b345abb3071180"


# --- 13: numeric options ---------------------------------------------------------------------

@pytest.mark.parametrize("option, value, message", [
    ("--batch-size", "0", "argument --batch-size: expected an integer >= 1, got 0"),
    ("--steps", "ten", "argument --steps: expected an integer >= 1, got 'ten'"),
    ("--steps", "4294967296", "argument --steps: expected an integer <= 2147483647"),
    ("--grid-size", "-2", "argument --grid-size: expected an integer >= 1, got -2"),
    ("--seed", "-1", "argument --seed: expected an integer >= 0, got -1"),
    ("--classes", "5,x", "argument --classes: expected distinct labels >= 0"),
])
def test_finetune_rejects_bad_numbers_with_a_usage_error(capsys, option, value, message):
    args = {"--dataset": "sklearn_digits", "--optimizer": "models:/l3rs-cnn-mnist@champion", "--steps": "20", option: value}
    with pytest.raises(SystemExit) as exit_:
        cli.main(["finetune", *[item for pair in args.items() for item in pair]])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_run_rejects_an_empty_fan_out(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["run", "--fan-out", "0"])
    assert exit_.value.code == 2 and "argument --fan-out: expected an integer >= 1" in capsys.readouterr().err


# --- 9: retrain-check's exit codes -----------------------------------------------------------

def test_retrain_check_exits_1_only_when_retraining_is_due_never_on_a_crash(home, capsys):
    assert cli.main(["retrain-check", "--budget", "tiny", "--home", str(home)]) == 1
    assert "retrain: no cnn-mnist@champion in the registry yet" in capsys.readouterr().out
    # A store that cannot be read is an error, not "due": a cron line must not start a run.
    broken = home.parent / "broken"
    broken.mkdir()
    (broken / "mlflow.db").write_bytes(b"this is not a SQLite database" * 100)
    code = cli.main(["retrain-check", "--budget", "tiny", "--home", str(broken)])
    captured = capsys.readouterr()
    assert code >= 2, captured
    assert "retrain:" not in captured.out and "lopt: error:" in captured.err


def test_the_readme_cron_line_runs_only_when_retraining_is_due():
    text = README.read_text()
    assert "retrain-check || lopt run" not in text
    assert "lopt retrain-check; case $? in 0) ;; 1) lopt run ;; *) exit 2 ;; esac" in text


# --- 5: a failing step leaves no MLflow run RUNNING -------------------------------------------

def test_a_failing_step_ends_the_run_failed_with_its_error_and_reraises(home):
    uri = _uri(home)
    run_id = registry.start_run(steps.EXPERIMENT, tracking_uri=uri, tags={"pipeline_run": "p-validate"})
    missing = home / "no-such-optimizer"
    with pytest.raises(Exception) as raised:  # whatever the optimizer's loader raises, it goes on
        ctx = StepContext.create(budget="tiny", tracking_uri=uri).for_run(base_model_uri="models:/cnn-mnist/1", run_id=run_id)
        steps.validate_optimizer(ctx=ctx, optimizer_dir=str(missing), report_path=str(home / "report.json"))
    error = f"{type(raised.value).__name__}: {raised.value}"
    run = _run(run_id, uri)
    assert run.info.status == "FAILED"
    assert run.data.tags[steps.FAILED_STEP_TAG] == "validate"
    assert run.data.tags[steps.ERROR_TAG] == error and "no-such-optimizer" in error
    # The exit task then fails the pipeline with that error, and leaves the run as it is.
    with pytest.raises(steps.PipelineRunFailed, match=f"step validate failed: {type(raised.value).__name__}"):
        steps.finish_pipeline_run(pipeline_run="p-validate", tracking_uri=uri)
    assert _run(run_id, uri).data.tags[steps.FAILED_STEP_TAG] == "validate"


def test_the_exit_task_closes_a_run_that_a_killed_step_left_running(home):
    uri = _uri(home)
    run_id = registry.start_run(steps.EXPERIMENT, tracking_uri=uri, tags={"pipeline_run": "p-killed"})
    with pytest.raises(steps.PipelineRunFailed, match="stopped without reporting an error"):
        steps.finish_pipeline_run(pipeline_run="p-killed", tracking_uri=uri)
    run = _run(run_id, uri)
    assert run.info.status == "FAILED"
    assert run.data.tags[steps.FAILED_STEP_TAG] == "unknown"
    assert "killed, out of memory" in run.data.tags[steps.ERROR_TAG]


def test_the_exit_task_returns_the_summary_of_a_finished_run_and_fails_without_one(home):
    uri = _uri(home)
    with pytest.raises(steps.PipelineRunFailed, match="before its first step opened its MLflow run"):
        steps.finish_pipeline_run(pipeline_run="p-never-started", tracking_uri=uri)
    run_id = registry.start_run(steps.EXPERIMENT, tracking_uri=uri, tags={"pipeline_run": "p-done"})
    summary = {"optimizer": "l3rs-x", "version": 3, "skipped": False}
    registry.log_text(run_id, json.dumps(summary), steps.SUMMARY, uri)
    registry.end_run(run_id, "FINISHED", uri)
    assert steps.finish_pipeline_run(pipeline_run="p-done", tracking_uri=uri) == summary
    assert _run(run_id, uri).info.status == "FINISHED"


def test_a_step_failure_is_recorded_without_a_password(home):
    uri = _uri(home)
    run_id = registry.start_run(steps.EXPERIMENT, tracking_uri=uri)
    steps.record_failure(run_id, "meta-train", ConnectionError("cannot reach https://bob:s3cret@mlflow.example.com/api"), uri)
    error = _run(run_id, uri).data.tags[steps.ERROR_TAG]
    assert "s3cret" not in error and "https://bob:***@mlflow.example.com/api" in error


def _register_base_model_without_files(home: Path, uri: str) -> None:
    """cnn-mnist@champion as the first step finds it, its files gone from the artifact store
    (an operator's fault): the run starts, then meta-training cannot load the model."""
    import jax

    from lopt.hub import register_base_model
    from lopt.inner.models import ModelSpec, init_params

    spec = ModelSpec(num_classes=5)
    register_base_model(
        "cnn-mnist", spec, init_params(spec, jax.random.key(0)),
        run_id=registry.start_run("lopt-base-models", tracking_uri=uri), metrics={},
        description="a base model whose files are lost", tracking_uri=uri,
    )
    files = [p for p in home.rglob("params.msgpack")]
    assert files
    for path in files:
        path.unlink()


@pytest.mark.slow  # a real kfp.local run: four step subprocesses, each importing JAX (~40 s)
def test_lopt_run_with_a_failing_step_exits_1_and_leaves_its_mlflow_run_failed(home, capsys):
    uri = _uri(home)
    _register_base_model_without_files(home, uri)
    assert cli.main(["run", "--budget", "tiny", "--home", str(home)]) == 1
    err = capsys.readouterr().err
    assert "lopt: error: the pipeline failed in step meta-train: " in err
    assert "Nothing was registered" in err
    (run,) = registry.find_runs(steps.EXPERIMENT, None, uri)
    assert run.status == "FAILED"
    assert run.tags[steps.FAILED_STEP_TAG] == "meta-train"
    assert run.tags[steps.ERROR_TAG] in err
    assert run.tags["pipeline_run"].startswith("lopt-l3rs-")
    assert not registry.model_exists("l3rs-cnn-mnist", uri)
