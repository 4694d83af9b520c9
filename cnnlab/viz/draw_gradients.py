"""The kinds `saliency`, `guided_backprop` and `deconvnet`: input gradients of a class score
(default: each image's label) or, with `layer=`, of a neuron (cnnlab/viz/gradients.py)."""

import functools

import jax.numpy as jnp
import numpy as np

from cnnlab.viz import figures
from cnnlab.viz.common import class_targets, describe_neuron, image_indices, kind, neuron_channels
from cnnlab.viz.gradients import class_score, input_gradients, neuron_score, saliency_map
from cnnlab.viz.network import Network, Restored
from cnnlab.viz.options import VizOptions
from cnnlab.viz.output import Output


def _gradients(network: Network, pixels: jnp.ndarray, targets: jnp.ndarray, method: str,
               layer: str | None, at: str) -> jnp.ndarray:
    score = class_score(targets) if layer is None else neuron_score(layer, targets, at)
    return input_gradients(network, pixels, score, method)


def draw(method: str, restored: Restored, options: VizOptions, out: Output) -> None:
    indices = image_indices(options, len(restored.dataset.test))
    pixels = restored.pixels("test", indices)
    layer = options.layer[0] if options.layer else None
    if layer is None:
        targets = class_targets(restored, options, indices, pixels)
        titles = [restored.class_names[t] for t in targets]
        what = f"class score ({options.target})"
    else:
        targets = neuron_channels(options, len(indices))
        titles = [f"ch {c}" for c in targets]
        what = describe_neuron(options)
    compute = restored.network.jit(functools.partial(
        _gradients, method=method, layer=layer, at=options.neuron_at))
    grads = np.asarray(compute(pixels, jnp.asarray(targets)))
    images = np.asarray(pixels)
    if method == "saliency":
        maps = np.asarray(saliency_map(grads))
        shown, cmap = figures.unit_range(maps, axes=(1, 2)), "hot"
    else:  # the signed gradient as an image, as both papers show it
        shown, cmap = figures.centered(grads), None
    fig = figures.rows_figure([list(images), list(shown)], ["input", method],
                              [titles, [""] * len(titles)], cmaps=[None, cmap],
                              suptitle=f"{method}: d {what} / d input")
    out.figure(fig)
    out.arrays(indices=indices, targets=targets, gradients=grads,
               **({"saliency": maps} if method == "saliency" else {}))


for _method in ("saliency", "guided_backprop", "deconvnet"):
    kind(_method)(functools.partial(draw, _method))
