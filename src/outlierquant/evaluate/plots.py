"""The analysis report's figures (matplotlib, Agg backend, PNG).

Every function draws one figure from plain numbers and writes it to a path; nothing here
runs a model. :func:`write_plots` draws the set a report needs and returns
``{key: path}``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    from outlierquant.evaluate.report_data import AnalysisReport

logger = logging.getLogger(__name__)

_DPI = 110
_BAR = "#3b6ea5"
_HOT = "#c0392b"
_OK = "#7fa8cf"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=_DPI, bbox_inches="tight", facecolor="white")
    _pyplot().close(fig)
    return path


def _row_height(rows: int) -> float:
    return max(2.6, min(0.2 * rows + 1.2, 26.0))


def channel_heatmap(
    labels: Sequence[str],
    absmax: np.ndarray,
    path: Path,
    *,
    threshold: float,
    recurring: Sequence[int] = (),
    title: str = "",
) -> Path:
    """Layers × channels heatmap of per-channel abs-max, log colour scale, recurring channels marked."""
    from matplotlib.colors import LogNorm

    plt = _pyplot()
    rows, channels = absmax.shape
    positive = absmax[absmax > 0]
    low = max(float(np.percentile(positive, 1)) if positive.size else 1e-3, 1e-4)
    high = max(float(absmax.max()), threshold * 1.5, low * 10)
    fig_height = max(2.8, min(0.24 * rows + 1.6, 22.0))
    fig, ax = plt.subplots(figsize=(12.5, fig_height))
    image = ax.imshow(
        np.maximum(absmax, low),
        aspect="auto",
        interpolation="nearest",
        cmap="magma",
        norm=LogNorm(vmin=low, vmax=high),
    )
    ax.set_yticks(range(rows))
    ax.set_yticklabels(labels, fontsize=7.5 if rows > 20 else 8.5)
    ax.set_xlabel("channel")
    bar = fig.colorbar(image, ax=ax, pad=0.01, fraction=0.03)
    bar.set_label("max |x| (log)")
    bar.ax.axhline(threshold, color="#2ecc71", linewidth=2)
    bar.ax.text(1.05, threshold, f" {threshold:g}", transform=bar.ax.get_yaxis_transform(), va="center",
                fontsize=8, color="#1e8449")
    if len(recurring):
        # triangles just above the top edge, in axes coordinates so the image keeps its limits
        ax.scatter(list(recurring), [1.0 + 0.06 / fig_height] * len(recurring), marker="v", s=46,
                   transform=ax.get_xaxis_transform(), color="#e74c3c", clip_on=False, zorder=5,
                   edgecolors="white", linewidths=0.5)
        top = ax.secondary_xaxis("top")
        shown = list(recurring)[:24]
        top.set_xticks(shown)
        top.set_xticklabels([str(c) for c in shown], fontsize=8, color="#c0392b", rotation=90 if len(shown) > 8 else 0)
        top.tick_params(length=0, pad=12)
    if title:
        ax.set_title(title, fontsize=11, loc="left", pad=26 if len(recurring) else 6)
    return _save(fig, path)


def layer_bars(
    labels: Sequence[str],
    values: Sequence[float],
    path: Path,
    *,
    xlabel: str,
    title: str = "",
    log: bool = False,
    reference: float | None = None,
    reference_label: str = "",
    hot: Sequence[bool] | None = None,
    hatched: Sequence[bool] | None = None,
) -> Path:
    """Horizontal bars, one per layer in graph order (top to bottom)."""
    plt = _pyplot()
    values = np.array([v if v is not None and math.isfinite(v) else np.nan for v in values], dtype=float)
    rows = len(labels)
    fig, ax = plt.subplots(figsize=(6.4, _row_height(rows)))
    positions = np.arange(rows)
    colours = [_HOT if h else _BAR for h in (hot if hot is not None else [False] * rows)]
    shown = np.nan_to_num(values, nan=0.0)
    if log:
        shown = np.where(shown > 0, shown, np.nan)
    bars = ax.barh(positions, shown, color=colours, height=0.72)
    if hatched is not None:
        for bar_patch, flag in zip(bars, hatched):
            if flag:
                bar_patch.set_hatch("///")
                bar_patch.set_edgecolor("white")
    ax.set_yticks(positions)
    ax.set_yticklabels(labels, fontsize=7 if rows > 40 else 8)
    ax.invert_yaxis()
    if log:
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    if reference is not None:
        ax.axvline(reference, color="#555", linestyle="--", linewidth=1)
        if reference_label:
            ax.text(reference, 1.0, f" {reference_label}", transform=ax.get_xaxis_transform(), fontsize=7.5,
                    color="#555", ha="left", va="bottom")
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    if title:
        ax.set_title(title, fontsize=10.5, loc="left")
    return _save(fig, path)


def write_plots(report: "AnalysisReport", out_dir: Path) -> dict[str, Path]:
    """Draw every figure the report shows; returns ``{key: path}``."""
    out_dir = Path(out_dir)
    plots: dict[str, Path] = {}
    t = report.threshold
    by_width: dict[int, list] = {}
    for s in report.inputs:
        by_width.setdefault(s.channels, []).append(s)
    for width, group in sorted(by_width.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        key = f"heatmap_{width}"
        plots[key] = channel_heatmap(
            [s.label for s in group],
            np.stack([s.absmax for s in group]),
            out_dir / f"{key}.png",
            threshold=t,
            recurring=report.recurring.get(width, []),
            title=f"{len(group)} layer inputs of width {width}",
        )
    labels = [s.label for s in report.inputs]
    hot = [bool(s.outlier_channels(t)) for s in report.inputs]
    plots["ratio"] = layer_bars(
        labels, [s.ratio for s in report.inputs], out_dir / "ratio.png",
        xlabel="max / median of channel abs-max (log)", log=True, hot=hot,
        title=f"red: an input with a channel ≥ {t:g}",
    )
    plots["kurtosis"] = layer_bars(
        labels, [s.kurtosis for s in report.inputs], out_dir / "kurtosis.png",
        xlabel="kurtosis (log)", log=True, reference=3.0, reference_label="Gaussian", hot=hot,
        title="kurtosis of the input's values",
    )
    if report.fidelity:
        plots["sqnr"] = layer_bars(
            [f.label for f in report.fidelity], [f.sqnr_db for f in report.fidelity], out_dir / "sqnr.png",
            xlabel="SQNR of the linear output vs fp32 (dB)",
            hot=[f.sqnr_db < 20 for f in report.fidelity],
            hatched=[f.aligned for f in report.fidelity],
            reference=20.0, reference_label="20 dB",
            title="red: below 20 dB",
        )
    if report.sensitivity:
        top = report.sensitivity[:30]
        plots["sensitivity"] = layer_bars(
            [s.label for s in top], [max(s.loss, 1e-9) for s in top], out_dir / "sensitivity.png",
            xlabel="1 − cosine of the model output (log)", log=True,
            title="most sensitive first",
        )
    logger.info("wrote %d plots to %s", len(plots), out_dir)
    return plots
