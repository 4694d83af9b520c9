"""Training curves as PNG, in the style of He et al. 2016 (Deep Residual Learning), Fig. 1/4/6.

Error (or loss) against iterations: thin lines train, bold lines test, one colour per
configuration, optionally one panel per value of a config key, faint vertical lines where the
learning rate drops. Figures are built on matplotlib's Figure/Agg canvas without pyplot: no
global figure state or GUI backend, and a quick import, since train.py draws every run's curves
at its end.
"""

import dataclasses
import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cnnlab.runs.rundir import RunDir

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

@dataclasses.dataclass(frozen=True)
class Curve:
    steps: np.ndarray
    mean: np.ndarray
    std: np.ndarray  # zeros for one seed
    n: int  # seeds averaged


def mean_curve(histories: Sequence[Sequence[dict[str, Any]]], key: str) -> Curve | None:
    """Mean and std over runs of `key` at the steps every run logged it; None if there are none.

    Runs that never logged `key` are left out rather than emptying the intersection.
    """
    per_run = [{e["step"]: float(e[key]) for e in history
                if isinstance(e.get(key), int | float)} for history in histories]
    per_run = [values for values in per_run if values]
    if not per_run:
        return None
    steps = sorted(set.intersection(*(set(values) for values in per_run)))
    if not steps:
        return None
    table = np.array([[values[s] for s in steps] for values in per_run])
    std = table.std(axis=0, ddof=1) if len(per_run) > 1 else np.zeros(len(steps))
    return Curve(np.array(steps), table.mean(axis=0), std, len(per_run))


# A drop is a fall of the logged lr by at least this factor right after a plateau (two equal
# logged values): step and plateau schedules drop that way, while a cosine or linear decay,
# whose last values also fall by large factors, never has a plateau before them.
LR_DROP_FACTOR = 2.0


def lr_drops(history: Sequence[dict[str, Any]]) -> tuple[int, ...]:
    """The last logged step before each learning-rate drop in one run's metrics.

    metrics.jsonl logs at step s the lr of step s, so the new rate starts right after the
    returned step (exactly when lr is logged every step, within log_every otherwise).
    """
    logged = [(e["step"], float(e["lr"])) for e in history
              if isinstance(e.get("lr"), int | float) and math.isfinite(e["lr"])]
    return tuple(
        logged[i - 1][0] for i in range(2, len(logged))
        if logged[i][1] * LR_DROP_FACTOR <= logged[i - 1][1]
        and math.isclose(logged[i - 1][1], logged[i - 2][1], rel_tol=1e-6))


@dataclasses.dataclass(frozen=True)
class CurveSet:
    """One configuration's lines in a figure."""

    label: str
    train: Curve | None
    test: Curve | None
    panel: str | None = None  # panel title; None: the only panel
    lr_drops: tuple[int, ...] = ()  # steps after which the learning rate drops


TRAIN_WIDTH = 0.8
TEST_WIDTH = 1.6
# Curves with few points get a marker on each, so that two evaluations joined by a bold line
# read as two measurements, not as a trend.
MARKER_MAX_POINTS = 20
MARKER_SIZE = {"train": 2.5, "test": 4.0}
PANEL_SIZE = (6.0, 4.5)  # inches per panel
LEGEND_WIDTH = 2.6  # inches added on the right for the legend, outside every panel
LABEL_WIDTH, LABEL_CHARS = 32, 144  # legend labels: wrapped, then cut
STYLE_COLOR = "0.35"  # the legend's "train"/"test" entries: line width only, no configuration
LR_DROP_STYLE = {"color": "0.55", "linewidth": 0.8, "linestyle": ":", "zorder": 0}
# y-axis "auto": logarithmic when the plotted means span more than two decades (a test loss of
# 4000 next to a train loss of 0.1), linear otherwise.
LOG_SPAN = 100.0
YSCALES = ("auto", "linear", "log")


def _colors(count: int) -> list:
    from matplotlib import colormaps

    if count > 20:  # e.g. one line per layer: a gradient (shallow to deep) beats repeats
        cmap = colormaps["viridis"]
        return [cmap(i / (count - 1)) for i in range(count)]
    cmap = colormaps["tab10" if count <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(count)]


def compact_count(value: float, pos: int | None = None) -> str:
    """An iteration count as a tick label: 500, 2k, 32k, 1.5M."""
    for scale, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:g}{suffix}"
    return f"{value:g}"


