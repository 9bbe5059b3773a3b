"""Plots with matplotlib (the ``plot`` extra, imported only when a plot is drawn).

- `plot_fid_vs_nfe`: ``eval samplers``' FID against network evaluations, one line per
  sampler, every point labelled with its steps;
- `plot_fid_by_step`: ``eval fid RUN --checkpoints``' FID against the training step;
- `plot_training`: ``difforge plot RUN``, the run's ``metrics.jsonl``: every loss term, the
  learning rate, the gradient norm and images/s against the step, each measured curve
  smoothed (an exponential moving average) over its raw values drawn faint.

Without matplotlib, `require_matplotlib` is a one-line DifforgeError naming the extra.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from difforge.errors import DifforgeError

PLOT_EXTRA = "pip install 'difforge[plot]'"
"""How to get matplotlib, in every message that needs it."""
MAX_SMOOTHING = 0.95
"""The largest weight of the past in the moving average drawn over raw training curves (the
weight is 1 - 10 / points, so a short run is smoothed less)."""


def has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def require_matplotlib() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend, or a one-line DifforgeError."""
    try:
        import matplotlib
    except ImportError:
        raise DifforgeError(f"plots need matplotlib, which is not installed: {PLOT_EXTRA}") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(figure: Any, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".tmp-{path.name}")
    figure.savefig(temporary, dpi=120, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    temporary.replace(path)
    return path


def plot_fid_vs_nfe(rows: Sequence[Any], path: Path, title: str = "") -> Path:
    """Rows with ``sampler``, ``steps``, ``nfe`` and ``fid`` -> a log-NFE line plot, one line
    per sampler, each point labelled with its steps."""
    plt = require_matplotlib()
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(r.sampler for r in rows):
        points = sorted((r.nfe, r.fid, r.steps) for r in rows if r.sampler == name)
        axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
        for nfe, fid, steps in points:
            axes.annotate(f"{steps}", (nfe, fid), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axes.set_xscale("log")
    axes.set_xlabel("network evaluations per image (NFE, log scale)")
    axes.set_ylabel("FID (lower is better)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(title="sampler (points: steps)")
    if title:
        axes.set_title(title, fontsize=9)
    path = _save(figure, path)
    plt.close(figure)
    return path


def plot_fid_by_step(rows: Sequence[Mapping[str, Any]], path: Path, title: str = "") -> Path:
    """Rows with ``step`` and ``fid`` -> FID against the training step."""
    plt = require_matplotlib()
    figure, axes = plt.subplots(figsize=(7, 4.5))
    steps, fids = [r["step"] for r in rows], [r["fid"] for r in rows]
    axes.plot(steps, fids, marker="o")
    for step, fid in zip(steps, fids, strict=True):
        axes.annotate(f"{fid:.1f}", (step, fid), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axes.set_xlabel("training step (EMA weights of each checkpoint)")
    axes.set_ylabel("FID (lower is better)")
    axes.grid(True, alpha=0.3)
    if title:
        axes.set_title(title, fontsize=9)
    path = _save(figure, path)
    plt.close(figure)
    return path


def smoothing_for(count: int) -> float:
    """The moving average's weight for a curve of ``count`` points."""
    return min(MAX_SMOOTHING, max(0.0, 1.0 - 10.0 / max(count, 1)))


def smoothed(values: Sequence[float], weight: float) -> list[float]:
    """Bias-corrected exponential moving average: m_k = w m_{k-1} + (1 - w) v_k, divided by
    1 - w^k (TensorBoard's smoothing); NaN and infinite values are skipped."""
    out, average, count = [], 0.0, 0
    for value in values:
        if math.isfinite(value):
            average, count = weight * average + (1 - weight) * value, count + 1
        out.append(average / (1 - weight**count) if count else math.nan)
    return out


TRAINING_PANELS = ("lr", "grad_norm", "images_per_s")
_NOT_LOSSES = {"step", "epoch", "images_seen", "threads", "nonfinite_steps", *TRAINING_PANELS}


def plot_training(records: Sequence[Mapping[str, Any]], path: Path, title: str = "") -> Path:
    """``metrics.jsonl`` records -> one panel per loss term (log scale when positive), then
    the learning rate, the gradient norm and images/s, all against the step."""
    plt = require_matplotlib()
    numeric = [r for r in records if isinstance(r.get("step"), (int, float))]
    if not numeric:
        raise DifforgeError("metrics.jsonl has no logged step yet: nothing to plot")
    names = list(dict.fromkeys(k for r in numeric for k, v in r.items() if isinstance(v, (int, float))))
    losses = [n for n in names if n not in _NOT_LOSSES]
    panels = [*losses, *(n for n in TRAINING_PANELS if n in names)]
    columns = 2
    rows = math.ceil(len(panels) / columns)
    figure, grid = plt.subplots(rows, columns, figsize=(11, 2.8 * rows), squeeze=False, sharex=True)
    for index, name in enumerate(panels):
        axes = grid[index // columns][index % columns]
        points = [(r["step"], float(r[name])) for r in numeric if isinstance(r.get(name), (int, float))]
        steps, values = [p[0] for p in points], [p[1] for p in points]
        if name == "lr":  # a schedule, not a noisy measurement
            axes.plot(steps, values, linewidth=1.6, color="C0")
        else:
            axes.plot(steps, values, alpha=0.25, linewidth=0.8, color="C0")
            axes.plot(steps, smoothed(values, smoothing_for(len(values))), linewidth=1.6, color="C0")
        finite = [v for v in values if math.isfinite(v)]
        if name in losses and finite and min(finite) > 0:
            axes.set_yscale("log")
        axes.set_title(name, fontsize=10)
        axes.grid(True, which="both", alpha=0.3)
    for index in range(len(panels), rows * columns):
        grid[index // columns][index % columns].axis("off")
    for axes in grid[-1]:
        axes.set_xlabel("step")
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    path = _save(figure, path)
    plt.close(figure)
    return path
