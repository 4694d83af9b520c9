"""Gradient ascent on the input (Simonyan et al. 2014's class models; Yosinski, Clune, Nguyen,
Fuchs & Lipson 2015's regularized version, section 3).

The image x is optimized in pixel units about the training set's mean colour (pixels = mean + x,
on the [0, 1] scale), one image per objective, all in one batch, inside one `lax.scan`. Each
step, after the ascent step:

* L2 decay: x <- (1 - l2) x, which pulls rarely useful pixels back to the mean;
* Gaussian blur of width `blur_sigma` every `blur_every` steps, which removes high frequencies;
* clipping pixels with small norm: pixels whose norm over the channels is below the
  `clip_norm_pct` percentile of the image are set to the mean;
* clipping pixels with small contribution: pixels whose |sum over channels of x * gradient| (the
  first-order change of the objective if the pixel were set to the mean) is below the
  `clip_contrib_pct` percentile are set to the mean;

and x stays inside the valid pixel range. The ascent step is normalized by the mean |gradient|
of each image, so `lr` is in pixel units whatever the scale of the objective. The start is small
Gaussian noise drawn from `seed`: the same seed gives the same image.
"""

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

# `objective(pixels) -> (N,)`: one value per image, to be raised.
Objective = Callable[[jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class AscentSettings:
    """The ascent's options; their defaults live in cnnlab.viz.options.VizOptions alone."""

    steps: int
    lr: float
    l2: float
    blur_every: int
    blur_sigma: float
    clip_norm_pct: float
    clip_contrib_pct: float
    seed: int


def gaussian_blur(x: jax.Array, sigma: float) -> jax.Array:
    """Separable Gaussian blur of each channel of (N, H, W, C), edges padded by reflection."""
    if sigma <= 0:
        return x
    radius = max(1, math.ceil(2 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps = jnp.asarray(taps / taps.sum(), x.dtype)
    channels = x.shape[-1]
    for axis, shape in ((1, (len(taps), 1)), (2, (1, len(taps)))):
        pad = [(0, 0)] * 4
        pad[axis] = (radius, radius)
        padded = jnp.pad(x, pad, mode="reflect")
        kernel = jnp.tile(taps.reshape(*shape, 1, 1), (1, 1, 1, channels))
        x = jax.lax.conv_general_dilated(padded, kernel, (1, 1), "VALID",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                         feature_group_count=channels)
    return x


def _below_percentile(values: jax.Array, pct: float) -> jax.Array:
    """(N, H, W) True where a value is below its image's `pct` percentile (none at pct=0)."""
    if pct <= 0:
        return jnp.zeros(values.shape, bool)
    threshold = jnp.percentile(values.reshape(len(values), -1), pct, axis=1)
    return values < threshold[:, None, None]


def ascend(objective: Objective, mean: jax.Array, shape: tuple[int, ...],
           settings: AscentSettings) -> tuple[jax.Array, jax.Array]:
    """(pixels (N, H, W, C) on [0, 1], objective values per step (steps, N)) after
    `settings.steps` regularized ascent steps from seeded noise about `mean` (C,)."""
    s = settings
    low, high = -mean, 1.0 - mean
    start = 0.01 * jax.random.normal(jax.random.PRNGKey(s.seed), shape)

    def step(x: jax.Array, i: jax.Array) -> tuple[jax.Array, jax.Array]:
        values, vjp = jax.vjp(lambda x: objective(mean + x), x)
        (grad,) = vjp(jnp.ones_like(values))
        scale = jnp.mean(jnp.abs(grad), axis=(1, 2, 3), keepdims=True) + 1e-12
        x = (x + s.lr * grad / scale) * (1.0 - s.l2)
        x = jnp.where((i + 1) % s.blur_every == 0, gaussian_blur(x, s.blur_sigma), x)
        small_norm = _below_percentile(jnp.linalg.norm(x, axis=-1), s.clip_norm_pct)
        small_contrib = _below_percentile(jnp.abs(jnp.sum(x * grad, axis=-1)),
                                          s.clip_contrib_pct)
        x = jnp.where((small_norm | small_contrib)[..., None], 0.0, x)
        return jnp.clip(x, low, high), values

    x, history = jax.lax.scan(step, start, jnp.arange(s.steps))
    return mean + x, history
