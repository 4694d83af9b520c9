"""Batched, seeded data augmentation, run inside the compiled train step.

Every option is off by default, and every random draw comes from the step's key, so a run is a
pure function of its seed (resuming replays it exactly). Order within a training step:

1. pixel space, on the raw batch (`Augment.__call__`): random-resized crop -> pad + crop ->
   horizontal flip -> colour jitter -> PCA lighting. Crops pad with black, as torchvision's
   RandomCrop(padding=4) does. While only crop/flip are on, the batch stays uint8; the other
   operations produce float32 pixels on the [0, 1] scale.
2. preprocessing (cnnlab/preprocess.py): channel standardization, mean image, ZCA or none.
3. cutout (`Augment.cutout`), on the preprocessed input, so the erased square is 0: the training
   mean for channel standardization, as in DeVries & Taylor's code (Cutout after Normalize).
4. mixup (`Augment.mixup`), on the preprocessed batch and its labels; the train step turns the
   loss into lam * CE(y_a) + (1 - lam) * CE(y_b) (`mixup_loss`).

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
  pixel values on the [0, 1] scale (`cnnlab.preprocess.channel_pca`; on that scale ImageNet's
  lambda are ~0.22, 0.019, 0.0045, the constants of fb.resnet.torch). Not clipped (the paper
  does not). With C = 1 it is a random brightness shift along the single component.
* `cutout`: DeVries & Taylor 2017: one square of side `cutout` px set to zero, its centre
  uniform over the image's pixels, the part outside the image cut off (so near the border less
  than side^2 pixels are erased), applied to every image.
* `mixup`: Zhang et al. 2018: lam ~ Beta(mixup, mixup), one lam per batch, and the batch mixed
  with a random permutation of itself, x = lam x + (1 - lam) x[perm]; targets mixed alike.
"""

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from omegaconf import DictConfig, OmegaConf

from cnnlab.errors import ConfigError
from cnnlab.preprocess import normalize, to_unit

__all__ = ["Augment", "make_augment", "normalize", "validate"]

# torchvision's rgb_to_grayscale weights (ITU-R 601-2 luma).
LUMA = (0.2989, 0.587, 0.114)
# RandomResizedCrop's number of draws before falling back to the centre crop.
CROP_ATTEMPTS = 10
# fold_in constants: each operation's stream of the step's augmentation key. crop and flip keep
# the split they used before the others existed, so default runs are unchanged.
_RESIZED_CROP, _JITTER, _LIGHTING, _CUTOUT, _MIXUP = 1, 2, 3, 4, 5


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


def mixup_loss(loss: Callable[[jax.Array, jax.Array], jax.Array], lam: jax.Array,
               labels_a: jax.Array, labels_b: jax.Array) -> Callable[[jax.Array], jax.Array]:
    """logits -> lam * loss(logits, y_a) + (1 - lam) * loss(logits, y_b).

    For cross entropy, with or without label smoothing, this is the loss against the mixed
    target distribution, since cross entropy is linear in the target.
    """
    return lambda logits: lam * loss(logits, labels_a) + (1.0 - lam) * loss(logits, labels_b)


# ------------------------------------------------------------------------------ assembly

