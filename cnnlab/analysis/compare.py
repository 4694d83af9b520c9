"""`cnnlab compare PATH...`: tables and training curves over runs, mean ± std over seeds.

The command's orchestration: its options (CompareConfig), then each step in its own module,
pure functions over plain records, each testable alone:

    load.py (files, W&B -> Run) -> group.py (Runs -> Configuration) -> tables.py (Stat, Row;
    markdown, CSV) and curves.py (CurveSet -> PNG in plots.py), and on request pareto.py,
    versus.py (compare.versus) and contrast.py (compare.contrast)

Only finished runs are averaged and drawn; the others are listed with their reason.
"""

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cnnlab.analysis.contrast import write_contrast
from cnnlab.analysis.curves import (
    METRICS,
    common_prefix,
    configuration_curves,
    key_curves,
    matching_keys,
)
from cnnlab.analysis.group import SELECTIONS, Configuration, check_panel_key, group_runs
from cnnlab.analysis.load import Run, load_runs
from cnnlab.analysis.pareto import pareto_markdown, pareto_points, write_pareto
from cnnlab.analysis.plots import YSCALES, CurveSet, plot_curves
from cnnlab.analysis.tables import (
    FailedRun,
    Row,
    failed_csv,
    failed_runs,
    render_markdown,
    table_csv,
    table_rows,
)
from cnnlab.analysis.versus import write_versus
from cnnlab.errors import ConfigError
from cnnlab.registry import described
from cnnlab.runs.rundir import CURVES

COMPARE_DIR = "compare"
TABLE_MD, TABLE_CSV, FAILED_CSV = "table.md", "table.csv", "failed.csv"


@dataclasses.dataclass
class CompareConfig:
    """`compare.KEY=VALUE` options of `cnnlab compare`."""

    output: str | None = described(
        "output folder (null: PATH/compare, or ./compare for several)", None)
    # The files are always written in both formats; csv also writes failed.csv beside it.
    format: str = described("printed: markdown (both tables) | csv (configurations)",
                            "markdown")
    metric: str = described("curves of train/test error (%) | loss", "error")
    # As He et al. 2016 Figure 6 has plain nets left and ResNets right.
    panel_by: str | None = described("a config key: one panel per value (null: one panel)",
                                     None)
    ylim: list[float] | None = described("y-axis range [lo,hi] (null: matplotlib's)", None)
    yscale: str = described("auto (log when curves span > 2 decades), linear, log", "auto")
    # One key: one line per configuration, like `metric`; several: one panel per
    # configuration, one line per key (see key_curves).
    keys: list[str] | None = described(
        "logged keys or globs drawn, not metric (diag/grad_norm/*)", None)
    shade_std: bool = described("shade mean ± std over seeds around each curve", False)
    dpi: int = described("PNG resolution", 150)
    # best: "random restarts", keep the best trial.
    select: str = described("all seeds averaged | best (lowest final validation error)", "all")
    pareto: bool = described("error against multiply-adds, Pareto front: pareto.md/.png",
                             False)
    # cnnlab/analysis/versus.py.
    versus: str | None = described("a config key: final test error against its values", None)
    # Within groups that differ in nothing else (cnnlab/analysis/contrast.py).
    contrast: str | None = described(
        "a config key: its values against the first, Welch's t-test", None)


