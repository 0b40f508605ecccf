"""The lifecycle around a validated optimizer: the gate, promotion, staleness, concurrency."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import jax
import pytest

from lopt.store import registry
from lopt.config import GateConfig, get_config
from lopt.eval.evaluation import RunResult
from lopt.hub import promote_optimizer, register_base_model, register_optimizer
from lopt.optim.l3rs import L3RS, L3RSConfig
from lopt.optim.layout import LayerLayout
from lopt.store.lineage import data_hash
from lopt.inner.models import ModelSpec, init_params, with_fresh_head
from lopt.eval.validation import SuiteRow, decide
from pipeline.steps import StepContext, data_lineage, retrain_decision

STEPS = (0, 50, 100)


def _result(name: str, curve: tuple[float, ...], horizon: int = 100) -> RunResult:
    return RunResult(
        task="t", horizon=horizon, optimizer=name, learning_rate=1e-3, val_loss=curve[-1],
        test_loss=curve[-1], test_accuracy=0.9, test_loss_curve=curve,
        curve_steps=tuple(s * horizon // 100 for s in STEPS), test_loss_per_seed=(curve[-1],),
        test_loss_curve_per_seed=(curve,),
    )


def _row(learned, baseline, horizon=100, champion=None, held_out=True) -> SuiteRow:
    return SuiteRow(
        task="t", held_out=held_out, checkpoint="base", multiple=horizon // 100, horizon=horizon,
        learned=_result("l3rs", learned, horizon), baselines={"adam": _result("adam", baseline, horizon)},
        grids={}, champion=None if champion is None else _result("champion", champion, horizon),
    )


def test_gate_passes_when_faster_no_regression_at_the_longest_horizon_and_beats_the_champion():
    rows = [
        _row((1.0, 0.2, 0.1), (1.0, 0.5, 0.2), champion=(1.0, 0.4, 0.15)),  # target 0.2 at step 50: 2x
        _row((1.0, 0.3, 0.1), (1.0, 0.5, 0.12), horizon=400),
    ]
    decision = decide(rows, GateConfig(min_steps_to_target=1.5), 100, {"version": 3})
    assert decision.passed, decision.reason
    assert [c.passed for c in decision.checks] == [True, True, True]
    assert decision.checks[0].value == pytest.approx(2.0)


@pytest.mark.parametrize(
    "rows, failed",
    [
        # Reaches the target only at the end: 1x < 1.5x.
        ([_row((1.0, 0.5, 0.2), (1.0, 0.4, 0.2))], "median steps-to-target"),
        # Never reaches it: counts as 0.
        ([_row((1.0, 0.5, 0.3), (1.0, 0.4, 0.2)), _row((1.0, 0.1, 0.05), (1.0, 0.5, 0.2), horizon=400)],
         "median steps-to-target"),
        # Fast at T but worse than the best baseline at the longest horizon.
        ([_row((1.0, 0.1, 0.05), (1.0, 0.5, 0.2)), _row((1.0, 0.1, 0.1), (1.0, 0.2, 0.09), horizon=400)],
         "worst test-loss ratio"),
        # Beats the baselines but not the current champion.
        ([_row((1.0, 0.1, 0.05), (1.0, 0.5, 0.2), champion=(1.0, 0.1, 0.04))], "champion v3"),
    ],
)
def test_gate_fails_on_each_check_and_says_which(rows, failed):
    decision = decide(rows, GateConfig(min_steps_to_target=1.5), 100, {"version": 3})
    assert not decision.passed
    assert failed in decision.reason
    assert sum(not c.passed for c in decision.checks) == 1


def test_gate_ignores_reference_rows_and_needs_a_held_out_task():
    reference = _row((1.0, 0.9, 0.8), (1.0, 0.2, 0.1), held_out=False)
    assert decide([_row((1.0, 0.1, 0.05), (1.0, 0.5, 0.2)), reference], GateConfig(), 100, None).passed
    assert not decide([reference], GateConfig(), 100, None).passed


# ---------------------------------------------------------------------------------------------
# Promotion, staleness and concurrency on a real (temporary) registry.

SPEC = ModelSpec(num_classes=5, input_shape=(8, 8, 1), conv_features=(4,), hidden_size=8)


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory):
    """One store for the module (creating an MLflow database takes seconds); each test
    registers its own base model name, so tests do not see each other's versions."""
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOPT_HOME", str(home))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        uri = f"sqlite:///{home}/mlflow.db"
        registry.ensure_experiment("test", uri)
        params = init_params(SPEC, jax.random.key(0))
        l3rs = L3RS(L3RSConfig(), LayerLayout.from_params(with_fresh_head(SPEC, params, 5, jax.random.key(0))))
        yield {"uri": uri, "home": home, "params": params, "l3rs": l3rs, "theta": l3rs.init(jax.random.key(1))}