@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: hashed by identity (jax.jit keys)
class Augment:
    """An `augment` config as functions of the step's key: `__call__` (pixel space), `cutout`
    and `mixup` (see the module docstring for the order)."""

    # The values come from the `augment` config (conf/augment/): `make_augment` builds this.
    crop_pad: int
    flip: bool
    resized_crop: bool
    crop_scale: tuple[float, float]
    crop_ratio: tuple[float, float]
    brightness: float
    contrast: float
    saturation: float
    lighting: float
    # channel_pca of the training set: (eigenvalues (C,), eigenvectors (C, C)); C + C^2 numbers,
    # so baking them into the compiled step as constants costs nothing.
    lighting_pca: tuple[np.ndarray, np.ndarray] | None
    cutout_size: int
    mixup_alpha: float

    def __call__(self, key: jax.Array, images: jax.Array) -> jax.Array:
        """Pixel-space augmentation of a raw batch (uint8 out while only crop/flip are on)."""
        crop_key, flip_key = jax.random.split(key)
        if self.resized_crop:
            images = random_resized_crop(jax.random.fold_in(key, _RESIZED_CROP), images,
                                         self.crop_scale, self.crop_ratio)
        if self.crop_pad:
            images = random_crop(crop_key, images, self.crop_pad)
        if self.flip:
            images = random_flip(flip_key, images)
        if self.brightness or self.contrast or self.saturation:
            images = color_jitter(jax.random.fold_in(key, _JITTER), images, self.brightness,
                                  self.contrast, self.saturation)
        if self.lighting:
            eigvals, eigvecs = self.lighting_pca
            images = pca_lighting(jax.random.fold_in(key, _LIGHTING), images,
                                  jnp.asarray(eigvals), jnp.asarray(eigvecs), self.lighting)
        return images

    def cutout(self, key: jax.Array, x: jax.Array) -> jax.Array:
        """Cutout on the preprocessed batch; the identity when `cutout_size` is 0."""
        if not self.cutout_size:
            return x
        return cutout(jax.random.fold_in(key, _CUTOUT), x, self.cutout_size)

    def mixup(self, key: jax.Array, x: jax.Array,
              labels: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(mixed batch, labels of the partners, lam); call only when `mixup_alpha` > 0."""
        mixed, perm, lam = mixup(jax.random.fold_in(key, _MIXUP), x, self.mixup_alpha)
        return mixed, labels[perm], lam


def make_augment(cfg: DictConfig, lighting_pca: tuple[np.ndarray, np.ndarray] | None = None
                 ) -> Augment:
    """The augmentation an `augment` config describes (missing keys: conf/augment/_base.yaml's,
    all off).

    `lighting_pca`: `cnnlab.preprocess.channel_pca(train_images)`, needed when lighting > 0.
    """
    from cnnlab.config import AUGMENT_BASE, AugmentConfig, option_values

    cfg = OmegaConf.merge(OmegaConf.structured(AugmentConfig),
                          option_values("augment", AUGMENT_BASE), cfg)
    if cfg.lighting and lighting_pca is None:
        raise ValueError("augment.lighting needs the training set's channel_pca")
    return Augment(
        crop_pad=cfg.crop_pad, flip=cfg.flip, resized_crop=cfg.resized_crop,
        crop_scale=tuple(cfg.crop_scale), crop_ratio=tuple(cfg.crop_ratio),
        brightness=cfg.brightness, contrast=cfg.contrast, saturation=cfg.saturation,
        lighting=cfg.lighting, lighting_pca=lighting_pca if cfg.lighting else None,
        cutout_size=cfg.cutout, mixup_alpha=cfg.mixup,
    )


def _range(key: str, value: object) -> tuple[float, float]:
    values = list(value) if value is not None else []
    if len(values) != 2 or not 0 < values[0] <= values[1]:
        raise ConfigError(f"augment.{key}={values} must be [min, max] with 0 < min <= max")
    return values[0], values[1]


def _validate_sizes(cfg: DictConfig, image_shape: list[int] | None) -> None:
    """Sizes in pixels against the images (when their shape is known): a cutout square or a
    padding as large as the image blanks it."""
    if image_shape is None:
        return
    side = min(image_shape[0], image_shape[1])
    for key in ("crop_pad", "cutout"):
        if cfg[key] >= side:
            raise ConfigError(f"augment.{key}={cfg[key]} must be smaller than the "
                              f"{image_shape[0]}x{image_shape[1]} images")


def validate(cfg: DictConfig, image_shape: list[int] | None = None) -> None:
    """Value checks, each failing with one line that names the value and the valid range."""
    _validate_sizes(cfg, image_shape)
    for key in ("crop_pad", "cutout"):
        if cfg[key] < 0:
            raise ConfigError(f"augment.{key}={cfg[key]} must be >= 0 pixels (0: off)")
    for key in ("brightness", "contrast", "saturation"):
        if cfg[key] < 0:
            raise ConfigError(f"augment.{key}={cfg[key]} must be >= 0 (factor ~ U[max(0, 1 - "
                              "s), 1 + s]; 0: off)")
    if cfg.lighting < 0:
        raise ConfigError(f"augment.lighting={cfg.lighting} must be >= 0 (std of AlexNet's "
                          "alpha; 0.1 in the paper; 0: off)")
    if cfg.mixup < 0:
        raise ConfigError(f"augment.mixup={cfg.mixup} must be >= 0 (alpha of Beta(alpha, "
                          "alpha); 0: off)")
    low, high = _range("crop_scale", cfg.crop_scale)
    if high > 1:
        raise ConfigError(f"augment.crop_scale={[low, high]} must be area fractions in (0, 1]")
    _range("crop_ratio", cfg.crop_ratio)
