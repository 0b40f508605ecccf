"""Plots of a validation run, and the static HTML report that gathers them.

Three views answer the questions a reviewer of a learned optimizer asks (docs/design.md §1):

* **Learning curves** per held-out task and horizon: is the learned optimizer faster than
  each tuned baseline, and does the advantage last at 2× and 4× the meta-training horizon?
* **Mixing coefficients μ** per layer over time, one heatmap per base direction: which
  layers prefer which base optimizer, and when.
* **Learning rates λ_l(t)** per layer: the learned schedule.

Everything renders with matplotlib's Agg backend to PNG files; :func:`write_html` embeds
them (base64) in one self-contained HTML file, so it opens anywhere: from the run's output
folder, as an MLflow artifact, or as a KFP HTML artifact.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # Files only, no display: servers, CI and pipeline steps.
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

_COLORS = {"l3rs": "black", "champion": "tab:gray"}


def learning_curves(report: Mapping[str, Any], path: Path) -> Path:
    """Mean test-loss curves: rows are held-out tasks (base checkpoint), columns horizons."""
    rows = [r for r in report["rows"] if r["held_out"] and r["checkpoint"] == "base"]
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    horizons = sorted({r["horizon"] for r in rows})
    fig, axes = plt.subplots(
        len(tasks), len(horizons), figsize=(4.2 * len(horizons), 3.2 * len(tasks)), squeeze=False
    )
    for row in rows:
        ax = axes[tasks.index(row["task"])][horizons.index(row["horizon"])]
        for name, result in row["baselines"].items():
            ax.plot(result["curve_steps"], result["test_loss_curve"], label=f"{name} (lr {result['learning_rate']:.2g})")
        if row.get("champion"):
            c = row["champion"]
            ax.plot(c["curve_steps"], c["test_loss_curve"], "--", color=_COLORS["champion"], label="current champion")
        learned = row["learned"]
        ax.plot(learned["curve_steps"], learned["test_loss_curve"], color=_COLORS["l3rs"], lw=2, label="L3RS")
        ax.axhline(row["target_test_loss"], color="tab:red", lw=0.8, ls=":", label="target (best baseline)")
        stt = row["steps_to_target"]
        speed = "not reached" if stt is None else ("at start" if stt == "inf" else f"{float(stt):.2f}x")
        ax.set_title(f"{row['task']}, T={row['horizon']}: steps-to-target {speed}", fontsize=9)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("test loss")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def mixing_heatmaps(
    mixing: np.ndarray, layers: Sequence[str], directions: Sequence[str], path: Path
) -> Path:
    """μ ``[T, L, P]`` as one heatmap per base direction (layers × steps, shared colour scale)."""
    steps, num_layers, num_directions = mixing.shape
    fig, axes = plt.subplots(
        1, num_directions, figsize=(2.6 * num_directions + 1.5, 0.32 * num_layers + 1.6),
        sharey=True, squeeze=False,
    )
    image = None
    for p, ax in enumerate(axes[0]):
        image = ax.imshow(
            mixing[:, :, p].T, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0,
            extent=(0, steps, num_layers - 0.5, -0.5), interpolation="nearest",
        )
        ax.set_title(directions[p], fontsize=9)
        ax.set_xlabel("step")
    axes[0][0].set_yticks(range(num_layers))
    axes[0][0].set_yticklabels(layers, fontsize=7)
    fig.colorbar(image, ax=axes[0].tolist(), label="mixing coefficient μ", shrink=0.9)
    fig.suptitle("Which layers prefer which base optimizer, over a fine-tuning run", fontsize=10)
    return _save(fig, path)


def learning_rate_curves(learning_rates: np.ndarray, layers: Sequence[str], path: Path) -> Path:
    """λ_l(t) ``[T, L]``, one line per layer, log scale."""
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = np.arange(1, learning_rates.shape[0] + 1)
    cmap = plt.get_cmap("tab10" if len(layers) <= 10 else "tab20")
    for l, name in enumerate(layers):
        ax.plot(steps, learning_rates[:, l], label=name, color=cmap(l % cmap.N))
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("per-layer learning rate λ_l (update RMS)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("Learned per-layer step sizes over a fine-tuning run", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_html(report: Mapping[str, Any], figures: Mapping[str, Path], path: Path, title: str) -> Path:
    """One self-contained HTML page: gate decision with its checks, the table, the figures."""
    gate = report["gate"]
    checks = "".join(
        f"<li>{'✔' if c['passed'] else '✘'} {html.escape(c['name'])}: {_number(c['value'])} "
        f"(needs {html.escape(c['threshold'])}){_interval(c)}</li>"
        for c in gate.get("checks", [])
    )
    images = "".join(
        f"<h2>{html.escape(caption)}</h2><img alt='{html.escape(caption)}' "
        f"src='data:image/png;base64,{base64.b64encode(Path(file).read_bytes()).decode()}'>"
        for caption, file in figures.items()
    )
    datasets = "".join(
        f"<li>{html.escape(d.get('name', ''))} — TFDS {html.escape(str(d.get('tfds_version', '')))}, "
        f"content {html.escape(str(d.get('content_hash', '')))}</li>"
        for d in report.get("datasets", [])
    )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1300px;margin:2em auto;padding:0 1em}}
pre{{background:#f6f6f6;padding:1em;overflow-x:auto;font-size:12px}}
img{{max-width:100%;border:1px solid #ddd}} .pass{{color:#080}} .fail{{color:#b00}}</style></head>
<body><h1>{html.escape(title)}</h1>
<p class="{'pass' if gate['passed'] else 'fail'}"><b>Gate: {'PASSED' if gate['passed'] else 'not passed'}</b>
— {html.escape(gate['reason'])}</p><ul>{checks}</ul>
<h2>Validation table</h2><pre>{html.escape(report.get('table', ''))}</pre>
<h2>Datasets</h2><ul>{datasets}</ul>
{images}
</body></html>
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


def _number(value: Any) -> str:
    if isinstance(value, str):  # the report's JSON writes inf as "inf"
        return value
    return "n/a" if value is None else f"{value:.3f}"


def _interval(check: Mapping[str, Any]) -> str:
    """A gate check's bootstrap interval, and whether the threshold lies within it."""
    interval = check.get("interval")
    if not interval:
        return ""
    noise = "within noise" if check.get("within_noise") else "outside noise"
    return (
        f", {float(interval['level']):.0%} CI [{_number(interval['low'])}, "
        f"{_number(interval['high'])}] — <b>{noise}</b>"
    )