@pytest.fixture
def store(shared_store, request, monkeypatch):
    monkeypatch.setenv("LOPT_HOME", str(shared_store["home"]))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    base = "cnn-" + request.node.name.split("[")[0].removeprefix("test_")[:40].replace("_", "-")
    _register_base(shared_store, base)
    return {**shared_store, "base": base}


def _register_base(store, name: str) -> None:
    register_base_model(
        name, SPEC, store["params"], run_id=registry.start_run("test", tracking_uri=store["uri"]),
        metrics={}, description="test base model", tracking_uri=store["uri"],
    )


def _register(store, tags=None) -> tuple[str, int]:
    base = registry.resolve(f"models:/{store['base']}@champion", store["uri"])
    return register_optimizer(
        base, store["l3rs"], store["theta"], 30, run_id=registry.start_run("test", tracking_uri=store["uri"]),
        tags=tags or {}, description="test", tracking_uri=store["uri"],
    )


def test_promotion_keeps_the_previous_champion_and_refuses_a_stale_comparison(store):
    uri = store["uri"]
    name, v1 = _register(store)
    assert promote_optimizer(name, v1, None, uri)["promoted"]
    _, v2 = _register(store)
    _, v3 = _register(store)
    assert promote_optimizer(name, v2, v1, uri) == {
        "promoted": True, "reason": f"promoted to champion; v{v1} is now previous", "previous": v1,
    }
    assert registry.resolve(f"models:/{name}@champion", uri).version == v2
    assert registry.resolve(f"models:/{name}@previous", uri).version == v1
    # v3 was validated against v1, but v2 is champion now: nothing moves, the version says why.
    result = promote_optimizer(name, v3, v1, uri)
    assert not result["promoted"] and "moved to v2" in result["reason"]
    assert registry.resolve(f"models:/{name}@champion", uri).version == v2
    assert registry.get_version(name, version=v3, tracking_uri=uri).tags["promoted"] == "false"
    assert registry.resolve(f"models:/{name}@challenger", uri).version == v3


def test_staleness_follows_the_base_models_champion_config_and_data(store):
    uri, budget, base = store["uri"], "tiny", store["base"]
    config = get_config(budget)
    tags = {
        "config_hash": config.hash(),
        "data_hash": data_hash(data_lineage(config, SPEC.input_shape)),
    }
    ctx = StepContext.create(budget=budget, tracking_uri=uri)
    decision = retrain_decision(ctx=ctx, base_model=base)
    assert decision["retrain"] and "has no champion" in decision["reason"]
    name, version = _register(store, tags)
    promote_optimizer(name, version, None, uri)
    decision = retrain_decision(ctx=ctx, base_model=base)
    assert not decision["retrain"], decision["reason"]
    assert "up to date" in decision["reason"]
    changed_ctx = StepContext.create(budget=budget, overrides='{"meta_train": {"meta_steps": 5}}', tracking_uri=uri)
    changed = retrain_decision(ctx=changed_ctx, base_model=base)
    assert changed["retrain"] and "config changed" in changed["reason"]
    # The base model's champion moves to a new version: the optimizer is stale.
    _register_base(store, base)
    decision = retrain_decision(ctx=ctx, base_model=base)
    assert decision["retrain"] and "moved" in decision["reason"] and "now v2" in decision["reason"]


def test_retrain_check_exit_code(store, capsys):
    from pipeline import cli

    args = ["retrain-check", "--base-model", store["base"], "--budget", "tiny", "--home", str(store["home"])]
    assert cli.main(args) == 1
    assert f"retrain: l3rs-{store['base']} has no champion" in capsys.readouterr().out


