"""The kind `occlusion`: heat maps of a class's probability under a sliding grey square."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from cnnlab.errors import require
from cnnlab.viz import figures
from cnnlab.viz.common import class_targets, image_indices, kind
from cnnlab.viz.network import Network, Restored
from cnnlab.viz.occlusion import occlusion_maps
from cnnlab.viz.options import VizOptions
from cnnlab.viz.output import Output


def _maps(network: Network, pixels: jax.Array, targets: jax.Array, size: int, stride: int,
          fill: float) -> tuple[jax.Array, jax.Array]:
    def probabilities(batch: jax.Array) -> jax.Array:
        return jax.nn.softmax(network.logits(batch).astype(jnp.float32), axis=-1)

    plain = jnp.take_along_axis(probabilities(pixels), targets[:, None], axis=1)[:, 0]
    return occlusion_maps(probabilities, pixels, targets, size, stride, fill), plain


def _upsample(maps: np.ndarray, height: int, width: int, size: int, stride: int) -> np.ndarray:
    """Each position's value over the pixels at its square's centre, for overlaying."""
    py, px = maps.shape[1:]
    ys = np.clip((np.arange(height) - size // 2) // stride, 0, py - 1)
    xs = np.clip((np.arange(width) - size // 2) // stride, 0, px - 1)
    return maps[:, ys][:, :, xs]


@kind("occlusion")
def draw(restored: Restored, options: VizOptions, out: Output) -> None:
    height, width = restored.network.image_shape[:2]
    require(options.size <= min(height, width),
            f"size={options.size} is larger than the {height}x{width} images")
    indices = image_indices(options, len(restored.dataset.test))
    pixels = restored.pixels("test", indices)
    targets = class_targets(restored, options, indices, pixels)
    compute = restored.network.jit(functools.partial(
        _maps, size=options.size, stride=options.stride, fill=options.fill))
    maps, plain = (np.asarray(a) for a in compute(pixels, jnp.asarray(targets)))
    shown = _upsample(maps, height, width, options.size, options.stride)
    titles = [f"{restored.class_names[t]} p={p:.2f}" for t, p in zip(targets, plain, strict=True)]
    fig = figures.rows_figure(
        [list(np.asarray(pixels)), list(shown)], ["input", "p(class) occluded"],
        [titles, [f"min {m.min():.2f}" for m in maps]], cmaps=[None, "viridis"],
        suptitle=f"occlusion: {options.size}x{options.size} square (grey {options.fill}), "
                 f"stride {options.stride}; probability of the {options.target} class "
                 "(colour scale 0..1)")
    out.figure(fig)
    out.arrays(indices=indices, targets=targets, maps=maps, unoccluded=plain)