def choose_yscale(curve_sets: Sequence[CurveSet], ylim: Sequence[float] | None = None,
                  yscale: str = "auto") -> str:
    """'linear' or 'log'; "auto" is log only for positive means spanning > LOG_SPAN."""
    if yscale != "auto":
        return yscale
    means = [c.mean for cs in curve_sets for c in (cs.train, cs.test) if c is not None]
    values = np.concatenate(means) if means else np.array([])
    values = values[np.isfinite(values)]
    fits = ylim is None or ylim[0] > 0  # a range from 0 cannot be drawn on a log axis
    span = values.size and values.min() > 0 and values.max() / values.min() > LOG_SPAN
    return "log" if span and fits else "linear"


def _draw_curve(ax: "Axes", curve: Curve, kind: str, color: Any, label: str,
                shade_std: bool) -> None:
    few = len(curve.steps) <= MARKER_MAX_POINTS
    (line,) = ax.plot(curve.steps, curve.mean, color=color,
                      linewidth=TEST_WIDTH if kind == "test" else TRAIN_WIDTH,
                      marker="o" if few else None, markersize=MARKER_SIZE[kind], label="_data")
    line.set_gid(f"{kind}:{label}")
    if shade_std and curve.n > 1:
        ax.fill_between(curve.steps, curve.mean - curve.std, curve.mean + curve.std,
                        color=color, alpha=0.15, linewidth=0)


def _draw_lr_drops(ax: "Axes", steps: Sequence[int]) -> None:
    for step in sorted(set(steps)):
        ax.axvline(step, **LR_DROP_STYLE, label="_lr_drop").set_gid(f"lr-drop:{step}")


def _style_axes(ax: "Axes", title: str | None, yscale: str) -> None:
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    ax.set_xlabel("iterations")
    ax.set_yscale(yscale)
    # Iterations are whole numbers; large ones shown as 32k.
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.xaxis.set_major_formatter(FuncFormatter(compact_count))
    ax.grid(alpha=0.3)
    if title is not None:
        ax.set_title(title, fontsize=10)


def _legend_handles(labels: Sequence[str], colors: Sequence[Any],
                    line_styles: bool = True) -> list["Line2D"]:
    from matplotlib.lines import Line2D

    # Long labels (many differing keys) are wrapped so the legend stays narrow.
    handles = [Line2D([], [], color=color, linewidth=1.5, label=textwrap.fill(
        textwrap.shorten(label, LABEL_CHARS, placeholder=" …"), LABEL_WIDTH))
        for label, color in zip(labels, colors, strict=True)]
    if not line_styles:
        return handles
    return handles + [
        Line2D([], [], color=STYLE_COLOR, linewidth=TRAIN_WIDTH, label="train"),
        Line2D([], [], color=STYLE_COLOR, linewidth=TEST_WIDTH, label="test")]


def curves_figure(curve_sets: Sequence[CurveSet], ylabel: str = "error (%)",
                  ylim: Sequence[float] | None = None, shade_std: bool = False,
                  yscale: str = "auto", line_styles: bool = True) -> "Figure":
    """One line pair per configuration; panels in order of first appearance.

    The data lines carry gid `train:LABEL` / `test:LABEL`, the lr-drop lines `lr-drop:STEP`.
    One legend for all panels, outside them on the right, so it never hides a curve. Curve
    sets with the same label (one layer's curves in several panels) share a colour and a legend
    entry. `line_styles=False` leaves the "train"/"test" line widths out of the legend (curves
    of other logged keys, drawn thin as train curves).
    """
    from matplotlib.figure import Figure

    panels = list(dict.fromkeys(cs.panel for cs in curve_sets)) or [None]
    fig = Figure(figsize=(PANEL_SIZE[0] * len(panels) + LEGEND_WIDTH, PANEL_SIZE[1]),
                 layout="constrained")
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    labels = list(dict.fromkeys(cs.label for cs in curve_sets))
    colors = _colors(len(labels))
    for cs in curve_sets:
        ax, color = axes[panels.index(cs.panel)], colors[labels.index(cs.label)]
        for kind, curve in (("train", cs.train), ("test", cs.test)):
            if curve is not None:
                _draw_curve(ax, curve, kind, color, cs.label, shade_std)
    scale = choose_yscale(curve_sets, ylim, yscale)
    for ax, panel in zip(axes, panels, strict=True):
        _draw_lr_drops(ax, [s for cs in curve_sets if cs.panel == panel for s in cs.lr_drops])
        _style_axes(ax, panel, scale)
    axes[0].set_ylabel(ylabel)
    if ylim is not None:
        axes[0].set_ylim(*ylim)  # shared by all panels
    fig.legend(handles=_legend_handles(labels, colors, line_styles), fontsize=8,
               loc="outside right upper")
    return fig


def save_figure(fig: "Figure", path: Path, dpi: int = 150) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def plot_curves(curve_sets: Sequence[CurveSet], path: Path, ylabel: str = "error (%)",
                ylim: Sequence[float] | None = None, shade_std: bool = False,
                dpi: int = 150, yscale: str = "auto", line_styles: bool = True) -> Path:
    """Draw `curves_figure(...)` into the PNG `path`; returns `path`."""
    return save_figure(curves_figure(curve_sets, ylabel, ylim, shade_std, yscale, line_styles),
                       path, dpi)


