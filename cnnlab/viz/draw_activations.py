"""The kind `activations`: feature maps of chosen layers (`layer=`) for a few test images."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from cnnlab.viz import figures
from cnnlab.viz.common import image_indices, kind
from cnnlab.viz.network import Network, Restored
from cnnlab.viz.options import VizOptions
from cnnlab.viz.output import Output


def spatial_layers(network: Network) -> list[str]:
    """Top-level layers whose output is a feature map (N, H, W, C), in forward order."""
    names = [n for n in network.layer_names() if "/" not in n]
    shapes = jax.eval_shape(lambda x: network.capture(x, names)[1],
                            jax.ShapeDtypeStruct((1, *network.image_shape), jnp.float32))
    return [n for n in names if len(shapes[n].shape) == 4]


def default_layers(network: Network, count: int = 3) -> list[str]:
    """First, middle and last feature-map layers: low-level to high-level features."""
    spatial = spatial_layers(network)
    picks = np.linspace(0, len(spatial) - 1, min(count, len(spatial))).round().astype(int)
    return [spatial[i] for i in dict.fromkeys(picks)]


def _capture(network: Network, pixels: jax.Array, names: tuple[str, ...]) -> dict:
    return network.capture(pixels, names)[1]


@kind("activations")
def draw(restored: Restored, options: VizOptions, out: Output) -> None:
    network = restored.network
    names = tuple(options.layer or default_layers(network))
    indices = image_indices(options, len(restored.dataset.test))[:4 if not options.indices
                                                                  else None]
    pixels = restored.pixels("test", indices)
    maps = {n: np.asarray(a) for n, a in network.jit(functools.partial(
        _capture, names=names))(pixels).items()}
    images = np.asarray(pixels)
    for name in names:
        act = maps[name]
        if act.ndim != 4:
            act = act.reshape(len(act), 1, 1, -1)  # a dense layer: one 1x1 map per unit
        count = min(options.maps, act.shape[-1])
        rows = [[images[i]] + [figures.unit_range(act[i, ..., c]) for c in range(count)]
                for i in range(len(indices))]
        titles = [["input"] + [f"ch {c}" for c in range(count)]] + [
            [""] * (count + 1)] * (len(indices) - 1)
        fig = figures.rows_figure(rows, [restored.class_names[label] for label in
                                         restored.dataset.test.labels[indices]], titles,
                                  cell=0.8, suptitle=f"{name}: {act.shape[1]}x{act.shape[2]}x"
                                  f"{act.shape[3]} output, first {count} maps (each scaled "
                                  "to its own range)")
        out.figure(fig, f"activations_{name.replace('/', '.')}")
    out.arrays(indices=indices, **{n.replace("/", "."): a for n, a in maps.items()})
