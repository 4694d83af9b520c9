"""Candidate implementations of a plain NHWC/HWIO 2-D convolution, as matmuls, in JAX.

XLA's CPU convolutions reach a fraction of its matmul rate (docs/speed.md, the per-layer
table). Each candidate here writes the same convolution as large matmuls, and its gradients
are autodiff's of that formulation: transposed matmuls and the transposes of slices (pads),
so they are matmul-shaped too.

- `xla`: cnnlab's default path (`conv.conv_general_dilated`): XLA's forward convolution,
  both gradients as XLA convolutions in canonical form (output maps of at most 4 pixels:
  one matmul).
- `im2col`: every kernel offset's input window side by side (kh*kw*C features per output
  pixel) times the kernel as a (kh*kw*C, O) matrix: one matmul, any kernel and stride.
- `winograd2`, `winograd4`: Winograd's F(2x2, 3x3) and F(4x4, 3x3) (Lavin & Gray 2015) for
  stride-1 3x3 kernels: the input cut into overlapping (m+2)x(m+2) tiles, each tile and the
  kernel transformed by small constant matrices, the products over channels as one batched
  matmul (one (tiles, C) x (C, O) matmul per transformed position), and the output transform.
  2.25x (F(2,3)) and 4x (F(4,3)) fewer multiplies than the direct form. F(4x4, 3x3)'s
  transforms have entries up to 8 and 1/24, so its float32 error is larger (tests bound it).

Every candidate takes (x, w, strides, pads) with pads ((top, bottom), (left, right)).
`applies(name, w_shape, strides)` says whether a candidate can compute a layer.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from cnnlab.models import conv, geometry
from cnnlab.registry import Registry

_NHWC = ("NHWC", "HWIO", "NHWC")
Impl = Callable[[jax.Array, jax.Array, tuple, tuple], jax.Array]
IMPLS: Registry[Impl] = Registry("train.conv_impl")


def out_size(x_shape: tuple, w_shape: tuple, strides: tuple, pads: tuple) -> tuple[int, int]:
    return tuple((size + lo + hi - k) // s + 1 for size, k, s, (lo, hi)
                 in zip(x_shape[1:3], w_shape[:2], strides, pads, strict=True))


@IMPLS.register("xla")
def xla(x: jax.Array, w: jax.Array, strides: tuple, pads: tuple) -> jax.Array:
    """cnnlab's default path (`conv.conv_general_dilated`): XLA's convolutions, the gradients
    in canonical form, im2col for output maps of at most 4 pixels."""
    return conv.conv_general_dilated(x, w, strides, pads, dimension_numbers=_NHWC)


def im2col(x: jax.Array, w: jax.Array, strides: tuple, pads: tuple) -> jax.Array:
    """One matmul: (N*Ho*Wo, kh*kw*C) patches times the (kh*kw*C, O) kernel."""
    return conv.im2col(x, w, strides, pads, out_size(x.shape, w.shape, strides, pads))


# Bytes of a batch tile's largest intermediate (im2col's patches): a few MB, so that a tile's
# patches, matmul and gradients stay in the caches. One 75 MB patch matrix (ResNet-20's
# 32x32x16 layers, batch 128) took 8x longer to write than XLA's whole convolution.
TILE_BYTES = 4 << 20


def batch_tile(n: int, bytes_per_image: int) -> int:
    """The largest divisor of the batch `n` whose images' intermediates fit in `TILE_BYTES`."""
    return geometry.tile_size(n, bytes_per_image, TILE_BYTES)


def tiled(fn: Impl, x: jax.Array, w: jax.Array, strides: tuple, pads: tuple,
          tile: int) -> jax.Array:
    """`fn` over batch tiles of `tile` images (a loop), its gradients too: the input gradient
    tile by tile, the kernel gradient summed over the tiles. The tiles are `conv.batch_tiles`',
    which keep a batch split over devices on its devices."""
    return _tiled(fn, strides, pads, tile, x, w)


