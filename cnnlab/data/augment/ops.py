"""Batched, seeded augmentation operations: pure jit-able functions of a key and a batch.

How a run chains them (order, keys, config): cnnlab/data/augment/pipeline.py.

The operations, each as its paper or torchvision defines it:

* `crop_pad`: zero-pad each side, cut a random window of the original size (He et al. 2016).
* `flip`: mirror left-right with probability 1/2 (Krizhevsky et al. 2012).
* `resized_crop`: torchvision's RandomResizedCrop, the sampling of Szegedy et al. 2015 (sec. 6:
  "patches whose size is distributed evenly between 8% and 100% of the image area with aspect
  ratio constrained to the interval [3/4, 4/3]"): area fraction ~ U[crop_scale], log aspect
  ratio ~ U[log crop_ratio], width and height rounded to whole pixels; of 10 draws the first that
  fits is used, else the centre crop torchvision falls back to; the box is resized back to the
  image size by bilinear interpolation (half-pixel centres, clamped at the box's edges: PyTorch's
  crop-then-interpolate with align_corners=False; a box never exceeds the image, so this only
  upsamples and antialiasing does not arise).
* `brightness`, `contrast`, `saturation`: torchvision's ColorJitter. Each factor f ~ U[max(0,
  1 - s), 1 + s] per image and the three are applied in a random order per image; brightness
  blends with black (f * x), contrast with the mean of the image's grayscale, saturation with the
  grayscale image, gray = 0.2989 R + 0.587 G + 0.114 B (ITU-R 601-2 luma, torchvision's
  constants), each result clipped to [0, 1]. A grayscale image (C = 1) is its own grayscale:
  contrast uses its mean and saturation leaves it unchanged, as in torchvision.
* `lighting`: AlexNet's PCA colour augmentation (Krizhevsky et al. 2012, sec. 4.1): to every
  pixel of an image add sum_i alpha_i lambda_i p_i, alpha_i ~ N(0, lighting) drawn per image (0.1
  in the paper), with (lambda_i, p_i) the eigenpairs of the covariance of the training set's
  pixel values on the [0, 1] scale (`cnnlab.data.preprocess.channel_pca`; on that scale ImageNet's
  lambda are ~0.22, 0.019, 0.0045, the constants of fb.resnet.torch). Not clipped (the paper
  does not). With C = 1 it is a random brightness shift along the single component.
* `scale_jitter` [S_min, S_max]: Simonyan & Zisserman 2015 (sec. 3.1, "multi-scale training"):
  each image is resized so that its shorter side is S, an integer ~ U{S_min..S_max} per image,
  then a window of the training size (the images' own size) is cut at a uniformly random
  position. The training size is the data's image size, so S_min must be at least its shorter
  side (VGG: 224 crops of images rescaled to S in [256, 512]). Resizing is bilinear with
  half-pixel centres (PyTorch's align_corners=False, clamped at the image's edges); S >= the
  side only enlarges, so antialiasing does not arise. Computed as one crop-and-resize per image
  (two small matrix products), which keeps S dynamic under jit.
* `affine` (rotate, scale, shear, translate): torchvision's RandomAffine, one matrix per image
  about the image's centre: angle ~ U[-rotate, rotate] degrees (positive turns the picture
  counter-clockwise as displayed, as np.rot90 and torchvision do), zoom ~ U[scale], shear ~
  U[-shear, shear] degrees parallel to the x axis, translation ~ U[-translate, translate] x
  the width (height), rounded to whole pixels as torchvision rounds it. Output pixel p takes the
  input at A^-1 (p - c - t) + c, A = rotation . shear . zoom, sampled bilinearly; where the
  source falls outside the image, the missing neighbours count as black (fill 0), so the border
  fades to black over one pixel and uncovered regions are black.
* `hue`: rotation of each image's hue by delta ~ U[-hue, hue] degrees (torchvision's
  adjust_hue: RGB -> HSV, h + delta/360 mod 1, -> RGB; hue = 180 is ColorJitter's hue=0.5).
  RGB only: a grey image has no hue.
* `color_cast`: colour casting (Wu et al. 2015, "Deep Image", data augmentation): to each
  channel of an image add its own integer offset ~ U{-c..c} on the 0-255 scale (Deep Image uses
  20), the same for every pixel; clipped to [0, 1]. With C = 1 it is a brightness shift.
* `cutout`: DeVries & Taylor 2017: one square of side `cutout` px set to zero, its centre
  uniform over the image's pixels, the part outside the image cut off (so near the border less
  than side^2 pixels are erased), applied to every image.
* `mixup`: Zhang et al. 2018: lam ~ Beta(mixup, mixup), one lam per batch, and the batch mixed
  with a random permutation of itself, x = lam x + (1 - lam) x[perm]; targets mixed alike.
"""

