"""A 2-D convolution whose gradients are convolutions in canonical form, for XLA on CPU.

Autodiff turns a convolution's gradients into convolutions with unusual dimension labels (the
kernel flipped with in/out swapped for the input gradient; batch as the contracted feature for
the kernel gradient) and leaves their layouts to XLA, program by program. XLA's CPU runtime
runs some of the layouts it picks on a slow generic path: the input gradient ~9x slower than
the forward pass when a chunk held one step, the kernel gradient ResNet-20's whole step at
13.5 s instead of 0.37 s. Here both gradients are explicit convolutions whose operands are
laid out as the forward pass's (NHWC input, HWIO kernel): the input gradient convolves the
output gradient with the kernel flipped and swapped, materialized (`_input_gradient`); the
kernel gradient convolves the input, transposed to (C, H, W, N), with the output gradient
transposed to (Ho, Wo, N, O) as the kernel (`_kernel_gradient`); stride-1 3x3 layers of
few channels on wide maps (ResNet-20's 32x32x16) take it as matmuls over batch tiles instead
(`_matmul_kernel_gradient`), where that convolution ran at half a matmul's pace, and 1x1
layers as one matmul (`_pointwise_kernel_gradient`). Stride-2 3x3 layers of few channels take
their input gradient as one undilated convolution over the input's phases
(`_phase_input_gradient`): XLA:CPU runs a dilated `dy` slowly. The forward
pass is XLA's own. On GPU/TPU, XLA's convolutions are used unchanged. `stored` (used by the
residual blocks, through `Layers.stored`) keeps a value XLA:CPU would recompute in each of its
consumers in one buffer instead.

(Until 2026-12-05 the kernel gradient was one matmul per kernel offset, each reading a strided
slice of the padded input. In jaxlib 0.10.2 those slices cost more than the matmuls: each was
a transposing copy that recomputed the input's BatchNorm and ReLU chain, half the step's time.)

Output maps of at most `SMALL_MAP` pixels (VGG's 2x2 conv5 layers at 32x32 input) are computed
as one matmul over the stacked kernel-offset windows of the input instead ("im2col"): XLA's CPU
convolution takes a pathological path there (512->512 channels at 2x2, batch 128: 4.1 s
forward, 9.0 s for both gradients, against 72 ms and 120 ms as a matmul; at 3x3 and larger the
two are even, and the convolution wins on wide maps).

Under bfloat16 compute, x, w and dy are bfloat16 (flax casts the float32 kernel before the
call); dx comes back in x's dtype and the kernel gradient in w's, as custom_vjp requires.
"""

import functools
import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cnnlab.models import geometry
from cnnlab.models.geometry import output_size

_NHWC = ("NHWC", "HWIO", "NHWC")
# Output maps up to this many pixels are computed as a matmul (`_im2col`).
SMALL_MAP = 4


def offset_window(xp: jax.Array, i: int, j: int, out: tuple[int, int],
                  strides: tuple) -> jax.Array:
    """The pixels of the padded NHWC input `xp` that kernel offset (i, j) meets at each of the
    `out` output positions: a strided slice."""
    (ho, wo), (sh, sw) = out, strides
    end = (xp.shape[0], i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, xp.shape[3])
    return lax.slice(xp, (0, i, j, 0), end, (1, sh, sw, 1))


def _forward(x: jax.Array, w: jax.Array, strides: tuple, padding: tuple) -> jax.Array:
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_nhwc(x: jax.Array, w: jax.Array, strides: tuple, padding: tuple) -> jax.Array:
    return _forward(x, w, strides, padding)


def _fwd(x: jax.Array, w: jax.Array, strides: tuple, padding: tuple) -> tuple:
    return _forward(x, w, strides, padding), (x, w)


def _input_gradient(x_shape: tuple, w: jax.Array, strides: tuple, padding: tuple,
                    dy: jax.Array) -> jax.Array:
    """dL/dx: `dy` dilated by the strides, convolved with the kernel flipped and its in/out
    channels swapped (what autodiff computes, with lax's padding rule). The swapped kernel is
    materialized in HWIO (`optimization_barrier`, a few KB): left to XLA, the swap can become
    the convolution's dimension labels (01oi), which its CPU runtime ran on a generic path
    ~9x slower than the forward pass when a chunk held one step (train.steps_per_call=1)."""
    if takes_phase_input_gradient(w.shape, strides):
        return _phase_input_gradient(x_shape, w, strides, padding, dy)
    kernel = lax.optimization_barrier(jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2))
    pads = []
    for size, k, s, (lo, _), out in zip(x_shape[1:3], w.shape[:2], strides, padding,
                                        dy.shape[1:3], strict=True):
        before = k - 1 - lo
        pads.append((before, size + k - 1 - ((out - 1) * s + 1) - before))
    return lax.conv_general_dilated(dy, kernel, (1, 1), pads, lhs_dilation=strides,
                                    dimension_numbers=_NHWC)


