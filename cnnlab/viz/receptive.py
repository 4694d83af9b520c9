"""Receptive fields from the conv/pool geometry of the modules a model actually calls.

Along one axis, a layer's units are described by (offset, jump, size): unit i sees the input
pixels [offset + i * jump, offset + i * jump + size). A k-wide window with stride s and padding
p before it maps (offset, jump, size) to (offset - p * jump, jump * s, size + (k - 1) * jump)
(the arithmetic of Dumoulin & Visin 2016 and of the lecture notes' output-size rule).

The model is traced once (`jax.eval_shape`) with every module call intercepted; each output
array is tagged with its geometry, and a module reads its input's tag. Arrays made outside
modules (an activation, a residual sum, a concatenation) carry the most recent tag, which is the
main path's in residual and plain nets; shortcuts are skipped (their field lies inside the main
path's). A block's output has the largest field of its parts (Inception: its 5x5 branch), and a
windowed module's own parts are not followed (LeNet-5's C3 table is one 5x5 window, however
many grouped convolutions compute it).
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cnnlab.models import blocks, geometry
from cnnlab.models.layers import InputFit

Window = tuple[int, int, tuple[int, int]]  # kernel, stride, padding before (rows, cols)


@dataclasses.dataclass(frozen=True)
class Geometry:
    """(rows, cols) offset, jump and size of a layer's receptive fields in input pixels."""

    offset: tuple[float, float] = (0.0, 0.0)
    jump: tuple[float, float] = (1.0, 1.0)
    size: tuple[float, float] = (1.0, 1.0)

    def then(self, kernel: int, stride: int, pad_before: tuple[int, int]) -> "Geometry":
        return Geometry(
            tuple(o - p * j for o, p, j in zip(self.offset, pad_before, self.jump, strict=True)),
            tuple(j * stride for j in self.jump),
            tuple(s + (kernel - 1) * j for s, j in zip(self.size, self.jump, strict=True)))

    def box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """(top, left, bottom, right) of unit (row, col)'s field, unclipped, end exclusive."""
        top = self.offset[0] + row * self.jump[0]
        left = self.offset[1] + col * self.jump[1]
        return (int(np.floor(top)), int(np.floor(left)), int(np.ceil(top + self.size[0])),
                int(np.ceil(left + self.size[1])))


def _conv_window(module: nn.Conv, x: jax.Array) -> Window:
    kernel = module.kernel_size[0]
    strides = module.strides or 1
    stride = strides if isinstance(strides, int) else strides[0]
    padding = module.padding
    if isinstance(padding, str):
        padding = geometry.window_pads("conv", x.shape[1:3], kernel, stride,
                                       "same" if padding == "SAME" else 0)
    return kernel, stride, (padding[0][0], padding[1][0])


def _pool_window(module: blocks.Pool | blocks.TableConv, x: jax.Array) -> Window:
    pads = geometry.window_pads(module.name or "window", x.shape[1:3], module.kernel,
                                module.stride, module.padding)
    return module.kernel, module.stride, (pads[0][0], pads[1][0])


# The windowed modules of cnnlab's models and how each reads its window.
WINDOWS: dict[type, Callable[[Any, jax.Array], Window]] = {
    nn.Conv: _conv_window,
    blocks.Pool: _pool_window,
    blocks.Subsample: lambda module, x: (module.kernel, module.kernel, (0, 0)),
    blocks.TableConv: _pool_window,  # same fields as a pool: kernel, stride, padding
}


def input_geometry(fit: InputFit | None, image_shape: Sequence[int]) -> Geometry:
    """The model's first layer sees the image after its input fit: padded (an offset) or
    resized (a scale)."""
    if fit is None or fit.size is None or tuple(image_shape[:2]) == (fit.size, fit.size):
        return Geometry()
    height, width = image_shape[:2]
    if fit.mode == "pad":
        return Geometry((-float((fit.size - height) // 2), -float((fit.size - width) // 2)))
    scale = (height / fit.size, width / fit.size)
    return Geometry((0.0, 0.0), scale, scale)


def _window(module: nn.Module, x: Any) -> Window | None:
    for cls, read in WINDOWS.items():
        if isinstance(module, cls):
            return read(module, x)
    return None


def layer_geometry(model: nn.Module, image_shape: Sequence[int], layer: str) -> Geometry:
    """The receptive-field geometry of `layer`'s output units (named as `cnnlab summary`)."""
    tags: dict[int, Geometry] = {}
    alive: list[Any] = []  # keeps tagged arrays alive, so that their ids are not reused
    latest = [input_geometry(getattr(model, "fit", None), image_shape)]
    produced: list[Geometry] = []  # every tag, in order: a block's parts are a slice of it
    inside_window = [False]
    found: dict[str, Geometry] = {}

    def record(next_fun: Any, args: tuple, kwargs: dict, context: Any) -> Any:
        module = context.module
        if (context.method_name != "__call__" or module.scope is None or not module.path
                or inside_window[0] or "shortcut" in module.path):
            return next_fun(*args, **kwargs)
        x = args[0] if args else None
        seen = tags.get(id(x), latest[0])
        window = _window(module, x)
        start = len(produced)
        inside_window[0] = window is not None
        try:
            out = next_fun(*args, **kwargs)
        finally:
            inside_window[0] = False
        if window is not None:
            result = seen.then(*window)
        else:  # a block: its parts' largest field; another leaf (norm, dropout): its input's
            result = max(produced[start:], key=lambda g: g.size, default=seen)
        tags[id(out)] = latest[0] = result
        produced.append(result)
        alive.append(out)
        found.setdefault("/".join(module.path), result)
        return out

    def init(x: jax.Array) -> Any:
        with nn.intercept_methods(record):
            return model.init(jax.random.PRNGKey(0), x, train=False)

    jax.eval_shape(init, jax.ShapeDtypeStruct((1, *image_shape), jnp.float32))
    return found[layer]


def crop(image: np.ndarray, box: tuple[int, int, int, int],
         fill: float | Sequence[float] = 0.0) -> np.ndarray:
    """The pixels of `box` (top, left, bottom, right), parts outside the image set to `fill`
    (a value or one per channel), so that every patch of a layer has its field's full size and
    the unit sits at its centre."""
    top, left, bottom, right = box
    patch = np.empty((bottom - top, right - left, image.shape[-1]), np.float32)
    patch[...] = fill
    t, l_ = max(top, 0), max(left, 0)
    b, r = min(bottom, image.shape[0]), min(right, image.shape[1])
    if b > t and r > l_:
        patch[t - top:b - top, l_ - left:r - left] = image[t:b, l_:r]
    return patch
