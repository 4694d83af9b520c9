"""Occlusion sensitivity (Zeiler & Fergus 2014, section 4.2): the probability of a class as a grey
square slides over the image. Every position of one image is one batch, built by broadcasting a
square mask over a grid of positions; the images go through `lax.map`, all in one jitted call.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

# `probabilities(pixels) -> (B, K)` class probabilities of a pixel batch.
Probabilities = Callable[[jax.Array], jax.Array]


def square_masks(height: int, width: int, size: int, stride: int) -> jax.Array:
    """(Py, Px, H, W) booleans: the square of side `size` whose top-left corner is at
    (y * stride, x * stride), for every position that fits inside the image."""
    ys = jnp.arange(0, height - size + 1, stride)
    xs = jnp.arange(0, width - size + 1, stride)
    rows, cols = jnp.arange(height), jnp.arange(width)
    in_rows = (rows[None, :] >= ys[:, None]) & (rows[None, :] < ys[:, None] + size)  # (Py, H)
    in_cols = (cols[None, :] >= xs[:, None]) & (cols[None, :] < xs[:, None] + size)  # (Px, W)
    return in_rows[:, None, :, None] & in_cols[None, :, None, :]


def occlusion_maps(probabilities: Probabilities, pixels: jax.Array, targets: jax.Array,
                   size: int, stride: int, fill: float) -> jax.Array:
    """(N, Py, Px): the probability of `targets[i]` with the square at each position over image
    i (pixels (N, H, W, C) on [0, 1], the square filled with grey level `fill`)."""
    _, height, width, _ = pixels.shape
    masks = square_masks(height, width, size, stride)
    grid = masks.shape[:2]
    masks = masks.reshape(-1, height, width, 1)

    def one(args: tuple[jax.Array, jax.Array]) -> jax.Array:
        image, target = args
        occluded = jnp.where(masks, jnp.asarray(fill, image.dtype), image[None])
        return probabilities(occluded)[:, target].reshape(grid)

    return jax.lax.map(one, (pixels, targets))
