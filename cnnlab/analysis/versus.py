"""`cnnlab compare ... compare.versus=KEY`: the final test error against one config key.

The figure of a study that varies a setting rather than time, e.g. Yosinski et al. 2014's Fig. 2
(accuracy against the layer a network is cut at): `compare.versus=transfer.load_through` puts the
key's values on the x axis (numbers in order, anything else in order of first appearance), one
line per combination of the other keys that differ (e.g. the transfer mode), a marker at the
mean over seeds and a bar of ± one std. Configurations without the key (null: e.g. training
from scratch, which cuts nowhere) are the reference: a dashed horizontal line across the panel.
`compare.panel_by` gives one panel per value, as for the curves.
"""

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cnnlab.analysis.group import (
    differing_keys,
    display_value,
    panel_title,
    readable_key,
    value_order,
)
from cnnlab.analysis.tables import Row
from cnnlab.errors import ConfigError

VERSUS_PNG, VERSUS_MD = "versus.png", "versus.md"
METRIC = "final_test_error"


@dataclasses.dataclass(frozen=True)
class Point:
    x: Any
    mean: float
    std: float | None


@dataclasses.dataclass(frozen=True)
class Series:
    label: str
    panel: Any
    points: tuple[Point, ...]
    # A configuration without the key: drawn as a horizontal line.
    reference: bool = False


def check_key(rows: Sequence[Row], key: str) -> None:
    if not any(row.config.get(key) is not None for row in rows):
        known = ", ".join(differing_keys([row.config for row in rows])[:8])
        raise ConfigError(f"compare.versus={key}: no compared run sets it; keys that differ "
                          f"here: {known or 'none'}")


def _label_keys(rows: Sequence[Row], others: Sequence[str]) -> list[str]:
    """The keys that tell `rows` apart; none differ: the first key that differs overall (the
    transfer mode, say), so a lone line is still named by what it is."""
    differing = [k for k in others if k in differing_keys([row.config for row in rows])]
    return differing or list(others[:1])


def _series_label(row: Row, keys: Sequence[str]) -> str:
    return ", ".join(f"{readable_key(k)}={display_value(row.config.get(k))}"
                     for k in keys) or "runs"


def versus_series(rows: Sequence[Row], key: str, panel_by: str | None = None) -> list[Series]:
    """One series per (panel, other differing keys), points in x order (module docstring)."""
    check_key(rows, key)
    usable = [row for row in rows if row.stats[METRIC].mean is not None]
    others = [k for k in differing_keys([row.config for row in usable])
              if k not in (key, panel_by)]
    # Keys that differ only between the references and the rest (source=None for scratch)
    # would label every line the same way: keep those that split the lines themselves.
    lines = [row for row in usable if row.config.get(key) is not None]
    references = [row for row in usable if row.config.get(key) is None]
    line_keys = _label_keys(lines, others)
    reference_keys = _label_keys(references, others)
    grouped: dict[tuple, list[Row]] = {}
    for row in usable:
        reference = row.config.get(key) is None
        label = _series_label(row, reference_keys if reference else line_keys)
        panel = row.config.get(panel_by) if panel_by else None
        grouped.setdefault((panel, label, reference), []).append(row)
    xs = _x_order([row.config[key] for row in lines])
    series = []
    for (panel, label, reference), members in grouped.items():
        members.sort(key=lambda row: xs.index(row.config[key]) if not reference else 0)
        points = tuple(Point(row.config.get(key), row.stats[METRIC].mean, row.stats[METRIC].std)
                       for row in members)
        series.append(Series(label, panel, points, reference))
    return series


def _x_order(values: Sequence[Any]) -> list[Any]:
    distinct = list(dict.fromkeys(values))
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in distinct):
        return sorted(distinct)
    return distinct


def versus_markdown(series: Sequence[Series], key: str, panel_by: str | None) -> str:
    xs = _x_order([p.x for s in series if not s.reference for p in s.points])
    header = ([readable_key(panel_by)] if panel_by else []) + ["configuration"] + [
        display_value(x) for x in xs] + ["(no " + readable_key(key) + ")"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in sorted(series, key=lambda s: value_order(s.panel)):
        by_x = {p.x: p for p in s.points}
        cells = [_cell(by_x.get(x)) for x in xs] + [_cell(s.points[0]) if s.reference else ""]
        lines.append("| " + " | ".join(([display_value(s.panel)] if panel_by else [])
                                       + [s.label] + cells) + " |")
    return (f"## Final test error (%) against {readable_key(key)}\n\n" + "\n".join(lines)
            + "\n")


def _cell(point: Point | None) -> str:
    if point is None:
        return ""
    return f"{point.mean:.2f}" + ("" if point.std is None else f" ± {point.std:.2f}")


def versus_figure(series: Sequence[Series], key: str, panel_by: str | None) -> Any:
    from matplotlib.figure import Figure

    panels = sorted({s.panel for s in series}, key=value_order)
    xs = _x_order([p.x for s in series if not s.reference for p in s.points])
    labels = [display_value(x) for x in xs]
    width = max(4.2, 0.9 * len(labels) + 0.08 * sum(len(label) for label in labels))
    fig = Figure(figsize=(width * len(panels) + 2.4, 3.6), layout="constrained")
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    colors: dict[str, str] = {}
    for ax, panel in zip(axes, panels, strict=True):
        for s in (s for s in series if s.panel == panel):
            color = colors.setdefault(s.label, f"C{len(colors)}")
            if s.reference:
                ax.axhline(s.points[0].mean, color=color, linestyle="--", linewidth=1.2,
                           label=s.label)
                continue
            ax.errorbar([xs.index(p.x) for p in s.points], [p.mean for p in s.points],
                        yerr=[p.std or 0.0 for p in s.points], marker="o", capsize=3,
                        color=color, label=s.label)
        ax.set_xticks(range(len(xs)), labels)
        ax.set_xlabel(readable_key(key))
        ax.grid(alpha=0.3)
        if panel_by:
            ax.set_title(panel_title(panel_by, panel), fontsize=10)
    axes[0].set_ylabel("final test error (%)")
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes[1:]:
        more = ax.get_legend_handles_labels()
        for h, label in zip(*more, strict=True):
            if label not in labels:
                handles.append(h)
                labels.append(label)
    fig.legend(handles, labels, loc="outside right center", fontsize=8)
    return fig


def write_versus(rows: Sequence[Row], key: str, panel_by: str | None, out_dir: Path,
                 dpi: int = 150) -> tuple[str, list[Path]]:
    """versus.md and versus.png in `out_dir`; returns (the markdown, the files)."""
    from cnnlab.analysis.plots import save_figure

    series = versus_series(rows, key, panel_by)
    text = versus_markdown(series, key, panel_by)
    (out_dir / VERSUS_MD).write_text(text)
    return text, [out_dir / VERSUS_MD,
                  save_figure(versus_figure(series, key, panel_by), out_dir / VERSUS_PNG, dpi)]