def takes_phase_input_gradient(w_shape: tuple, strides: tuple) -> bool:
    """Whether a layer's input gradient is `_phase_input_gradient`'s: a stride-2 3x3 layer of
    at most 32 input channels. Alone, on one AMD EPYC's 2 cores (batch 128): 32x32x16 -> 32
    took 1.8 against 5.1 ms, 16x16x32 -> 64 1.4 against 1.6; with 64 channels and more
    (ResNet-18's), and for 1x1 kernels, the dilated convolution was faster (16/9 of its
    multiply-adds for a 3x3 kernel, 4x for a 1x1)."""
    kh, kw, c, _ = w_shape
    return tuple(strides) == (2, 2) and (kh, kw) == (3, 3) and c <= 32


def _phase_taps(k: int, s: int, lo: int) -> list[list[tuple[int, int]]]:
    """Along one axis, for each phase p (input positions s*a + p): the kernel offsets i that
    reach it and the output row a + d each comes from, as (i, d). The forward pass reads input
    s*h + i - lo into output h, so i must be congruent to p + lo mod s, and d = (p + lo - i)/s."""
    return [[(i, (p + lo - i) // s) for i in range(k) if (p + lo - i) % s == 0] for p in range(s)]


def _phase_input_gradient(x_shape: tuple, w: jax.Array, strides: tuple, padding: tuple,
                          dy: jax.Array) -> jax.Array:
    """dL/dx of a strided convolution as one stride-1 convolution of `dy` (sub-pixel form):
    the input's s*s phases (positions s*a + p along each axis) are each a sum of a few kernel
    offsets applied to `dy` at rows a + d, so one small kernel over `dy` with s*s*C output
    channels (zero where a phase has no such offset) computes all phases, interleaved after.
    XLA:CPU runs the usual form, `dy` dilated by the strides, far below a convolution's pace
    on few channels (ResNet-20's 32x32x16 -> 32 layer: 5.1 ms against 1.8)."""
    kh, kw, c, o = w.shape
    n = dy.shape[0]
    taps, firsts, spans, pads, phases = [], [], [], [(0, 0, 0)], []
    for size, k, s, (lo, _), out in zip(x_shape[1:3], (kh, kw), strides, padding,
                                        dy.shape[1:3], strict=True):
        axis = _phase_taps(k, s, lo)
        d = [d for phase in axis for _, d in phase]
        first, span, count = min(d), max(d) - min(d) + 1, -(-size // s)
        taps.append(axis)
        firsts.append(first)
        spans.append(span)
        phases.append(count)
        # `dy` rows first .. count + span - 2 + first, zeros outside it (lax.pad crops if < 0).
        pads.append((-first, count + span - 1 - out + first, 0))
    pads.append((0, 0, 0))
    # Which kernel offset (kh * kw: none, a zero) each (window row, window column, phase row,
    # phase column) takes, with the window relative to the first row any phase reads.
    (rows, cols), (first_row, first_col), (sr, sc) = taps, firsts, strides
    which = np.full((spans[0], spans[1], sr, sc), kh * kw)
    for pr, pc in itertools.product(range(sr), range(sc)):
        for (i, di), (j, dj) in itertools.product(rows[pr], cols[pc]):
            which[di - first_row, dj - first_col, pr, pc] = i * kw + j
    offsets = jnp.concatenate([w.reshape(kh * kw, c, o), jnp.zeros((1, c, o), w.dtype)])
    kernel = offsets[which].transpose(0, 1, 5, 2, 3, 4).reshape(*spans, o, sr * sc * c)
    grad = lax.conv_general_dilated(lax.pad(dy, jnp.zeros((), dy.dtype), pads),
                                    lax.optimization_barrier(kernel), (1, 1), ((0, 0), (0, 0)),
                                    dimension_numbers=_NHWC)
    grad = grad.reshape(n, *phases, sr, sc, c).transpose(0, 1, 3, 2, 4, 5)
    return grad.reshape(n, phases[0] * sr, phases[1] * sc, c)[:, :x_shape[1], :x_shape[2]]


def stored(x: jax.Array) -> jax.Array:
    """`x` itself, computed once into a buffer of its own: divided by a 1 that XLA cannot see
    is a 1 (exact). XLA:CPU fuses cheap elementwise producers into every consumer, so a value
    that several consumers read is recomputed in each of them. Along a ResNet's residual
    stream (each block's output = ReLU(BN(conv) + its input)) that recomputation chains: the
    ninth block's output was a fusion re-running the BatchNorm, add and ReLU of all nine blocks
    of its stage, once per consumer, forward and backward (ResNet-56: fusions of up to 11
    convolution outputs). A division is one of the operations XLA:CPU counts as expensive and
    never duplicates into several consumers (one consumer still fuses it), and its gradient is
    again such a division. `lax.optimization_barrier` alone cannot do this: XLA:CPU removes
    barriers before it fuses (it is kept here only to hide the 1 from the algebraic
    simplifier)."""
    return x / lax.optimization_barrier(jnp.ones((), x.dtype))


def _materialized(x: jax.Array) -> jax.Array:
    """`x` as an operation XLA cannot fuse into its consumer, for the kernel gradient's
    transpose: without it, the transpose recomputed the input's BatchNorm/ReLU chain in
    transposed order (ResNet-20: 130 of a 285 ms step, about 2.5 ms per transpose instead of
    0.3 ms). Times the identity over channels (exact). `stored` cannot stand in for it here:
    with the transpose as its one consumer, XLA fuses the division into it (ResNet-20: 200-220
    ms a step against 170-205)."""
    return jnp.einsum("nhwc,cd->nhwd", x, jnp.eye(x.shape[-1], dtype=x.dtype))


def _kernel_gradient(x: jax.Array, w_shape: tuple, strides: tuple, padding: tuple,
                     dy: jax.Array) -> jax.Array:
    """dL/dw as an explicit convolution in the forward pass's canonical form: the input's
    channels as the batch and its images as the features (`x` as (C, H, W, N)), the output
    gradient as the kernel ((Ho, Wo, N, O), dilated by the strides), so that the result is
    (C, kh, kw, O). Autodiff writes the same sum with exotic dimension labels and lets XLA
    pick the layouts per program; in some programs (one step per call) that took a generic
    path: ResNet-20 at 13.5 s a step instead of 0.37 s. Layers of few channels on wide maps
    take matmuls instead (`_matmul_kernel_gradient`), and so do 1x1 layers
    (`_pointwise_kernel_gradient`)."""
    # Float32 accumulation under bfloat16 compute (train.precision): the sum runs over every
    # pixel of the batch, far past bfloat16's 8-bit mantissa; float64 stays float64.
    accumulate = jnp.promote_types(dy.dtype, jnp.float32)
    if takes_matmul_kernel_gradient(w_shape, strides, padding, dy.shape):
        return _matmul_kernel_gradient(x, w_shape, padding, dy, accumulate)
    if w_shape[:2] == (1, 1) and all(p == (0, 0) for p in padding):
        return _pointwise_kernel_gradient(x, strides, dy, accumulate)
    pads = []
    for size, k, s, (lo, hi), out in zip(x.shape[1:3], w_shape[:2], strides, padding,
                                         dy.shape[1:3], strict=True):
        # The padding's far side cropped to exactly `k` outputs (a stride can leave a rest).
        pads.append((lo, hi - (size + lo + hi - (out - 1) * s - k)))
    # Inputs of few channels (an RGB stem's) are left to the transpose: a matmul of 3 columns
    # runs far below a matmul's pace (ResNet-18: 615 against 655 ms a step).
    if x.shape[-1] >= 8:
        x = _materialized(x)
    grad = lax.conv_general_dilated(x.transpose(3, 1, 2, 0), dy.transpose(1, 2, 0, 3), (1, 1),
                                    pads, rhs_dilation=strides, dimension_numbers=_NHWC,
                                    preferred_element_type=accumulate)
    return grad.transpose(1, 2, 0, 3)


# A batch tile of `_matmul_kernel_gradient` holds about this many bytes of shifted input, so
# that the tile's operands stay in the caches: ResNet-20's 32x32x16 layers, batch 128, in one
# tile took 20 ms, in 16-image tiles (3.3 MB) 3 ms.
MATMUL_TILE_BYTES = 4 << 20


def takes_matmul_kernel_gradient(w_shape: tuple, strides: tuple, padding: tuple,
                                 out_shape: tuple) -> bool:
    """Whether a layer's kernel gradient is `_matmul_kernel_gradient`'s: a stride-1 3x3 layer
    of 8-24 input and at most 32 output channels, on an output map of at least 16x16. There
    the matmul beat the convolution by 1.3-2.8x, alone, on one AMD EPYC's 2 cores (32x32x16,
    batch 128: 3.0 against 5.1-5.3 ms; 32x32x8: 1.5 against 3.0; 16x16x24: 1.8 against 2.4).
    Outside it, it lost or tied: 16x16x32 tied, 8x8x16 and 8x8x64 lost, and so did 3-channel
    stems (their columns too few for a matmul's pace). ResNet-18's 56x56x64 layers (batch 16)
    took 17 against 24 ms alone, but their step was slower with it (716 against 668 ms,
    medians of 16 interleaved calls), so wider layers keep the convolution."""
    kh, kw, c, o = w_shape
    return (tuple(strides) == (1, 1) and (kh, kw) == (3, 3) and 8 <= c <= 24 and o <= 32
            and out_shape[1] * out_shape[2] >= 256 and min(min(p) for p in padding) >= 0)


def _pointwise_kernel_gradient(x: jax.Array, strides: tuple, dy: jax.Array,
                               accumulate: jnp.dtype) -> jax.Array:
    """dL/dw of an unpadded 1x1 convolution: one matmul of the pixels it reads (every s-th)
    with `dy`, over every (image, row, column). The convolution form took 2.7-6x as long, alone
    (ResNet-18's 1x1/2 projections, batch 16: 3.7 against 1.2 ms at 56x56x64; ResNet-50's
    56x56x256 -> 64: 62 against 10 ms)."""
    pixels = x[:, ::strides[0], ::strides[1]][:, :dy.shape[1], :dy.shape[2]]
    grad = lax.dot_general(pixels.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1]),
                           (((0,), (0,)), ((), ())), preferred_element_type=accumulate)
    return grad[None, None]


def _tile_kernel_gradient(x: jax.Array, dy: jax.Array, padding: tuple,
                          accumulate: jnp.dtype) -> jax.Array:
    """One batch tile's dL/dw of a stride-1 3x3 convolution as one (3C, 3O) matmul summed
    over every (image, row, column): the padded input's 3 column offsets side by side in its
    features, the output gradient's 3 row offsets side by side in its features (shifted down
    by the offset over rows of zeros). Entry ((j, c), (i, o)) then sums, over the tile's n,
    r and w, xp[n, r, w + j, c] * dy[n, r - i, w, o] (xp: the padded input); with h = r - i,
    that is xp[n, h + i, w + j, c] * dy[n, h, w, o], dL/dw[i, j, c, o]."""
    (top, bottom), (left, right) = padding
    _, out_rows, out_cols, o = dy.shape
    rows = out_rows + 2  # the padded input's rows: those the 3 row offsets reach
    xp = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    columns = jnp.concatenate([xp[:, :, j:j + out_cols] for j in range(3)], axis=-1)
    dyp = jnp.pad(dy, ((0, 0), (2, 2), (0, 0), (0, 0)))
    shifted = jnp.concatenate([dyp[:, 2 - i:2 - i + rows] for i in range(3)], axis=-1)
    grad = lax.dot_general(columns.reshape(-1, 3 * x.shape[-1]), shifted.reshape(-1, 3 * o),
                           (((0,), (0,)), ((), ())), preferred_element_type=accumulate)
    return grad.reshape(3, x.shape[-1], 3, o).transpose(2, 0, 1, 3)


def _matmul_kernel_gradient(x: jax.Array, w_shape: tuple, padding: tuple, dy: jax.Array,
                            accumulate: jnp.dtype) -> jax.Array:
    """dL/dw as matmuls over batch tiles (`_tile_kernel_gradient`), summed in a loop. It needs
    neither the transposes of the convolution form nor its convolution, which XLA:CPU's
    Eigen runs at half a matmul's pace for few channels (ResNet-20's step: 162 against 170 ms,
    ResNet-56's: 467 against 494 ms; medians of interleaved calls, idle). Its tiles are
    `batch_tiles`', which keep a batch split over devices on its devices."""
    n, out_rows, out_cols = dy.shape[:3]
    per_image = (out_rows + 2) * out_cols * 3 * x.shape[-1] * x.dtype.itemsize
    tile = geometry.tile_size(n, per_image, MATMUL_TILE_BYTES)
    xs, dys = batch_tiles(x, tile), batch_tiles(dy, tile)

    def add_tile(k: jax.Array, total: jax.Array) -> jax.Array:
        xt, dyt = tile_at(xs, k), tile_at(dys, k)
        return total + _tile_kernel_gradient(xt, dyt, padding, accumulate)

    return lax.fori_loop(0, n // tile, add_tile, jnp.zeros(w_shape, accumulate))


def batch_tiles(a: jax.Array, tile: int) -> jax.Array:
    """The batch `a` as (tile, n / tile, ...) for a loop over tiles of `tile` images: tile k
    (`tile_at`) holds images k, k + n/tile, k + 2n/tile, ... A batch split over devices (its
    leading images on the first) keeps each device's images on it in every tile; tiles of
    consecutive images had XLA gather the whole batch on every device."""
    return a.reshape(tile, a.shape[0] // tile, *a.shape[1:])


def tile_at(tiles: jax.Array, k: jax.Array) -> jax.Array:
    """Tile `k` (a traced loop index) of `batch_tiles`' layout."""
    return lax.dynamic_index_in_dim(tiles, k, axis=1, keepdims=False)


def _bwd(strides: tuple, padding: tuple, residuals: tuple, dy: jax.Array) -> tuple:
    x, w = residuals
    dx = _input_gradient(x.shape, w, strides, padding, dy).astype(x.dtype)
    return dx, _kernel_gradient(x, w.shape, strides, padding, dy).astype(w.dtype)


conv_nhwc.defvjp(_fwd, _bwd)


def im2col(x: jax.Array, w: jax.Array, strides: tuple, padding: tuple,
            out: tuple[int, int]) -> jax.Array:
    """The convolution as one matmul: the input windows of every kernel offset side by side
    (kh*kw*C features per output pixel) times the kernel reshaped to (kh*kw*C, O). Its
    gradients are autodiff's of slices and a matmul, all fast on CPU."""
    kh, kw, c, o = w.shape
    xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    n, (ho, wo) = xp.shape[0], out
    windows = [offset_window(xp, i, j, out, strides) for i in range(kh) for j in range(kw)]
    patches = jnp.concatenate(windows, axis=-1).reshape(n * ho * wo, kh * kw * c)
    return (patches @ w.reshape(kh * kw * c, o)).reshape(n, ho, wo, o)


def is_plain(lhs: jax.Array, rhs: jax.Array, padding: str | Sequence[tuple[int, int]],
             lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
             feature_group_count: int = 1, **_: object) -> bool:
    """An ungrouped, undilated NHWC/HWIO convolution with explicit padding (the arguments of
    `lax.conv_general_dilated` from `padding` on)."""
    return (
        lhs.ndim == 4 and not isinstance(padding, str) and feature_group_count == 1
        and all(d == 1 for d in (lhs_dilation or (1, 1)))
        and all(d == 1 for d in (rhs_dilation or (1, 1)))
        and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
        == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
    )


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                         padding: str | Sequence[tuple[int, int]], lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count: int = 1,
                         precision=None, preferred_element_type=None) -> jax.Array:
    """Drop-in for `lax.conv_general_dilated` (as `nn.Conv(conv_general_dilated=...)` calls it);
    plain NHWC convolutions take the canonical-gradient path, anything else goes to lax."""
    if not is_plain(lhs, rhs, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                    feature_group_count):
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, precision=precision,
            preferred_element_type=preferred_element_type)
    strides, pads = tuple(window_strides), tuple(tuple(p) for p in padding)
    out = tuple(output_size(size, k, s, p)
                for size, k, s, p in zip(lhs.shape[1:3], rhs.shape[:2], strides, pads, strict=True))
    if out[0] * out[1] <= SMALL_MAP:
        return im2col(lhs, rhs, strides, pads, out)
    return conv_nhwc(lhs, rhs, strides, pads)
