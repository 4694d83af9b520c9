"""Tables: configurations -> rows of mean ± std over finished seeds, as markdown and CSV.

One row per configuration (table.md, table.csv), one per run not averaged (failed.csv), each
with a column per config key that differs between the configurations compared.
"""

import csv
import dataclasses
import io
import math
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from cnnlab.analysis.group import (
    Configuration,
    differing_keys,
    display_value,
    distinguishing_keys,
    format_value,
)
from cnnlab.analysis.load import Run, summary_numbers

if TYPE_CHECKING:
    import pandas as pd  # imported where tables are made: `cnnlab train` never needs it


@dataclasses.dataclass(frozen=True)
class Stat:
    mean: float | None
    std: float | None  # sample std (ddof=1); None for fewer than 2 values
    n: int


def mean_std(values: Sequence[float]) -> Stat:
    if not values:
        return Stat(None, None, 0)
    array = np.asarray(values, dtype=float)
    std = float(array.std(ddof=1)) if len(array) > 1 else None
    return Stat(float(array.mean()), std, len(array))


@dataclasses.dataclass(frozen=True)
class Column:
    """A table column: mean ± std over finished seeds of one summary.json key."""

    name: str  # CSV: <name>_mean, <name>_std
    key: str
    header: str
    fmt: Callable[[float], str]
    spread: bool = True  # False: the same for every seed (architecture): show the value only
    optional: bool = False  # left out when no finished run has it (val split, older runs)


def _fixed(digits: int) -> Callable[[float], str]:
    return lambda value: f"{value:.{digits}f}"


def format_count(value: float) -> str:
    """A count as the papers' tables write it: 0.27M parameters, 1.82G multiply-adds."""
    if value >= 1e9:
        return f"{value / 1e9:.2f}G"
    return f"{value / 1e6:.2f}M" if value >= 1e5 else f"{value:,.0f}"


COLUMNS = (
    Column("final_test_error", "final/test/error", "final test error (%)", _fixed(2)),
    Column("best_test_error", "best/test/error", "best test error (%)", _fixed(2)),
    Column("final_train_error", "final/train/error", "final train error (%)", _fixed(2)),
    Column("final_val_error", "final/val/error", "final val error (%)", _fixed(2),
           optional=True),
    Column("best_val_error", "best/val/error", "best val error (%)", _fixed(2), optional=True),
    Column("params", "params", "params", format_count, spread=False),
    Column("macs", "macs", "MACs", format_count, spread=False, optional=True),
    Column("images_per_sec", "images_per_sec", "images/s", _fixed(0)),
    Column("wall_time", "wall_time", "wall time (s)", _fixed(0)),
)


@dataclasses.dataclass(frozen=True)
class Row:
    label: str
    finished: int
    runs: int
    stats: dict[str, Stat]  # by column name
    config: dict[str, Any] = dataclasses.field(default_factory=dict)  # for the key columns


def table_rows(configurations: Sequence[Configuration]) -> list[Row]:
    return [
        Row(c.label, len(c.finished), len(c.runs),
            {col.name: mean_std(summary_numbers(c.finished, col.key)) for col in COLUMNS}, c.config)
        for c in configurations
    ]


def table_columns(rows: Sequence[Row]) -> list[Column]:
    """The columns to show: optional ones only when some row has a value."""
    return [col for col in COLUMNS
            if not col.optional or any(row.stats[col.name].n for row in rows)]


@dataclasses.dataclass(frozen=True)
class FailedRun:
    run: str
    label: str
    seed: Any
    status: str
    step: Any  # final_step, else the last step logged (a running or killed run); None: none
    reason: str | None
    config: dict[str, Any] = dataclasses.field(default_factory=dict)  # for the key columns
    keys: tuple[str, ...] = ()  # the keys that vary across all configurations compared


def failed_runs(runs: Sequence[Run], configurations: Sequence[Configuration]) -> list[FailedRun]:
    """The runs not averaged, in the order given (job order), with their configuration and
    the keys that vary across every configuration compared (so its columns are table.csv's)."""
    of_run = {id(run): c for c in configurations for run in c.runs}
    keys = tuple(differing_keys([c.config for c in configurations]))
    return [FailedRun(run.name, of_run[id(run)].label, run.seed, run.status, _reached(run),
                      run.reason, of_run[id(run)].config, keys)
            for run in runs if not run.finished]


def _reached(run: Run) -> int | None:
    """How far an unfinished run got: its final step, else the last one it logged."""
    if (step := run.summary.get("final_step")) is not None:
        return step
    return max((int(e["step"]) for e in run.metrics if "step" in e), default=None)


def format_stat(stat: Stat, column: Column) -> str:
    if stat.mean is None:
        return "-"
    if stat.std is None or not column.spread:
        return column.fmt(stat.mean)
    return f"{column.fmt(stat.mean)} ± {column.fmt(stat.std)}"


def _cell(value: Any) -> str:
    text = "-" if value is None or value == "" else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_grid(headers: Sequence[str], rows: Iterable[Sequence[Any]],
              right: Sequence[bool]) -> str:
    """A markdown table; `right`: which columns are right-aligned (the numbers)."""
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---:" if r else "---" for r in right) + "|"]
    lines += ["| " + " | ".join(map(_cell, row)) + " |" for row in rows]
    return "\n".join(lines)