def _tile_loop(body: Callable[[jax.Array], jax.Array], tiles: jax.Array) -> jax.Array:
    """`body` of each tile of `tiles` (`conv.batch_tiles`), its results put back in the
    batch's order."""
    count = tiles.shape[1]
    out = jax.eval_shape(body, conv.tile_at(tiles, 0))
    result = jnp.zeros((out.shape[0], count, *out.shape[1:]), out.dtype)

    def put(k: jax.Array, result: jax.Array) -> jax.Array:
        value = body(conv.tile_at(tiles, k))
        return jax.lax.dynamic_update_index_in_dim(result, value[:, None], k, axis=1)

    result = jax.lax.fori_loop(0, count, put, result)
    return result.reshape(-1, *out.shape[1:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _tiled(fn: Impl, strides: tuple, pads: tuple, tile: int, x: jax.Array,
           w: jax.Array) -> jax.Array:
    return _tile_loop(lambda xt: fn(xt, w, strides, pads), conv.batch_tiles(x, tile))


def _tiled_fwd(fn, strides, pads, tile, x, w):
    return _tiled(fn, strides, pads, tile, x, w), (x, w)


def _tiled_bwd(fn, strides, pads, tile, residuals, dy):
    x, w = residuals
    xs, dys = conv.batch_tiles(x, tile), conv.batch_tiles(dy, tile)

    def input_grad(dyt):
        # Linear in x: the tile's values do not matter, only its shape.
        zeros = jnp.zeros((tile, *x.shape[1:]), x.dtype)
        return jax.vjp(lambda xt: fn(xt, w, strides, pads), zeros)[1](dyt)[0]

    def kernel_grad(k, acc):
        xt, dyt = conv.tile_at(xs, k), conv.tile_at(dys, k)
        return acc + jax.vjp(lambda v: fn(xt, v, strides, pads), w)[1](dyt)[0]

    dx = _tile_loop(input_grad, dys)
    dw = jax.lax.fori_loop(0, xs.shape[1], kernel_grad, jnp.zeros_like(w))
    return dx, dw


_tiled.defvjp(_tiled_fwd, _tiled_bwd)


def _patch_bytes(x_shape: tuple, w_shape: tuple, strides: tuple, pads: tuple) -> int:
    ho, wo = out_size(x_shape, w_shape, strides, pads)
    return ho * wo * w_shape[0] * w_shape[1] * w_shape[2] * 4


@IMPLS.register("im2col")
def im2col_tiled(x: jax.Array, w: jax.Array, strides: tuple, pads: tuple) -> jax.Array:
    """im2col in batch tiles whose patches take about `TILE_BYTES`."""
    tile = batch_tile(x.shape[0], _patch_bytes(x.shape, w.shape, strides, pads))
    return tiled(im2col, x, w, strides, pads, tile)


# Winograd F(m x m, 3x3) transforms, (B^T, G, A^T), exact in binary fractions but 1/6, 1/12.
_F2 = (
    [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
    [[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]],
    [[1, 1, 1, 0], [0, 1, -1, -1]],
)
_F4 = (
    [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
     [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
    [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
     [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
    [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
)


def _tiles(xp: jax.Array, m: int, tiles: tuple[int, int]) -> jax.Array:
    """(a, a, N, Th, Tw, C): the a x a input tile (a = m + 2) under each m x m output tile.

    Tile t starts at row t*m; rows of blocks of m make that reshapes and unit-stride slices
    (whose gradients are pads), not strided gathers."""
    n, c, (th, tw), a = xp.shape[0], xp.shape[3], tiles, m + 2
    # Blocks of m rows: tile t is block t followed by the first 2 rows of block t + 1.
    rows = xp.reshape(n, th + 1, m, xp.shape[2], c)
    rows = jnp.concatenate([rows[:, :th], rows[:, 1:, :2]], axis=2)  # (N, Th, a, W, C)
    cols = rows.reshape(n, th, a, tw + 1, m, c)
    cols = jnp.concatenate([cols[:, :, :, :tw], cols[:, :, :, 1:, :2]], axis=4)
    return cols.transpose(2, 4, 0, 1, 3, 5)  # (a, a, N, Th, Tw, C)


def winograd(x: jax.Array, w: jax.Array, pads: tuple, m: int) -> jax.Array:
    """F(m x m, 3x3) for a stride-1 3x3 convolution (see the module's docstring)."""
    bt, g, at = (np.asarray(t, np.float64) for t in (_F2 if m == 2 else _F4))
    dtype = x.dtype
    bt, g, at = (jnp.asarray(t, dtype) for t in (bt, g, at))
    ho, wo = out_size(x.shape, w.shape, (1, 1), pads)
    th, tw = -(-ho // m), -(-wo // m)
    # Padded to (tiles + 1) blocks of m rows and columns, so every tile has its 2 extra rows.
    (top, bottom), (left, right) = pads
    extra_h = (th + 1) * m - (x.shape[1] + top + bottom)
    extra_w = (tw + 1) * m - (x.shape[2] + left + right)
    xp = jnp.pad(x, ((0, 0), (top, bottom + extra_h), (left, right + extra_w), (0, 0)))
    d = _tiles(xp, m, (th, tw))
    # Input transform B^T d B, as two small matmuls over the tile axes.
    v = jnp.einsum("ip,pqnhwc->iqnhwc", bt, d)
    v = jnp.einsum("jq,iqnhwc->ijnhwc", bt, v)
    u = jnp.einsum("ip,jq,pqco->ijco", g, g, w.astype(dtype))
    a = m + 2
    n, c, o = x.shape[0], x.shape[3], w.shape[3]
    # The products summed over channels: a*a matmuls of (N*Th*Tw, C) x (C, O), batched.
    prod = jax.lax.dot_general(v.reshape(a * a, n * th * tw, c), u.reshape(a * a, c, o),
                               (((2,), (1,)), ((0,), (0,))))
    prod = prod.reshape(a, a, n, th, tw, o)
    y = jnp.einsum("ri,ijnhwo->rjnhwo", at, prod)
    y = jnp.einsum("sj,rjnhwo->nhrwso", at, y).reshape(n, th * m, tw * m, o)
    return y[:, :ho, :wo]


def _winograd_tiled(m: int) -> Impl:
    def impl(x: jax.Array, w: jax.Array, strides: tuple, pads: tuple) -> jax.Array:
        # The transformed input: (m + 2)^2 / m^2 values per output pixel and channel.
        ho, wo = out_size(x.shape, w.shape, strides, pads)
        per_image = (m + 2) ** 2 * -(-ho // m) * -(-wo // m) * x.shape[3] * 4
        return tiled(lambda xt, v, s, p: winograd(xt, v, p, m), x, w, strides, pads,
                     batch_tile(x.shape[0], per_image))

    return impl


IMPLS.register("winograd2", _winograd_tiled(2))
IMPLS.register("winograd4", _winograd_tiled(4))


def applies(name: str, w_shape: tuple, strides: tuple) -> bool:
    """Whether candidate `name` computes a layer of kernel `w_shape` (HWIO) and `strides`."""
    if name.startswith("winograd"):
        return tuple(w_shape[:2]) == (3, 3) and tuple(strides) == (1, 1)
    return True