def _run_label(run_dir: RunDir) -> str:
    summary = run_dir.read_summary() or {}
    if "model" in summary and "dataset" in summary:
        return f"{summary['model']} on {summary['dataset']}"
    return run_dir.path.name


def plot_run(run_dir: RunDir | Path, path: Path) -> Path | None:
    """One run's train and test error curves from its metrics.jsonl into the PNG `path`.

    Returns `path`, or None when the run logged no error yet. No JAX: train.py calls it after
    every run to put the figure in W&B.
    """
    run_dir = RunDir(run_dir) if not isinstance(run_dir, RunDir) else run_dir
    history = run_dir.read_metrics()
    train, test = mean_curve([history], "train/error"), mean_curve([history], "test/error")
    if train is None and test is None:
        return None
    return plot_curves([CurveSet(_run_label(run_dir), train, test,
                                 lr_drops=lr_drops(history))], path)


# Confusion matrices: counts are written in the cells up to this many classes (10 classes at
# CONFUSION_CELL inches per cell stay readable); beyond, only the colours and no tick labels.
CONFUSION_ANNOTATE_MAX = 30
CONFUSION_CELL = 0.55  # inches per class
CONFUSION_MIN_SIDE = 5.0  # inches


def confusion_figure(counts: np.ndarray, class_names: Sequence[str],
                     title: str | None = None) -> "Figure":
    """A (K, K) confusion matrix (row: true class, column: predicted), coloured by the row's
    fraction so that rare and common classes read alike, each cell annotated with its count."""
    from matplotlib.figure import Figure

    counts = np.asarray(counts)
    k = counts.shape[0]
    rows = counts.sum(axis=1, keepdims=True)
    fractions = np.divide(counts, rows, out=np.zeros(counts.shape, float), where=rows > 0)
    # Only annotated cells need their CONFUSION_CELL inches: ImageNet's 1000 classes at that
    # size would be a 60,000-pixel square (27 GB to draw).
    side = max(CONFUSION_MIN_SIDE, CONFUSION_CELL * min(k, CONFUSION_ANNOTATE_MAX) + 2.5)
    fig = Figure(figsize=(side + 1.0, side), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(fractions, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, shrink=0.8, label="fraction of the true class")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if title is not None:
        ax.set_title(title, fontsize=10)
    if k <= CONFUSION_ANNOTATE_MAX:
        ax.set_xticks(range(k), list(class_names), rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(k), list(class_names), fontsize=8)
        for (i, j), count in np.ndenumerate(counts):
            # Dark text on light cells, light text on dark ones.
            color = "white" if fractions[i, j] > 0.5 else "black"
            ax.text(j, i, str(count), ha="center", va="center", fontsize=7, color=color)
    return fig
# ------------------------------------------------------------- error against multiply-adds

FRONT_COLOR, OTHER_COLOR = "tab:red", "0.6"
PARETO_LABEL_CHARS = 48


def pareto_figure(points: Sequence[tuple[str, float, float, bool]],
                  ylabel: str = "error (%)") -> "Figure":
    """(label, multiply-adds, error, on the front) per configuration: every point grey, the
    front red, joined by the staircase of the best error reachable at each cost, each front
    point labelled. The x axis is logarithmic (costs of a search span decades). Front points
    carry gid `front:LABEL`, the others `point:LABEL`."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig = Figure(figsize=PANEL_SIZE, layout="constrained")
    ax = fig.subplots()
    for label, macs, error, on_front in points:
        ax.plot([macs], [error], "o", color=FRONT_COLOR if on_front else OTHER_COLOR,
                markersize=5 if on_front else 4,
                gid=f"{'front' if on_front else 'point'}:{label}")
    front = sorted((macs, error, label) for label, macs, error, on_front in points if on_front)
    if front:
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color=FRONT_COLOR,
                linewidth=1.0, label="Pareto front")
        for macs, error, label in front:
            ax.annotate(textwrap.shorten(label, PARETO_LABEL_CHARS, placeholder=" …"),
                        (macs, error), fontsize=6, xytext=(4, 4), textcoords="offset points")
        ax.legend(fontsize=8)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(compact_count))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("multiply-adds per image")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig


def plot_pareto(points: Sequence[tuple[str, float, float, bool]], path: Path,
                ylabel: str = "error (%)", dpi: int = 150) -> Path:
    """Draw `pareto_figure(points)` into the PNG `path`; returns `path`."""
    return save_figure(pareto_figure(points, ylabel), path, dpi)