CONFIGURATION = "configuration"  # the label column, when no config key varies


def _key_cells(row: Row, keys: Sequence[str], value: Callable[[Any], Any]) -> list[Any]:
    """The row's value of each varying key (None where it has no such key); with no varying
    key, the configuration's label, so that a lone configuration still says what ran."""
    if not keys:
        return [row.label]
    return [value(row.config[k]) if k in row.config else None for k in keys]


def markdown_table(rows: Sequence[Row]) -> str:
    """One column per differing config key (the fewest that tell the rows apart when more than
    MAX_LABEL_KEYS differ: table.csv has them all), then seeds and the statistics."""
    columns = table_columns(rows)
    keys = distinguishing_keys([row.config for row in rows])
    return markdown_grid(
        [*(keys or [CONFIGURATION]), "seeds", *(col.header for col in columns)],
        ([*_key_cells(row, keys, display_value), f"{row.finished}/{row.runs}",
          *(format_stat(row.stats[col.name], col) for col in columns)] for row in rows),
        [*(False for _ in keys or [CONFIGURATION]), True, *(True for _ in columns)],
    )


FAILED_HEADERS = ("run", "seed", "status", "step", "reason")


def _failed_key_cells(run: FailedRun, value: Callable[[Any], Any]) -> list[Any]:
    if not run.keys:
        return [run.label]
    return [value(run.config[k]) if k in run.config else None for k in run.keys]


def _failed_cells(run: FailedRun, value: Callable[[Any], Any]) -> list[Any]:
    """run, the configuration's key values (or its label), seed, status, step, reason."""
    return [run.run, *_failed_key_cells(run, value), run.seed, run.status, run.step, run.reason]


def _failed_headers(failed: Sequence[FailedRun]) -> list[str]:
    keys = list(failed[0].keys) or [CONFIGURATION]
    return [FAILED_HEADERS[0], *keys, *FAILED_HEADERS[1:]]


def failed_markdown(failed: Sequence[FailedRun]) -> str:
    if not failed:
        return "none"
    headers = _failed_headers(failed)
    keys = len(headers) - len(FAILED_HEADERS)
    return markdown_grid(headers, (_failed_cells(f, display_value) for f in failed),
                     [False, *(False for _ in range(keys)), True, False, True, False])


def render_markdown(rows: Sequence[Row], failed: Sequence[FailedRun]) -> str:
    return (f"## Configurations (mean ± std over finished seeds)\n\n{markdown_table(rows)}\n\n"
            f"## Failed or incomplete runs\n\n{failed_markdown(failed)}\n")


def _csv(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    # repr-exact floats; None (no value, or no std for one seed) as an empty field.
    writer.writerows([["" if v is None else v for v in row] for row in rows])
    return out.getvalue()


# CSV statistics are cut to this many significant digits: means and stds over a few seeds
# mean nothing further, and 89.99 beats 89.99000000000001. Whole numbers stay exact.
CSV_DIGITS = 6


def _csv_key_value(value: Any) -> Any:
    return format_value(value) if isinstance(value, list | dict) else value


def _tidy(values: Sequence[float | None]) -> "pd.Series":
    """A statistic's column: integers when every value is whole (params, MACs), else floats
    at CSV_DIGITS significant digits; None (no value, or no std of one seed) stays empty."""
    import pandas as pd

    present = [v for v in values if v is not None]
    if present and all(math.isfinite(v) and v == round(v) for v in present):
        return pd.Series([None if v is None else round(v) for v in values], dtype="Int64")
    return pd.Series([None if v is None else float(f"{v:.{CSV_DIGITS}g}") for v in values],
                     dtype=float)


def table_frame(rows: Sequence[Row]) -> "pd.DataFrame":
    """The configuration table as a DataFrame: one column per differing config key (or the
    label column `configuration` when none differs), n (finished seeds), runs, then
    `<column>_mean` and `<column>_std` of each statistic."""
    import pandas as pd

    keys = differing_keys([row.config for row in rows])
    cells = [_key_cells(row, keys, _csv_key_value) for row in rows]
    data: dict[str, Any] = {key: pd.Series([c[i] for c in cells], dtype=object)
                            for i, key in enumerate(keys or [CONFIGURATION])}
    data["n"] = [row.finished for row in rows]
    data["runs"] = [row.runs for row in rows]
    for col in table_columns(rows):
        for part in ("mean", "std"):
            data[f"{col.name}_{part}"] = _tidy([getattr(row.stats[col.name], part)
                                                for row in rows])
    return pd.DataFrame(data)


def table_csv(rows: Sequence[Row]) -> str:
    return table_frame(rows).to_csv(index=False, lineterminator="\n")


def failed_csv(failed: Sequence[FailedRun]) -> str:
    """failed.csv: run, one column per varying config key (as in table.csv), seed, status,
    step, reason; only the header when every run finished."""
    if not failed:
        return _csv((FAILED_HEADERS[0], CONFIGURATION, *FAILED_HEADERS[1:]), [])
    return _csv(_failed_headers(failed), (_failed_cells(f, _csv_key_value) for f in failed))
