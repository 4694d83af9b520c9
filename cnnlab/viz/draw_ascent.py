"""The kinds `class_model` (one image per class, or `target=N`) and `neuron_ascent` (one per
channel of `layer=`): regularized gradient ascent on the input (cnnlab/viz/ascent.py)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from cnnlab.errors import require
from cnnlab.viz import figures
from cnnlab.viz.ascent import AscentSettings, ascend
from cnnlab.viz.common import kind
from cnnlab.viz.gradients import class_score, neuron_score
from cnnlab.viz.network import Network, Restored
from cnnlab.viz.options import VizOptions
from cnnlab.viz.output import Output

MAX_IMAGES = 100


def settings(options: VizOptions) -> AscentSettings:
    return AscentSettings(**{field.name: getattr(options, field.name)
                             for field in dataclasses.fields(AscentSettings)})


def _run(network: Network, mean: jax.Array, targets: jax.Array, layer: str | None, at: str,
         setup: AscentSettings) -> tuple[jax.Array, jax.Array]:
    score = class_score(targets) if layer is None else neuron_score(layer, targets, at)
    shape = (len(targets), *network.image_shape)
    return ascend(lambda pixels: score(network, pixels, None), mean, shape, setup)


def _draw(restored: Restored, options: VizOptions, out: Output, targets: np.ndarray,
          neuron: tuple[str, str] | None, titles: list[str], what: str) -> None:
    """`neuron`: (layer, neuron_at) of neuron_ascent; None: class scores (class_model)."""
    require(len(targets) <= MAX_IMAGES, f"at most {MAX_IMAGES} images per call")
    layer, at = neuron if neuron is not None else (None, "center")
    compute = restored.network.jit(functools.partial(
        _run, layer=layer, at=at, setup=settings(options)))
    mean = jnp.asarray(restored.dataset.mean, jnp.float32)
    pixels, history = (np.asarray(a) for a in compute(mean, jnp.asarray(targets, jnp.int32)))
    # Contrast stretched per image, as the papers show them (the raw pixels are in the .npz).
    shown = figures.unit_range(pixels, axes=(1, 2, 3))
    titles = [f"{t}\n{history[0, i]:.1f} -> {history[-1, i]:.1f}" for i, t in enumerate(titles)]
    s = settings(options)
    fig = figures.image_grid(list(shown), titles, cols=min(10, len(shown)), cell=1.2,
                             suptitle=f"{what}: {s.steps} steps, lr {s.lr}, L2 {s.l2}, blur "
                             f"{s.blur_sigma}/{s.blur_every}, clip norm {s.clip_norm_pct}%, "
                             f"contribution {s.clip_contrib_pct}%, seed {s.seed}")
    out.figure(fig)
    out.arrays(targets=targets, pixels=pixels, history=history)


@kind("class_model", splits=())
def draw_class_model(restored: Restored, options: VizOptions, out: Output) -> None:
    classes = restored.network.num_classes
    if options.target.lstrip("-").isdigit():
        target = int(options.target)
        require(0 <= target < classes, f"target={target}: the model has classes 0..{classes - 1}")
        targets = np.asarray([target])
    else:
        targets = np.arange(min(classes, MAX_IMAGES))
    _draw(restored, options, out, targets, None, [restored.class_names[t] for t in targets],
          "class models (pre-softmax score)")


@kind("neuron_ascent", splits=())
def draw_neuron_ascent(restored: Restored, options: VizOptions, out: Output) -> None:
    layer = options.layer[0]
    channels = np.asarray(options.channels if options.channels else range(8))
    shape = jax.eval_shape(
        lambda x: restored.network.capture(x, [layer])[1][layer],
        jax.ShapeDtypeStruct((1, *restored.network.image_shape), jnp.float32)).shape
    require(int(channels.max()) < shape[-1],
            f"channels: {layer} has {shape[-1]} channels (0..{shape[-1] - 1})")
    _draw(restored, options, out, channels, (layer, options.neuron_at),
          [f"ch {c}" for c in channels],
          f"{layer} ({options.neuron_at} unit)")
