"""Drawing helpers shared by the kinds: images on a grid, heat maps, rescaling for display.

matplotlib's Agg backend only (files, no display); imported by the kinds when they draw.
"""

import math
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def unit_range(array: np.ndarray, axes: tuple[int, ...] | None = None) -> np.ndarray:
    """Rescale to [0, 1] by min and max (over `axes`, each slice on its own; None: all)."""
    array = np.asarray(array, np.float32)
    lo = array.min(axis=axes, keepdims=axes is not None)
    hi = array.max(axis=axes, keepdims=axes is not None)
    return (array - lo) / np.maximum(hi - lo, 1e-12)


def centered(array: np.ndarray) -> np.ndarray:
    """A signed image (a gradient, an ascent result) for display: 0.5 at zero, the largest
    magnitude of each image at 0 or 1 (per image: axis 0 is the batch)."""
    array = np.asarray(array, np.float32)
    scale = np.abs(array).reshape(len(array), -1).max(axis=1)
    return 0.5 + 0.5 * array / np.maximum(scale, 1e-12).reshape(-1, *[1] * (array.ndim - 1))


def show(ax: Any, image: np.ndarray, title: str | None = None, **kwargs: Any) -> None:
    """An (H, W, C) image on [0, 1] (grey for one channel) or an (H, W) map, without axes."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        # Callers scale to [0, 1] themselves; matplotlib would stretch each map to its range.
        kwargs = {"cmap": "gray", "vmin": 0.0, "vmax": 1.0, **kwargs}
    if image.ndim == 3:
        image = np.clip(image, 0, 1)
    ax.imshow(image, interpolation="nearest", **kwargs)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=7)


def axes_grid(rows: int, cols: int, cell: float = 1.1) -> tuple[Any, np.ndarray]:
    # Constrained layout keeps titles and the suptitle from overlapping.
    fig, axes = plt.subplots(rows, cols, figsize=(cols * cell, rows * cell), squeeze=False,
                             layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    return fig, axes


def image_grid(images: Sequence[np.ndarray], titles: Sequence[str] | None = None,
               cols: int | None = None, cell: float = 1.1, suptitle: str | None = None) -> Any:
    """A figure of images on a near-square grid (or `cols` wide)."""
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    fig, axes = axes_grid(rows, cols, cell)
    for i, image in enumerate(images):
        ax = axes.flat[i]
        ax.axis("on")
        show(ax, image, titles[i] if titles else None)
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    return fig


def rows_figure(rows: Sequence[Sequence[np.ndarray]], row_labels: Sequence[str],
                col_titles: Sequence[Sequence[str]] | None = None, cell: float = 1.1,
                suptitle: str | None = None, cmaps: Sequence[str | None] | None = None) -> Any:
    """One row of panels per entry of `rows` (images or maps), labelled on the left; `cmaps`:
    one colour map per row (None: grey, or the image's colours)."""
    cols = max(len(r) for r in rows)
    fig, axes = axes_grid(len(rows), cols, cell)
    for r, panels in enumerate(rows):
        for c, panel in enumerate(panels):
            ax = axes[r, c]
            ax.axis("on")
            cmap = cmaps[r] if cmaps else None
            show(ax, panel, col_titles[r][c] if col_titles else None,
                 **({"cmap": cmap} if cmap else {}))
        axes[r, 0].set_ylabel(row_labels[r], fontsize=7)
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    return fig


def as_rgb_or_grey(images: np.ndarray) -> np.ndarray:
    """uint8 or float images -> float on [0, 1]."""
    images = np.asarray(images)
    return images.astype(np.float32) / 255.0 if images.dtype == np.uint8 else images
