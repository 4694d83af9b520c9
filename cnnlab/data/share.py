"""A process's share of a device-resident training split (multi-host jobs).

Across processes the training split is split by rows over the devices (cnnlab/parallel.py's
`Placement.put_local_rows`): process p's devices hold the rows [start, stop) of the split padded
to a multiple of the device count. So that each process decodes only those rows, the split is
first planned without its images: the subsets (classes, validation hold-out, folds, per_class;
cnnlab/data/subsets.py, unchanged) run on a split whose "images" are the source row ids, which
they index exactly as they index images, giving every training row's source row in the order a
one-process run has. Each process then decodes the source rows of its own rows only, and the
statistics computed over the training images (mean, std, ZCA, lighting PCA) sum each process's
part over the processes (`LocalRows.total`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from cnnlab.data.types import ArraySplit

# float64 array -> its sum over the processes (the same bits on every process).
Total = Callable[[np.ndarray], np.ndarray]


def unchanged(value: np.ndarray) -> np.ndarray:
    return value


@dataclasses.dataclass(frozen=True)
class Share:
    """What a process is to hold of the training split: `rows(padded)` is its [start, stop) of
    the split padded to a multiple of `multiple` rows; `total` sums a value over the
    processes."""

    rows: Callable[[int], tuple[int, int]]
    multiple: int
    total: Total


@dataclasses.dataclass(frozen=True, eq=False)
class LocalRows(ArraySplit):
    """This process's real rows (`images`, `labels`) of a training split of `size` examples:
    rows start..start + len(images) of it, held by this process's devices together with the
    padding up to `stop` (a multiple of the devices' row count). `len()` is the whole split's."""

    start: int = 0
    stop: int = 0
    size: int = 0
    padded: int = 0
    total: Total = unchanged

    def __len__(self) -> int:
        return self.size


def total_of(split: object) -> Total:
    """How statistics over `split`'s images sum over the processes (none: a whole split)."""
    return split.total if isinstance(split, LocalRows) else unchanged


# Row ids travel through the subsets as images: 8 bytes (an int64) per "image".
_ID_SHAPE = (1, 1, 8)


def row_ids(labels: np.ndarray) -> ArraySplit:
    """A split of len(labels) rows whose images are their row ids (see the module's note)."""
    ids = np.arange(len(labels), dtype=np.int64)
    return ArraySplit(ids.view(np.uint8).reshape(len(ids), *_ID_SHAPE),
                      np.asarray(labels, np.int32))


def ids_of(split: ArraySplit) -> np.ndarray:
    """The source row ids a `row_ids` split's subsets kept, in their order."""
    return np.ascontiguousarray(split.images).reshape(len(split.images), 8).view(np.int64)[:, 0]


def local_rows(train: ArraySplit, share: Share,
               decode: Callable[[np.ndarray], np.ndarray] | None = None) -> LocalRows:
    """This process's rows of `train`: decoded from their source rows by `decode` when `train`
    holds row ids (`row_ids`), else cut from its images."""
    n = len(train)
    padded = -(-n // share.multiple) * share.multiple
    start, stop = share.rows(padded)
    real = slice(min(start, n), min(stop, n))
    images = train.images[real] if decode is None else decode(ids_of(train)[real])
    return LocalRows(images, train.labels[real], start=start, stop=stop, size=n, padded=padded,
                     total=share.total)
