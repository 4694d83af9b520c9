"""The kind `patches`: for channels of a layer, the input patches (receptive fields, from the
conv/pool geometry, cnnlab/viz/receptive.py) of the test images that activate them most, as
Zeiler & Fergus 2014 (Figure 2) and Girshick et al. 2014 (Figure 4) show them."""


import jax
import jax.numpy as jnp
import numpy as np

from cnnlab.errors import require
from cnnlab.viz import figures
from cnnlab.viz.common import kind
from cnnlab.viz.network import Network, Restored
from cnnlab.viz.options import VizOptions
from cnnlab.viz.output import Output
from cnnlab.viz.receptive import crop, layer_geometry

OUTSIDE = (0.25, 0.45, 0.85)


def top_units(network: Network, images: np.ndarray, layer: str, channels: np.ndarray,
              top: int, batch_size: int = 250) -> tuple[np.ndarray, np.ndarray]:
    """(values (C, top), positions (C, top, 3) as image, row, col) of each channel's largest
    activations over `images`; each batch keeps its own top, merged at the end, in one jitted
    call, so no full activation tensor is ever held."""
    n = len(images)
    padded = np.zeros((-(-n // batch_size) * batch_size, *images.shape[1:]), np.uint8)
    padded[:n] = images

    def run(net: Network, batches: jax.Array) -> tuple[jax.Array, jax.Array]:
        def batch_top(args: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
            number, batch = args
            out = net.capture(batch.astype(jnp.float32) / 255.0, [layer])[1][layer]
            out = out[..., channels]
            b, h, w, c = out.shape
            ids = number * batch_size + jnp.arange(b)
            out = jnp.where((ids < n)[:, None, None, None], out, -jnp.inf)
            values, flat = jax.lax.top_k(out.reshape(b * h * w, c).T, min(top, b * h * w))
            image, rest = flat // (h * w), flat % (h * w)
            return values, jnp.stack([number * batch_size + image, rest // w, rest % w], -1)

        values, where = jax.lax.map(batch_top, (jnp.arange(len(batches)), batches))
        values = jnp.moveaxis(values, 0, 1).reshape(len(channels), -1)
        where = jnp.moveaxis(where, 0, 1).reshape(len(channels), -1, 3)
        best, pick = jax.lax.top_k(values, min(top, values.shape[1]))
        return best, jnp.take_along_axis(where, pick[..., None], axis=1)

    batches = padded.reshape(-1, batch_size, *images.shape[1:])
    values, where = network.jit(run)(batches)
    return np.asarray(values), np.asarray(where)


@kind("patches")
def draw(restored: Restored, options: VizOptions, out: Output) -> None:
    network, test = restored.network, restored.dataset.test
    layer = options.layer[0]
    shape = jax.eval_shape(lambda x: network.capture(x, [layer])[1][layer],
                           jax.ShapeDtypeStruct((1, *network.image_shape), jnp.float32)).shape
    require(len(shape) == 4, f"patches needs a layer with feature maps; {layer} outputs "
            f"{shape[1:]}")
    channels = np.asarray(options.channels if options.channels else range(min(8, shape[-1])))
    require(int(channels.max()) < shape[-1],
            f"channels: {layer} has {shape[-1]} channels (0..{shape[-1] - 1})")
    images = test.images[:options.search]
    values, where = top_units(network, images, layer, channels, options.top)
    geometry = layer_geometry(network.factory(None), network.image_shape, layer)
    boxes = np.asarray([[geometry.box(r, c) for _, r, c in row] for row in where])
    # In colour, so that the part of a field outside the image (blue) stands out.
    rgb = images if images.shape[-1] == 3 else np.repeat(images[..., :1], 3, axis=-1)
    rows = [[crop(rgb[i] / 255.0, tuple(box), OUTSIDE) for (i, _, _), box in zip(row, row_boxes,
                                                                           strict=True)]
            for row, row_boxes in zip(where, boxes, strict=True)]
    titles = [[f"{v:.1f}" for v in row] for row in values]
    fig = figures.rows_figure(rows, [f"ch {c}" for c in channels], titles, cell=0.9,
                              suptitle=f"{layer}: top {options.top} of {len(images):,} test "
                              f"images per channel; receptive field {geometry.size[0]:g} px, "
                              f"stride {geometry.jump[0]:g} (blue: outside the image)")
    out.figure(fig)
    out.arrays(channels=channels, values=values, units=where, boxes=boxes)
    out.json({"layer": layer, "offset": geometry.offset, "jump": geometry.jump,
              "size": geometry.size}, "patches_geometry")