_CONCURRENT = textwrap.dedent("""
    import json, sys
    import jax
    from lopt.store import registry
    from lopt.hub import promote_optimizer, register_optimizer
    from lopt.optim.l3rs import L3RS, L3RSConfig
    from lopt.optim.layout import LayerLayout
    from lopt.inner.models import ModelSpec, init_params, with_fresh_head

    uri, base_name, go = sys.argv[1], sys.argv[2], sys.argv[3]
    spec = ModelSpec(num_classes=5, input_shape=(8, 8, 1), conv_features=(4,), hidden_size=8)
    params = init_params(spec, jax.random.key(0))
    l3rs = L3RS(L3RSConfig(), LayerLayout.from_params(with_fresh_head(spec, params, 5, jax.random.key(0))))
    base = registry.resolve(f"models:/{base_name}@champion", uri)
    # What validation compared against: the champion when this run started.
    name = "l3rs-" + base_name
    expected = registry.resolve(f"models:/{name}@champion", uri).version
    print("ready", flush=True)
    while not __import__("os").path.exists(go):  # start both at once
        pass
    _, version = register_optimizer(base, l3rs, l3rs.init(jax.random.key(2)), 30,
        run_id=registry.start_run("test", tracking_uri=uri), tags={}, description="concurrent",
        tracking_uri=uri)
    print(json.dumps({"version": version, **promote_optimizer(name, version, expected, uri)}))
""")


def test_two_concurrent_registrations_record_both_versions_and_keep_aliases_consistent(store, tmp_path):
    uri = store["uri"]
    name, first = _register(store)
    promote_optimizer(name, first, None, uri)
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CONCURRENT, uri, store["base"], str(go)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    assert [p.stdout.readline().strip() for p in procs] == ["ready", "ready"]
    go.touch()
    results = [json.loads(p.communicate(timeout=240)[0].strip().splitlines()[-1]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    versions = sorted(r["version"] for r in results)
    assert versions == [first + 1, first + 2]
    # Exactly one of them won the compare-and-set against v1; the other says it lost.
    assert sorted(r["promoted"] for r in results) == [False, True]
    winner = next(r for r in results if r["promoted"])
    assert registry.resolve(f"models:/{name}@champion", uri).version == winner["version"]
    assert registry.resolve(f"models:/{name}@previous", uri).version == first
    for version in versions:  # both complete: files, tags, a promotion note
        info = registry.get_version(name, version=version, tracking_uri=uri)
        assert info.tags["promoted"] in ("true", "false") and info.tags["promotion_note"]
        files = {p.name for p in registry.download(f"models:/{name}/{version}", uri).iterdir()}
        assert files == {"optimizer.json", "meta_params.msgpack"}


def test_plots_and_html_report_render_from_a_report(tmp_path):
    import numpy as np

    from lopt.eval import plots

    rows = [_row((1.0, 0.2, 0.1), (1.0, 0.5, 0.2), champion=(1.0, 0.4, 0.15)), _row((1.0, 0.3, 0.1), (1.0, 0.5, 0.12), horizon=200)]
    report = {
        "rows": [r.to_json() for r in rows],
        "gate": decide(rows, GateConfig(), 100, {"version": 1}).to_json(),
        "table": "a table", "datasets": [{"name": "t", "tfds_version": "1.0.0", "content_hash": "abc"}],
    }
    layers = ["conv/kernel", "head/kernel", "head/bias"]
    mixing = np.random.default_rng(0).dirichlet(np.ones(5), size=(30, 3))
    figures = {
        "curves": plots.learning_curves(report, tmp_path / "curves.png"),
        "mixing": plots.mixing_heatmaps(mixing, layers, ["a", "b", "c", "d", "e"], tmp_path / "mixing.png"),
        "lr": plots.learning_rate_curves(np.full((30, 3), 1e-3), layers, tmp_path / "lr.png"),
    }
    assert all(path.stat().st_size > 10_000 for path in figures.values())
    page = plots.write_html(report, figures, tmp_path / "index.html", "title").read_text()
    assert page.count("data:image/png;base64,") == 3 and "Gate: PASSED" in page and "1.0.0" in page


