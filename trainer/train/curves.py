"""A picture of a run without Grafana: loss, accuracy and throughput per epoch, both phases.

Drawn by the chief from the metrics log rows (one per epoch) into a PNG beside summary.json.
matplotlib's Agg backend renders without a display.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

PHASE_COLOURS = {"feature_extraction": "#dce9f7", "fine_tuning": "#fbe5d6"}


def render_curves(rows: Sequence[dict[str, Any]], title: str = "Training curves") -> bytes:
    """PNG bytes of three panels (loss, accuracy, images/s) against the run's global step."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure  # no pyplot: no global state, no display

    figure = Figure(figsize=(10, 8), dpi=100, layout="constrained")
    loss_ax, acc_ax, speed_ax = figure.subplots(3, 1, sharex=True)
    steps = [row.get("global_step", i + 1) for i, row in enumerate(rows)]
    for ax, keys, label in (
        (loss_ax, ("loss", "val_loss"), "loss"),
        (acc_ax, ("accuracy", "val_accuracy"), "accuracy"),
        (speed_ax, ("images_per_second",), "images / s"),
    ):
        for key in keys:
            points = [(s, row[key]) for s, row in zip(steps, rows, strict=True) if row.get(key) is not None]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o", markersize=3, label=key.replace("val_", "validation ").replace("_", " "))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        _shade_phases(ax, rows, steps)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize="small")
    acc_ax.set_ylim(-0.02, 1.02)
    speed_ax.set_xlabel("global step (end of epoch)")
    figure.suptitle(title if rows else f"{title}: no epoch finished")
    out = io.BytesIO()
    figure.savefig(out, format="png")
    return out.getvalue()


def _shade_phases(ax, rows: Sequence[dict[str, Any]], steps: Sequence[int]) -> None:
    """A background band per phase, labelled once (on the top panel)."""
    start = 0
    for phase in dict.fromkeys(row.get("phase", "") for row in rows):
        ends = [s for s, row in zip(steps, rows, strict=True) if row.get("phase", "") == phase]
        ax.axvspan(start, max(ends), color=PHASE_COLOURS.get(phase, "#eeeeee"), zorder=0)
        if ax.get_subplotspec().is_first_row():
            ax.text(start, 1.0, f" {phase}", transform=ax.get_xaxis_transform(), va="top", fontsize="small")
        start = max(ends)
