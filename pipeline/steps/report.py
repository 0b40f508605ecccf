"""The validation report as the pipeline stores it: JSON that MLflow and KFP accept, and the
plots and HTML page a person reads."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from lopt import paths
from lopt.store import registry
from lopt.config import RunConfig
from lopt.eval.evaluation import trace_controls
from lopt.optim.l3rs import L3RS
from lopt.inner.models import ModelSpec, Params


def write_plots(
    report: dict[str, Any], l3rs: L3RS, theta: Any, spec: ModelSpec, pretrained: Params,
    task: Any, horizon: int, config: RunConfig, run_id: str,
) -> Path:
    """The validation plots and the HTML page gathering them, under
    ``$LOPT_HOME/reports/<MLflow run id>/``; returns the page's path."""
    from lopt.eval import plots  # matplotlib: only this step needs it

    out = paths.reports_dir() / run_id
    figures = {"Learning curves on the held-out tasks (mean test loss over seeds)": plots.learning_curves(report, out / "learning_curves.png")}
    if task is not None:
        controls = trace_controls(
            l3rs, theta, spec, pretrained, task, horizon, config.validation.batch_size, config.validation.seeds[0]
        )
        layers = list(l3rs.layout.names)
        figures[f"Mixing coefficients μ per layer on {task.name}, T={horizon}"] = plots.mixing_heatmaps(
            np.asarray(controls.mixing_coefficients), layers, l3rs.config.directions, out / "mixing.png"
        )
        figures[f"Learning rates λ_l(t) per layer on {task.name}, T={horizon}"] = plots.learning_rate_curves(
            np.asarray(controls.learning_rates), layers, out / "learning_rates.png"
        )
    return plots.write_html(report, figures, out / "index.html", f"L3RS validation — MLflow run {run_id}")


def finite(value: Any) -> Any:
    """JSON has no inf/NaN: a steps-to-target of inf (target met at step 0) becomes a string."""
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value
