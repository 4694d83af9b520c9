"""Training curves as PNG, in the style of He et al. 2016 (Deep Residual Learning), Fig. 1/4/6.

Error (or loss) against iterations: thin lines train, bold lines test, one colour per
configuration, optionally one panel per value of a config key. Figures are built on
matplotlib's Figure/Agg canvas without pyplot: no global figure state or GUI backend, and a
quick import, since train.py draws every run's curves at its end.
"""

import dataclasses
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cnnlab.rundir import RunDir

if TYPE_CHECKING:
    from matplotlib.figure import Figure

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


@dataclasses.dataclass(frozen=True)
class CurveSet:
    """One configuration's lines in a figure."""

    label: str
    train: Curve | None
    test: Curve | None
    panel: str | None = None  # panel title (panel_by's key=value); None: the only panel


TRAIN_WIDTH = 0.8
TEST_WIDTH = 2.2
PANEL_SIZE = (6.0, 4.5)  # inches per panel
LABEL_WIDTH, LABEL_CHARS = 48, 144  # legend labels: wrapped, then cut
STYLE_COLOR = "0.35"  # the legend's "train"/"test" entries: line width only, no configuration


def _colors(count: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if count <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(count)]


def curves_figure(curve_sets: Sequence[CurveSet], ylabel: str = "error (%)",
                  ylim: Sequence[float] | None = None, shade_std: bool = False) -> "Figure":
    """One line pair per configuration; the data lines carry gid `train:LABEL` / `test:LABEL`."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    panels = list(dict.fromkeys(cs.panel for cs in curve_sets)) or [None]
    fig = Figure(figsize=(PANEL_SIZE[0] * len(panels), PANEL_SIZE[1]), layout="constrained")
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    handles: dict[int, list[Line2D]] = {i: [] for i in range(len(panels))}
    for cs, color in zip(curve_sets, _colors(len(curve_sets)), strict=True):
        index = panels.index(cs.panel)
        ax = axes[index]
        for kind, curve, width in (("train", cs.train, TRAIN_WIDTH), ("test", cs.test,
                                                                       TEST_WIDTH)):
            if curve is None:
                continue
            # A lone point (a test error logged only at the end) needs a marker to be seen.
            (line,) = ax.plot(curve.steps, curve.mean, color=color, linewidth=width,
                              marker="o" if len(curve.steps) == 1 else None, label="_data")
            line.set_gid(f"{kind}:{cs.label}")
            if shade_std and curve.n > 1:
                ax.fill_between(curve.steps, curve.mean - curve.std, curve.mean + curve.std,
                                color=color, alpha=0.15, linewidth=0)
        # Long labels (many differing keys) are wrapped so the legend leaves room to plot.
        label = textwrap.fill(textwrap.shorten(cs.label, LABEL_CHARS, placeholder=" …"),
                              LABEL_WIDTH)
        handles[index].append(Line2D([], [], color=color, linewidth=1.5, label=label))
    for index, ax in enumerate(axes):
        style = [Line2D([], [], color=STYLE_COLOR, linewidth=TRAIN_WIDTH, label="train"),
                 Line2D([], [], color=STYLE_COLOR, linewidth=TEST_WIDTH, label="test")]
        ax.legend(handles=handles[index] + style, fontsize=8, loc="upper right")
        ax.set_xlabel("iterations")
        ax.grid(alpha=0.3)
        if panels[index] is not None:
            ax.set_title(panels[index], fontsize=10)
    axes[0].set_ylabel(ylabel)
    if ylim is not None:
        axes[0].set_ylim(*ylim)  # shared by all panels
    return fig


def save_figure(fig: "Figure", path: Path, dpi: int = 150) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def plot_curves(curve_sets: Sequence[CurveSet], path: Path, ylabel: str = "error (%)",
                ylim: Sequence[float] | None = None, shade_std: bool = False,
                dpi: int = 150) -> Path:
    """Draw `curves_figure(...)` into the PNG `path`; returns `path`."""
    return save_figure(curves_figure(curve_sets, ylabel, ylim, shade_std), path, dpi)


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
    metrics = [run_dir.read_metrics()]
    train, test = mean_curve(metrics, "train/error"), mean_curve(metrics, "test/error")
    if train is None and test is None:
        return None
    return plot_curves([CurveSet(_run_label(run_dir), train, test)], path)