def parse_config(overrides: Sequence[str]) -> CompareConfig:
    """`compare.KEY=VALUE` strings -> CompareConfig; ConfigError names the bad key."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(CompareConfig), OmegaConf.from_dotlist(
            [o.removeprefix("compare.") for o in overrides]))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = f"compare.{e.full_key}" if getattr(e, "full_key", None) else "compare"
        raise ConfigError(f"{key}: {str(getattr(e, 'msg', e)).splitlines()[0]}") from None
    validate(cfg)
    return cfg


def validate(cfg: CompareConfig) -> None:
    for key, value, valid in (("format", cfg.format, RENDERERS), ("metric", cfg.metric, METRICS),
                              ("yscale", cfg.yscale, YSCALES), ("select", cfg.select, SELECTIONS)):
        if value not in valid:
            raise ConfigError(f"compare.{key}: unknown '{value}'; valid choices: "
                              f"{', '.join(valid)}")
    if cfg.ylim is not None and (len(cfg.ylim) != 2 or not cfg.ylim[0] < cfg.ylim[1]):
        raise ConfigError(f"compare.ylim: expected [lo,hi] with lo < hi, got {cfg.ylim}")
    if cfg.yscale == "log" and cfg.ylim is not None and cfg.ylim[0] <= 0:
        raise ConfigError(f"compare.ylim: a log y-axis (compare.yscale=log) needs lo > 0, got "
                          f"{cfg.ylim}")
    if cfg.dpi <= 0:
        raise ConfigError(f"compare.dpi: must be positive, got {cfg.dpi}")


def output_dir(paths: Sequence[str], cfg: CompareConfig) -> Path:
    if cfg.output is not None:
        return Path(cfg.output)
    if len(paths) == 1 and Path(paths[0]).is_dir():
        return Path(paths[0]) / COMPARE_DIR
    return Path(COMPARE_DIR)


@dataclasses.dataclass(frozen=True)
class Comparison:
    configurations: list[Configuration]
    rows: list[Row]
    failed: list[FailedRun]
    curves: list[CurveSet]
    ylabel: str = METRICS["error"].axis_label
    # False for curves of compare.keys: no train/test line widths in the legend.
    line_styles: bool = True


def build(runs: Sequence[Run], cfg: CompareConfig) -> Comparison:
    """The pure part: runs -> everything the files show."""
    if cfg.panel_by is not None:
        check_panel_key(runs, cfg.panel_by)
    configurations = [SELECTIONS[cfg.select](c) for c in group_runs(runs)]
    tables = (configurations, table_rows(configurations), failed_runs(runs, configurations))
    if cfg.keys is None:
        return Comparison(*tables, configuration_curves(configurations, cfg.metric, cfg.panel_by),
                          METRICS[cfg.metric].axis_label)
    keys = matching_keys(runs, cfg.keys)
    if len(keys) > 1 and cfg.panel_by is not None:
        raise ConfigError(f"compare.keys matches {len(keys)} keys, drawn one panel per "
                          "configuration: compare.panel_by applies to a single key only")
    ylabel = common_prefix(keys).rstrip("/") if len(keys) > 1 else keys[0]
    return Comparison(*tables, key_curves(configurations, keys, cfg.panel_by),
                      ylabel or "value", line_styles=False)


# What `compare.format` prints.
RENDERERS: dict[str, Callable[[Comparison], str]] = {
    "markdown": lambda c: render_markdown(c.rows, c.failed),
    "csv": lambda c: table_csv(c.rows),
}


def write_outputs(comparison: Comparison, out_dir: Path, cfg: CompareConfig) -> list[Path]:
    """table.md, table.csv, failed.csv, (when a finished run logged curves) curves.png, and with
    compare.pareto pareto.md and pareto.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    texts = {TABLE_MD: render_markdown(comparison.rows, comparison.failed),
             TABLE_CSV: table_csv(comparison.rows), FAILED_CSV: failed_csv(comparison.failed)}
    written = []
    for name, text in texts.items():
        (out_dir / name).write_text(text)
        written.append(out_dir / name)
    if comparison.curves:
        written.append(plot_curves(
            comparison.curves, out_dir / CURVES, ylabel=comparison.ylabel, ylim=cfg.ylim,
            shade_std=cfg.shade_std, dpi=cfg.dpi, yscale=cfg.yscale,
            line_styles=comparison.line_styles))
    if cfg.pareto:
        written += write_pareto(comparison.rows, out_dir, cfg.dpi)
    return written


def compare(paths: Sequence[str], cfg: CompareConfig) -> tuple[str, list[Path]]:
    """Load, compare and write; returns (what to print, the files written). With
    compare.versus and compare.contrast, their tables follow the others (versus.py, contrast.py)."""
    comparison = build(load_runs(paths), cfg)
    out_dir = output_dir(paths, cfg)
    try:
        written = write_outputs(comparison, out_dir, cfg)
    except OSError as e:  # e.g. a read-only sweep directory: compare.output=DIR elsewhere
        raise ConfigError(f"cannot write to {out_dir}: {e.strerror or e}; set "
                          "compare.output=DIR") from None
    text = RENDERERS[cfg.format](comparison)
    if cfg.pareto:
        text += "\n" + pareto_markdown(*pareto_points(comparison.rows))
    # After the main files are written: a bad key here still leaves the tables and curves.
    extras = []
    if cfg.versus is not None:
        extras.append(write_versus(comparison.rows, cfg.versus, cfg.panel_by, out_dir, cfg.dpi))
    if cfg.contrast is not None:
        extras.append(write_contrast(comparison.rows, cfg.contrast, out_dir))
    for extra_text, files in extras:
        text += "\n" + extra_text
        written += files
    return text, written
