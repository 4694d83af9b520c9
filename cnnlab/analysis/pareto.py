"""Pareto: each configuration's mean error against its multiply-adds, the front marked
(`compare.pareto`: pareto.md and pareto.png)."""

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from cnnlab.analysis.plots import plot_pareto
from cnnlab.analysis.tables import COLUMNS, CONFIGURATION, Row, format_count, markdown_grid

PARETO_MD, PARETO_PNG = "pareto.md", "pareto.png"


@dataclasses.dataclass(frozen=True)
class ParetoPoint:
    """A configuration's mean error (%) and cost; `on_front`: no other configuration is at
    most as costly and as wrong, and better in one."""

    label: str
    macs: float
    params: float | None
    error: float
    on_front: bool


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points (cost, error) that no other point dominates, both minimized: j
    dominates i when cost_j <= cost_i and error_j <= error_i, one of them strictly. Equal points
    are all kept. Ordered by cost, then error."""
    front = [i for i, (x, y) in enumerate(points)
             if not any(x2 <= x and y2 <= y and (x2 < x or y2 < y) for x2, y2 in points)]
    return sorted(front, key=lambda i: points[i])


def pareto_points(rows: Sequence[Row]) -> tuple[str, list[ParetoPoint]]:
    """(the error column used, the points): the validation error when any configuration has
    one (what a search minimizes), else the test error; configurations without MACs (runs of
    older versions) or without that error are left out."""
    metric = ("final_val_error" if any(row.stats["final_val_error"].n for row in rows)
              else "final_test_error")
    usable = [row for row in rows
              if row.stats["macs"].mean is not None and row.stats[metric].mean is not None]
    front = set(pareto_front([(row.stats["macs"].mean, row.stats[metric].mean)
                              for row in usable]))
    return metric, [ParetoPoint(row.label, row.stats["macs"].mean, row.stats["params"].mean,
                                row.stats[metric].mean, i in front)
                    for i, row in enumerate(usable)]


def pareto_markdown(metric: str, points: Sequence[ParetoPoint]) -> str:
    """The points by cost, front first, as a markdown table."""
    header = [CONFIGURATION, "MACs", "params", next(c.header for c in COLUMNS if c.name == metric),
              "Pareto front"]
    ordered = sorted(points, key=lambda p: (not p.on_front, p.macs, p.error))
    cells = [[p.label, format_count(p.macs), "" if p.params is None else format_count(p.params),
              f"{p.error:.2f}", "yes" if p.on_front else ""] for p in ordered]
    table = markdown_grid(header, cells, [False, True, True, True, False])
    return f"## Error against multiply-adds (Pareto front first)\n\n{table}\n"


def write_pareto(rows: Sequence[Row], out_dir: Path, dpi: int = 150) -> list[Path]:
    metric, points = pareto_points(rows)
    (out_dir / PARETO_MD).write_text(pareto_markdown(metric, points))
    ylabel = next(c.header for c in COLUMNS if c.name == metric)
    return [out_dir / PARETO_MD, plot_pareto(
        [(p.label, p.macs, p.error, p.on_front) for p in points], out_dir / PARETO_PNG,
        ylabel=ylabel, dpi=dpi)]