import math

import jax
import jax.numpy as jnp

from cnnlab.data.preprocess import to_unit

# torchvision's rgb_to_grayscale weights (ITU-R 601-2 luma).
LUMA = (0.2989, 0.587, 0.114)
# RandomResizedCrop's number of draws before falling back to the centre crop.
CROP_ATTEMPTS = 10


# ------------------------------------------------------------------------------ pixel space

def random_crop(key: jax.Array, images: jax.Array, pad: int) -> jax.Array:
    """Zero-pad each side by `pad` pixels, then cut a random window of the original size."""
    n, h, w, c = images.shape
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    offsets = jax.random.randint(key, (n, 2), 0, 2 * pad + 1)

    def crop(image: jax.Array, offset: jax.Array) -> jax.Array:
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))

    return jax.vmap(crop)(padded, offsets)


def random_flip(key: jax.Array, images: jax.Array) -> jax.Array:
    """Mirror each image left-right with probability 1/2."""
    flip = jax.random.bernoulli(key, 0.5, (images.shape[0], 1, 1, 1))
    return jnp.where(flip, images[:, :, ::-1, :], images)


def sample_crop_boxes(key: jax.Array, n: int, height: int, width: int,
                      scale: tuple[float, float], ratio: tuple[float, float],
                      attempts: int = CROP_ATTEMPTS) -> tuple[jax.Array, ...]:
    """(top, left, box_height, box_width), int32 (n,) each: torchvision's
    RandomResizedCrop.get_params for n images at once (all attempts drawn, the first that fits
    kept)."""
    area_key, ratio_key, top_key, left_key = jax.random.split(key, 4)
    area = height * width * jax.random.uniform(area_key, (n, attempts), minval=scale[0],
                                               maxval=scale[1])
    aspect = jnp.exp(jax.random.uniform(ratio_key, (n, attempts), minval=math.log(ratio[0]),
                                        maxval=math.log(ratio[1])))
    # jnp.round rounds halves to even, as Python's round() in torchvision does.
    box_w = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
    box_h = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
    fits = (box_w > 0) & (box_w <= width) & (box_h > 0) & (box_h <= height)
    first = jnp.argmax(fits, axis=1)[:, None]
    found = jnp.any(fits, axis=1)
    box_w = jnp.take_along_axis(box_w, first, axis=1)[:, 0]
    box_h = jnp.take_along_axis(box_h, first, axis=1)[:, 0]
    # torchvision's fallback: the largest centred box whose ratio is clamped to the range.
    if width / height < min(ratio):
        fallback_w, fallback_h = width, int(round(width / min(ratio)))
    elif width / height > max(ratio):
        fallback_w, fallback_h = int(round(height * max(ratio))), height
    else:
        fallback_w, fallback_h = width, height
    box_w = jnp.where(found, box_w, fallback_w)
    box_h = jnp.where(found, box_h, fallback_h)
    top = jnp.where(found, jax.random.randint(top_key, (n,), 0, height - box_h + 1),
                    (height - fallback_h) // 2)
    left = jnp.where(found, jax.random.randint(left_key, (n,), 0, width - box_w + 1),
                     (width - fallback_w) // 2)
    return top, left, box_h, box_w


def _bilinear_weights(start: jax.Array, length: jax.Array, out_size: int,
                      in_size: int) -> jax.Array:
    """(n, out_size, in_size) interpolation weights resizing [start, start + length) to out_size.

    PyTorch's bilinear with align_corners=False: source = (i + 0.5) * length / out_size - 0.5,
    clamped to the box, and a tent kernel max(0, 1 - |source - j|).
    """
    scale = (length / out_size).astype(jnp.float32)[:, None]
    source = (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * scale - 0.5
    source = jnp.clip(source, 0.0, (length - 1).astype(jnp.float32)[:, None]) + start[:, None]
    return jnp.maximum(0.0, 1.0 - jnp.abs(source[:, :, None] - jnp.arange(in_size)))


def resize_boxes(images: jax.Array, top: jax.Array, left: jax.Array, box_h: jax.Array,
                 box_w: jax.Array) -> jax.Array:
    """Crop box i of image i and resize it bilinearly to the image size (float [0, 1] pixels).

    As two small matrix products per image (rows, then columns), which batch and vectorize
    on any device and keep the box sizes dynamic under jit.
    """
    _, height, width, _ = images.shape
    rows = _bilinear_weights(top, box_h, height, height)
    cols = _bilinear_weights(left, box_w, width, width)
    return jnp.einsum("nyh,nhwc,nxw->nyxc", rows, to_unit(images), cols,
                      precision=jax.lax.Precision.HIGHEST)


def random_resized_crop(key: jax.Array, images: jax.Array, scale: tuple[float, float],
                        ratio: tuple[float, float]) -> jax.Array:
    """torchvision's RandomResizedCrop(size=image size, scale, ratio), per image."""
    n, height, width, _ = images.shape
    return resize_boxes(images, *sample_crop_boxes(key, n, height, width, scale, ratio))


def grayscale(x: jax.Array) -> jax.Array:
    """(N, H, W, 1) luma of RGB images; a single-channel image is returned as it is."""
    if x.shape[-1] == 1:
        return x
    r, g, b = x[..., 0:1], x[..., 1:2], x[..., 2:3]
    return LUMA[0] * r + LUMA[1] * g + LUMA[2] * b


def _per_image(factor: jax.Array) -> jax.Array:
    return factor.reshape(-1, 1, 1, 1)


def adjust_brightness(x: jax.Array, factor: jax.Array) -> jax.Array:
    """torchvision adjust_brightness: blend with black, clip(f x, 0, 1); `factor` (N,)."""
    return jnp.clip(_per_image(factor) * x, 0.0, 1.0)


def adjust_contrast(x: jax.Array, factor: jax.Array) -> jax.Array:
    """torchvision adjust_contrast: blend with the mean of the grayscale image."""
    f = _per_image(factor)
    mean = jnp.mean(grayscale(x), axis=(1, 2, 3), keepdims=True)
    return jnp.clip(f * x + (1.0 - f) * mean, 0.0, 1.0)


def adjust_saturation(x: jax.Array, factor: jax.Array) -> jax.Array:
    """torchvision adjust_saturation: blend with the grayscale image (no-op for C = 1)."""
    if x.shape[-1] == 1:
        return x
    f = _per_image(factor)
    return jnp.clip(f * x + (1.0 - f) * grayscale(x), 0.0, 1.0)


def jitter_factors(key: jax.Array, n: int, strength: float) -> jax.Array:
    """ColorJitter's factors: U[max(0, 1 - s), 1 + s], one per image."""
    return jax.random.uniform(key, (n,), minval=max(0.0, 1.0 - strength), maxval=1.0 + strength)


def color_jitter(key: jax.Array, images: jax.Array, brightness: float = 0.0,
                 contrast: float = 0.0, saturation: float = 0.0) -> jax.Array:
    """torchvision's ColorJitter(brightness, contrast, saturation): the enabled adjustments, each
    with its own factor, in a random order per image. Returns float pixels on [0, 1]."""
    x = to_unit(images)
    n = x.shape[0]
    order_key, *factor_keys = jax.random.split(key, 4)
    ops = [(fn, jitter_factors(k, n, s)) for fn, k, s in zip(
        (adjust_brightness, adjust_contrast, adjust_saturation), factor_keys,
        (brightness, contrast, saturation), strict=True) if s > 0]
    if len(ops) == 1:
        fn, factor = ops[0]
        return fn(x, factor)
    # Row i of `order` is a random permutation of the enabled operations (torch.randperm).
    order = jnp.argsort(jax.random.uniform(order_key, (n, len(ops))), axis=1)
    for position in range(len(ops)):
        choice = _per_image(order[:, position])
        x = jnp.select([choice == i for i in range(len(ops))], [fn(x, f) for fn, f in ops])
    return x


def pca_lighting(key: jax.Array, images: jax.Array, eigvals: jax.Array, eigvecs: jax.Array,
                 sigma: float) -> jax.Array:
    """AlexNet's lighting noise: x + P (alpha * lambda), alpha ~ N(0, sigma^2) per image.

    `eigvals` (C,), `eigvecs` (C, C) with the eigenvectors p_i as columns.
    """
    x = to_unit(images)
    alpha = sigma * jax.random.normal(key, (x.shape[0], x.shape[-1]), jnp.float32)
    # Row n: sum_i alpha_ni lambda_i p_i, written out so no matmul precision mode applies.
    shift = jnp.sum((alpha * eigvals)[:, None, :] * eigvecs[None], axis=-1)
    return x + shift[:, None, None, :]


# ---------------------------------------------------------- scale jitter, affine, hue, cast

def _resize_crop_weights(offset: jax.Array, ratio: jax.Array, out_size: int,
                         in_size: int) -> jax.Array:
    """(n, out_size, in_size) weights of rows [offset, offset + out_size) of the image resized
    by 1 / ratio (PyTorch bilinear, align_corners=False): source = (offset + i + 0.5) * ratio
    - 0.5, clamped to the image, and a tent kernel."""
    ratio = ratio.astype(jnp.float32)[:, None]
    position = offset.astype(jnp.float32)[:, None] + jnp.arange(out_size, dtype=jnp.float32)
    source = jnp.clip((position + 0.5) * ratio - 0.5, 0.0, in_size - 1.0)
    return jnp.maximum(0.0, 1.0 - jnp.abs(source[:, :, None] - jnp.arange(in_size)))


def resized_sizes(side: jax.Array, height: int, width: int) -> tuple[jax.Array, jax.Array]:
    """(height, width) of images whose shorter side is resized to `side` (torchvision's Resize:
    the longer side int(side * long / short))."""
    short, long = min(height, width), max(height, width)
    other = (side * long) // short
    return (side, other) if height <= width else (other, side)


def sample_scale_jitter(key: jax.Array, n: int, height: int, width: int,
                        scales: tuple[int, int]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(S, top, left), int32 (n,) each: the shorter side S ~ U{S_min..S_max} of each resized
    image and the top-left corner of its random height x width window."""
    side_key, top_key, left_key = jax.random.split(key, 3)
    side = jax.random.randint(side_key, (n,), scales[0], scales[1] + 1)
    resized_h, resized_w = resized_sizes(side, height, width)
    top = jax.random.randint(top_key, (n,), 0, resized_h - height + 1)
    left = jax.random.randint(left_key, (n,), 0, resized_w - width + 1)
    return side, top, left


def resize_and_crop(images: jax.Array, side: jax.Array, top: jax.Array,
                    left: jax.Array) -> jax.Array:
    """Image i resized so that its shorter side is side[i], then its HxW window at (top[i],
    left[i]) (float [0, 1] pixels)."""
    _, height, width, _ = images.shape
    resized_h, resized_w = resized_sizes(side, height, width)
    rows = _resize_crop_weights(top, height / resized_h, height, height)
    cols = _resize_crop_weights(left, width / resized_w, width, width)
    return jnp.einsum("nyh,nhwc,nxw->nyxc", rows, to_unit(images), cols,
                      precision=jax.lax.Precision.HIGHEST)


def scale_jitter(key: jax.Array, images: jax.Array, scales: tuple[int, int]) -> jax.Array:
    """VGG's multi-scale training: shorter side resized to S ~ U{scales}, random HxW crop."""
    n, height, width, _ = images.shape
    return resize_and_crop(images, *sample_scale_jitter(key, n, height, width, scales))


def affine_matrices(angle: jax.Array, zoom: jax.Array, shear: jax.Array) -> jax.Array:
    """(n, 2, 2) forward matrices on (x, y) pixel offsets from the centre (y pointing down):
    rotation by `angle` degrees counter-clockwise as displayed, after an x-shear by `shear`
    degrees, after a zoom."""
    a, s = jnp.deg2rad(angle), jnp.deg2rad(shear)
    cos, sin, tan = jnp.cos(a), jnp.sin(a), jnp.tan(s)
    rotation = jnp.stack([jnp.stack([cos, sin], -1), jnp.stack([-sin, cos], -1)], -2)
    one, zero = jnp.ones_like(tan), jnp.zeros_like(tan)
    shearing = jnp.stack([jnp.stack([one, tan], -1), jnp.stack([zero, one], -1)], -2)
    return rotation @ shearing * zoom[:, None, None]


def _gather(images: jax.Array, rows: jax.Array, cols: jax.Array, fill: float) -> jax.Array:
    n, height, width, channels = images.shape
    inside = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
    flat = (jnp.clip(rows, 0, height - 1) * width + jnp.clip(cols, 0, width - 1)).reshape(n, -1)
    values = jnp.take_along_axis(images.reshape(n, height * width, channels), flat[..., None],
                                 axis=1).reshape(n, *rows.shape[1:], channels)
    return jnp.where(inside[..., None], values, fill)


def bilinear_sample(images: jax.Array, rows: jax.Array, cols: jax.Array,
                    fill: float = 0.0) -> jax.Array:
    """images[n] read at the (n, H', W') float positions (rows, cols), bilinearly; neighbours
    outside the image count as `fill`."""
    row0, col0 = jnp.floor(rows), jnp.floor(cols)
    out = 0.0
    for dy in (0, 1):
        for dx in (0, 1):
            weight = (1.0 - jnp.abs(rows - row0 - dy)) * (1.0 - jnp.abs(cols - col0 - dx))
            value = _gather(images, (row0 + dy).astype(jnp.int32),
                            (col0 + dx).astype(jnp.int32), fill)
            out = out + weight[..., None] * value
    return out


def warp_affine(images: jax.Array, matrices: jax.Array, shifts: jax.Array,
                fill: float = 0.0) -> jax.Array:
    """Output pixel p = input at A^-1 (p - c - t) + c: `matrices` (n, 2, 2) forward A on (x, y)
    offsets from the centre c, `shifts` (n, 2) the translation t = (tx, ty) in pixels."""
    _, height, width, _ = images.shape
    cy, cx = (height - 1) / 2.0, (width - 1) / 2.0
    ys, xs = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32),
                          jnp.arange(width, dtype=jnp.float32), indexing="ij")
    offsets = jnp.stack([xs - cx, ys - cy], -1)[None] - shifts[:, None, None, :]
    inverse = jnp.linalg.inv(matrices)
    source = jnp.einsum("nij,nhwj->nhwi", inverse, offsets, precision=jax.lax.Precision.HIGHEST)
    return bilinear_sample(to_unit(images), source[..., 1] + cy, source[..., 0] + cx, fill)


def random_affine(key: jax.Array, images: jax.Array, rotate: float, scale: tuple[float, float],
                  shear: float, translate: float) -> jax.Array:
    """torchvision's RandomAffine(rotate, (translate, translate), scale, shear), fill 0."""
    n, height, width, _ = images.shape
    angle_key, zoom_key, shear_key, shift_key = jax.random.split(key, 4)
    angle = jax.random.uniform(angle_key, (n,), minval=-rotate, maxval=rotate)
    zoom = jax.random.uniform(zoom_key, (n,), minval=scale[0], maxval=scale[1])
    shearing = jax.random.uniform(shear_key, (n,), minval=-shear, maxval=shear)
    limit = jnp.array([translate * width, translate * height], jnp.float32)
    shifts = jnp.round(jax.random.uniform(shift_key, (n, 2), minval=-limit, maxval=limit))
    return warp_affine(images, affine_matrices(angle, zoom, shearing), shifts)


def rgb_to_hsv(x: jax.Array) -> jax.Array:
    """torchvision's _rgb2hsv on (..., 3) pixels in [0, 1]; h in [0, 1)."""
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    maxc, minc = jnp.max(x, axis=-1), jnp.min(x, axis=-1)
    chroma = maxc - minc
    s = chroma / jnp.where(maxc == 0, 1.0, maxc)
    safe = jnp.where(chroma == 0, 1.0, chroma)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = jnp.where(maxc == r, bc - gc, jnp.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = jnp.where(chroma == 0, 0.0, h)
    return jnp.stack([jnp.mod(h / 6.0 + 1.0, 1.0), s, maxc], -1)


def hsv_to_rgb(x: jax.Array) -> jax.Array:
    """torchvision's _hsv2rgb: the inverse of rgb_to_hsv."""
    h, s, v = x[..., 0], x[..., 1], x[..., 2]
    sector = jnp.floor(h * 6.0)
    f = h * 6.0 - sector
    sector = sector.astype(jnp.int32) % 6
    p = jnp.clip(v * (1.0 - s), 0.0, 1.0)
    q = jnp.clip(v * (1.0 - s * f), 0.0, 1.0)
    t = jnp.clip(v * (1.0 - s * (1.0 - f)), 0.0, 1.0)
    table = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    return jnp.stack([jnp.select([sector == i for i in range(6)], [row[c] for row in table])
                      for c in range(3)], -1)


def adjust_hue(images: jax.Array, degrees: jax.Array) -> jax.Array:
    """Rotate each image's hue by degrees[i] (torchvision adjust_hue(x, degrees / 360))."""
    hsv = rgb_to_hsv(to_unit(images))
    hue = jnp.mod(hsv[..., 0] + _per_image(degrees)[..., 0] / 360.0, 1.0)
    return hsv_to_rgb(hsv.at[..., 0].set(hue))


def random_hue(key: jax.Array, images: jax.Array, hue: float) -> jax.Array:
    """Hue rotated by delta ~ U[-hue, hue] degrees per image."""
    return adjust_hue(images, jax.random.uniform(key, (images.shape[0],), minval=-hue,
                                                 maxval=hue))


def color_cast(key: jax.Array, images: jax.Array, levels: int) -> jax.Array:
    """Wu et al. 2015's colour casting: each channel of each image plus its own integer offset
    ~ U{-levels..levels} / 255, clipped to [0, 1]."""
    x = to_unit(images)
    offsets = jax.random.randint(key, (x.shape[0], 1, 1, x.shape[-1]), -levels, levels + 1)
    return jnp.clip(x + offsets.astype(jnp.float32) / 255.0, 0.0, 1.0)


# -------------------------------------------------------------- after preprocessing

def cutout_mask(key: jax.Array, n: int, height: int, width: int, size: int) -> jax.Array:
    """(n, H, W) bool, True on each image's square: rows [cy - size//2, cy - size//2 + size)
    with cy uniform over the rows (columns alike), clipped to the image. For even sizes this is
    DeVries & Taylor's [cy - size/2, cy + size/2)."""
    y_key, x_key = jax.random.split(key)
    top = jax.random.randint(y_key, (n, 1), 0, height) - size // 2
    left = jax.random.randint(x_key, (n, 1), 0, width) - size // 2
    rows, cols = jnp.arange(height), jnp.arange(width)
    in_rows = (rows >= top) & (rows < top + size)
    in_cols = (cols >= left) & (cols < left + size)
    return in_rows[:, :, None] & in_cols[:, None, :]


def cutout(key: jax.Array, x: jax.Array, size: int) -> jax.Array:
    """Cutout (DeVries & Taylor 2017): zero one size x size square per image."""
    n, height, width, _ = x.shape
    return jnp.where(cutout_mask(key, n, height, width, size)[..., None], 0.0, x)


def mixup(key: jax.Array, x: jax.Array, alpha: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """mixup (Zhang et al. 2018): (lam x + (1 - lam) x[perm], perm, lam), lam ~ Beta(a, a)."""
    lam_key, perm_key = jax.random.split(key)
    lam = jax.random.beta(lam_key, alpha, alpha, dtype=jnp.float32)
    perm = jax.random.permutation(perm_key, x.shape[0])
    return lam * x + (1.0 - lam) * x[perm], perm, lam
