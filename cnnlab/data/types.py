"""The in-memory dataset types every data module shares: host splits, a loaded dataset, and the
error that says a dataset cannot be had."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


class DatasetUnavailableError(RuntimeError):
    """The dataset is neither prepared in data_dir nor downloadable.

    The message is a single line that names the dataset, the folder searched and what to do.
    """


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: `==` on arrays is not a bool
class ArraySplit:
    images: np.ndarray  # (N, H, W, C) uint8
    labels: np.ndarray  # (N,) int32

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(
                f"images must be uint8 (N, H, W, C), got {self.images.dtype} {self.images.shape}"
            )
        if self.labels.dtype != np.int32 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(
                f"labels must be int32 ({len(self.images)},), got "
                f"{self.labels.dtype} {self.labels.shape}"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    name: str
    train: ArraySplit
    test: ArraySplit
    val: ArraySplit | None
    num_classes: int
    image_shape: tuple[int, int, int]  # (H, W, C)
    # (C,) float32, of the train images (after val hold-out), pixel scale [0, 1]; None when the
    # train split was not read (load_dataset's `splits`) and the caller has not filled them in.
    mean: np.ndarray | None
    std: np.ndarray | None  # (C,) float32, same
    # The run's preprocessing statistics (cnnlab.data.preprocess.PreprocessStats), set by
    # cnnlab.training.loop.load_data; None: per-channel standardization with mean and std.
    preprocess: Any = None
    # The label feature's class names (TFDS ClassLabel names), index = label; None: unknown.
    class_names: tuple[str, ...] | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class Source:
    """A dataset's splits as read, before class selection, validation hold-out and per_class."""

    train: ArraySplit
    test: ArraySplit
    val: ArraySplit | None  # the source's own validation split (a folder's val/), or None
    num_classes: int
    image_shape: tuple[int, int, int]
    class_names: tuple[str, ...] | None
