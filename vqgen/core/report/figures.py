"""The report's plots as PNG bytes: training and test curves, and the code-frequency histogram.

matplotlib is an optional extra (`pip install "vqgen[report]"`): it is imported here, lazily, and drawn
through its Agg canvas without pyplot, so no global figure state and no display are involved.
"""

from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from vqgen.core.report.page import Curves, Histogram, SweepPoint

DPI = 100
COLUMNS = 3
TRAIN, TEST, BEST, RESUME = "#1f77b4", "#d62728", "#2ca02c", "#7f7f7f"
OTHERS = ("#ff7f0e", "#9467bd", "#8c564b")  # a panel's third line on


def available() -> bool:
    """Whether matplotlib can be imported (the `report` extra is installed)."""
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI)  # fixed margins: a layout engine would double the time


def png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def curves_figure(curves: Curves) -> Figure:
    """One panel per metric: training (blue) and test (red) against the step; the best evaluation's step
    as a green dotted line and the held-out metric's best value as a green dot; resumes as grey dashes."""
    panels = curves.panels()
    rows = max(1, math.ceil(len(panels) / COLUMNS))
    fig = _figure(4.0 * COLUMNS, 2.6 * rows)
    axes = fig.subplots(rows, COLUMNS, squeeze=False, gridspec_kw=dict(
        left=0.06, right=0.985, bottom=0.5 / (2.6 * rows), top=1 - 0.3 / (2.6 * rows), wspace=0.22,
        hspace=0.9 / 2.6)).flatten()
    for ax, panel in zip(axes, panels):
        first = {}  # the first line of each split takes its colour, further ones the others
        for i, (split, key, label) in enumerate(panel.lines):
            steps, values = curves.series[split][key]
            colour = first.setdefault(split, TEST if split == "test" else TRAIN) if split not in first \
                else OTHERS[i % len(OTHERS)]
            style = dict(marker="o", markersize=3) if split == "test" else {}
            ax.plot(steps, values, color=colour, linewidth=1.2, label=label, **style)
        if curves.best_step is not None:
            ax.axvline(curves.best_step, color=BEST, linestyle=":", linewidth=1.2)
            if curves.held_metric in [key for split, key, _ in panel.lines if split == "test"]:
                ax.plot([curves.best_step], [curves.best_value], "o", color=BEST, markersize=7, zorder=3,
                        label=f"best (step {curves.best_step})")
        for step in curves.resumes:
            ax.axvline(step, color=RESUME, linestyle="--", linewidth=1)
        values = [v for split, key, _ in panel.lines for v in curves.series[split][key][1]]
        if panel.log and min(values) > 0 and max(values) > 10 * min(values):  # a log axis where it spans a decade
            ax.set_yscale("log")
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best", framealpha=0.7)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    return fig


def histogram_figure(histogram: Histogram) -> Figure:
    """The test codes' frequencies, most frequent first, with usage and perplexity in the title."""
    fig = _figure(12.0, 2.8)
    ax = fig.subplots(gridspec_kw=dict(left=0.06, right=0.985, bottom=0.17, top=0.9))
    k = len(histogram.sorted_counts)
    total = max(1, sum(histogram.sorted_counts))
    ax.stairs([c / total for c in histogram.sorted_counts], range(k + 1), fill=True, color=TRAIN)  # one artist
    ax.axhline(1 / k, color=BEST, linestyle=":", linewidth=1.2, label=f"uniform (1/{k})")
    ax.set_xlim(0, k)
    ax.set_xlabel(f"code, by frequency ({k} codes)", fontsize=8)
    ax.set_ylabel("share of test codes", fontsize=8)
    ax.set_title(f"{histogram.split} codes: usage {histogram.usage:.1%}, perplexity {histogram.perplexity:.1f} of "
                 f"{k}, {histogram.dead_codes} unused", fontsize=10)
    ax.tick_params(labelsize=8)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    return fig


def sweep_figure(points: list[SweepPoint]) -> Figure:
    """Fidelity (precision) against variety (recall), one labelled point per setting of a sweep, each with its
    share of near-copies of training images."""
    fig = _figure(6.0, 4.2)
    ax = fig.subplots(gridspec_kw=dict(left=0.12, right=0.97, bottom=0.13, top=0.92))
    ax.plot([p.precision for p in points], [p.recall for p in points], "o", color=TEST)
    for p in points:
        copies = f" ({p.copies:.0%} copies)" if p.copies is not None else ""
        ax.annotate(p.label + copies, (p.precision, p.recall), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.margins(0.25)  # room for the labels
    ax.set_xlabel("precision (fidelity)", fontsize=8)
    ax.set_ylabel("recall (variety)", fontsize=8)
    ax.set_title("sampling settings: fidelity against variety", fontsize=10)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    return fig
