"""The kind `filters`: the first layer's filters as images, and every layer's weight histogram."""

from collections.abc import Iterator
from typing import Any

import numpy as np

from cnnlab.errors import ConfigError
from cnnlab.viz import figures
from cnnlab.viz.common import kind
from cnnlab.viz.network import Restored
from cnnlab.viz.options import VizOptions
from cnnlab.viz.output import Output


def kernels(params: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, np.ndarray]]:
    """(layer name, weight array) of every conv and dense kernel (in the tree's order, which a
    restored checkpoint sorts by name)."""
    for key, value in params.items():
        if isinstance(value, dict):
            yield from kernels(value, (*prefix, key))
        elif key == "kernel":
            yield "/".join(prefix), np.asarray(value)


def filter_images(kernel: np.ndarray) -> np.ndarray:
    """(kh, kw, C, F) -> (F, kh, kw, C') on [0, 1], each filter scaled on its own; RGB filters
    stay colour images, others show their first input channel's weights in grey."""
    filters = np.moveaxis(kernel, -1, 0)
    if filters.shape[-1] != 3:
        filters = filters[..., :1]
    return figures.unit_range(filters, axes=(1, 2, 3))


@kind("filters", splits=())
def draw(restored: Restored, options: VizOptions, out: Output) -> None:
    # In the order of the forward pass: a checkpoint's tree is sorted by name (head before stem).
    order = {name: i for i, name in enumerate(restored.network.layer_names())}
    layers = sorted(kernels(restored.network.variables["params"]),
                    key=lambda item: order.get(item[0], len(order)))
    convs = [(name, k) for name, k in layers if k.ndim == 4]
    if not convs:
        raise ConfigError("viz filters: the model has no convolution")
    name, first = convs[0]
    images = filter_images(first)
    channels = "RGB" if first.shape[2] == 3 else (
        "grey" if first.shape[2] == 1 else f"input channel 0 of {first.shape[2]}")
    out.figure(figures.image_grid(list(images), cell=0.6, suptitle=(
        f"{name}: {first.shape[-1]} filters {first.shape[0]}x{first.shape[1]} ({channels})")))
    out.figure(_histograms(layers, options.bins), "weight_histograms")
    out.arrays(first_layer=first, **{f"hist_{n.replace('/', '.')}": np.histogram(
        k, options.bins)[0] for n, k in layers})
    out.json({"first_layer": name, "layers": {n: {
        "shape": list(k.shape), "mean": float(k.mean()), "std": float(k.std()),
        "min": float(k.min()), "max": float(k.max())} for n, k in layers}}, "weights")


def _histograms(layers: list[tuple[str, np.ndarray]], bins: int) -> Any:
    import math

    import matplotlib.pyplot as plt

    cols = min(6, len(layers))
    rows = math.ceil(len(layers) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.8, rows * 1.2), squeeze=False)
    for ax in axes.flat[len(layers):]:
        ax.axis("off")
    for ax, (name, k) in zip(axes.flat, layers, strict=False):
        ax.hist(k.ravel(), bins=bins, color="tab:blue")
        ax.set_title(f"{name} (std {k.std():.3f})", fontsize=6)
        ax.tick_params(labelsize=5)
        ax.set_yticks([])
    fig.suptitle("weight histograms per layer (kernels)", fontsize=9)
    fig.tight_layout()
    return fig
