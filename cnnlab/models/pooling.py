"""Max pooling whose gradient is computed window offset by window offset, for XLA on CPU.

Autodiff turns max pooling's gradient into XLA's select-and-scatter, which its CPU backend runs
10-50x slower than the pooling itself (ResNet-18's 3x3/2 stem pool at 112x112x64, batch 16:
70 ms forward, 700 ms gradient). The same gradient as kh*kw strided comparisons: for each
kernel offset in row-major order, the window positions that hold the maximum and were not
claimed by an earlier offset receive the output gradient, so a tie goes to the first maximum
in the window, as select-and-scatter (and PyTorch) give it. The forward pass is XLA's own.
On GPU/TPU, flax's max_pool is used unchanged.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from cnnlab import parallel
from cnnlab.models.conv import offset_window


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x: jax.Array, window: tuple, strides: tuple, padding: tuple) -> jax.Array:
    return nn.max_pool(x, window, strides, padding)


def _fwd(x: jax.Array, window: tuple, strides: tuple, padding: tuple) -> tuple:
    # Only the input is kept, as autodiff's select-and-scatter keeps it: the backward pass
    # pools it again (a forward pool costs a tenth of the old gradient).
    return nn.max_pool(x, window, strides, padding), x


def _bwd(window: tuple, strides: tuple, padding: tuple, x: jax.Array,
         dy: jax.Array) -> tuple:
    y = nn.max_pool(x, window, strides, padding)
    xp = jnp.pad(x, ((0, 0), *padding, (0, 0)), constant_values=-jnp.inf)
    (sh, sw), (ho, wo) = strides, y.shape[1:3]
    claimed = jnp.zeros(y.shape, bool)
    dxp = jnp.zeros(xp.shape, dy.dtype)
    zero = jnp.zeros((), dy.dtype)
    for i in range(window[0]):
        for j in range(window[1]):
            hit = (offset_window(xp, i, j, (ho, wo), strides) == y) & ~claimed
            claimed = claimed | hit
            # Back to the padded input's grid: offset (i, j), strided, zeros in between.
            high = (xp.shape[1] - i - (ho - 1) * sh - 1, xp.shape[2] - j - (wo - 1) * sw - 1)
            dxp = dxp + lax.pad(jnp.where(hit, dy, zero), zero, (
                (0, 0, 0), (i, high[0], sh - 1), (j, high[1], sw - 1), (0, 0, 0)))
    (top, _), (left, _) = padding
    return (dxp[:, top:top + x.shape[1], left:left + x.shape[2]],)


_max_pool.defvjp(_fwd, _bwd)


def max_pool(x: jax.Array, window: tuple[int, int], strides: tuple[int, int],
             padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    """`nn.max_pool` on NHWC input with explicit padding; on CPU with the gradient above."""
    if parallel.platform() != "cpu" or x.ndim != 4:
        return nn.max_pool(x, window, strides, padding)
    return _max_pool(x, tuple(window), tuple(strides), tuple(tuple(p) for p in padding))
