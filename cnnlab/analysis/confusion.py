"""Confusion matrices and per-class errors as files: CSV tables and a PNG, written atomically.

The counts come from the device (`steps.confusion_counts`, summed over the jitted evaluation
batches) in training runs, and from the members' log-probabilities on the host in `cnnlab eval`
(`evaluate.confusion_matrix`). Row i, column j counts examples of true class i predicted as j;
a class's error is 1 - diagonal / row sum (no examples: empty in the CSV, NaN in memory).
"""

import csv
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cnnlab.runs.rundir import CONFUSION_CSV, CONFUSION_PNG, PER_CLASS_CSV, write_atomic

PER_CLASS_COLUMNS = ("class", "name", "examples", "errors", "error")


def class_labels(num_classes: int, names: Sequence[str] | None) -> list[str]:
    """The dataset's class names, or the class indices where it has none."""
    if names is not None and len(names) == num_classes:
        return [str(n) for n in names]
    return [str(i) for i in range(num_classes)]


def per_class_error(counts: np.ndarray) -> np.ndarray:
    """(K,) error in percent of each true class: 100 (1 - diag / row sum); NaN without rows."""
    counts = np.asarray(counts, np.int64)
    rows = counts.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(rows > 0, 100.0 * (1.0 - np.diag(counts) / rows), np.nan)


def per_class_rows(counts: np.ndarray, names: Sequence[str]) -> list[list]:
    """Rows of PER_CLASS_COLUMNS: index, name, examples, errors, error (%, None if no rows)."""
    counts = np.asarray(counts, np.int64)
    rows, errors = counts.sum(axis=1), per_class_error(counts)
    return [[i, names[i], int(rows[i]), int(rows[i] - counts[i, i]),
             None if np.isnan(errors[i]) else round(float(errors[i]), 4)]
            for i in range(len(names))]


def _csv(rows: Sequence[Sequence]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(
        [["" if cell is None else cell for cell in row] for row in rows])
    return out.getvalue()


def confusion_csv(counts: np.ndarray, names: Sequence[str]) -> str:
    """The counts with a header row and column of class names (`true \\ predicted` corner)."""
    counts = np.asarray(counts, np.int64)
    return _csv([["true \\ predicted", *names],
                 *([name, *map(int, row)] for name, row in zip(names, counts, strict=True))])


def png_bytes(counts: np.ndarray, names: Sequence[str], title: str) -> bytes:
    from cnnlab.analysis.plots import confusion_figure

    out = io.BytesIO()
    confusion_figure(counts, names, title).savefig(out, format="png", dpi=120)
    return out.getvalue()


def write_confusion(folder: Path, split: str, counts: np.ndarray,
                    class_names: Sequence[str] | None, title: str) -> dict[str, Path]:
    """`confusion_<split>.csv`, `confusion_<split>.png` and `per_class_<split>.csv` in
    `folder`, each replaced atomically; returns their paths by kind (csv, png, per_class)."""
    counts = np.asarray(counts, np.int64)
    names = class_labels(counts.shape[0], class_names)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"csv": folder / CONFUSION_CSV.format(split=split),
             "png": folder / CONFUSION_PNG.format(split=split),
             "per_class": folder / PER_CLASS_CSV.format(split=split)}
    write_atomic(paths["csv"], confusion_csv(counts, names))
    write_atomic(paths["per_class"], _csv([PER_CLASS_COLUMNS, *per_class_rows(counts, names)]))
    write_atomic(paths["png"], png_bytes(counts, names, title))
    return paths
