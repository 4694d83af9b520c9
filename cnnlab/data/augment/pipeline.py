"""An `augment` config as one function of the step's key: the `Augment` the train step calls,
built and checked from the config; the operations themselves are cnnlab/data/augment/ops.py.

Every option is off by default, and every random draw comes from the step's key, so a run is a
pure function of its seed (resuming replays it exactly). Order within a training step:

1. pixel space, on the raw batch (`Augment.__call__`): scale jittering -> random-resized crop
   -> pad + crop -> random affine -> horizontal flip -> colour jitter -> hue rotation -> colour
   cast -> PCA lighting. The geometric operations come first (the crop's scale, then its
   position, then the small distortion of what the crop holds), the photometric ones after.
   Crops and affine warps fill with black, as torchvision's RandomCrop(padding=4) and
   RandomAffine(fill=0) do. While only crop/flip are on, the batch stays uint8; the other
   operations produce float32 pixels on the [0, 1] scale.
2. preprocessing (cnnlab/data/preprocess.py): channel standardization, mean image, ZCA or none.
3. cutout (`Augment.cutout`), on the preprocessed input, so the erased square is 0: the training
   mean for channel standardization, as in DeVries & Taylor's code (Cutout after Normalize).
4. mixup (`Augment.mixup`), on the preprocessed batch and its labels; the train step turns the
   loss into lam * CE(y_a) + (1 - lam) * CE(y_b) (`mixup_loss`).
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from omegaconf import DictConfig, OmegaConf

from cnnlab.data.augment import ops
from cnnlab.errors import ConfigError

# fold_in constants: each operation's stream of the step's augmentation key. crop and flip keep
# the split they used before the others existed, so default runs are unchanged.
_RESIZED_CROP, _JITTER, _LIGHTING, _CUTOUT, _MIXUP = 1, 2, 3, 4, 5
_SCALE_JITTER, _AFFINE, _HUE, _CAST = 6, 7, 8, 9


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

    # Multi-scale training (VGG): [S_min, S_max] of the shorter side; None: off.
    scale_jitter: tuple[int, int] | None = None
    # RandomAffine: max rotation (degrees), zoom range, max x-shear (degrees), max translation
    # (fraction of the width/height); (0, (1, 1), 0, 0) is off.
    rotate: float = 0.0
    affine_scale: tuple[float, float] = (1.0, 1.0)
    shear: float = 0.0
    translate: float = 0.0
    # Max hue rotation in degrees; colour cast: max per-channel offset in 0-255 levels.
    hue: float = 0.0
    color_cast: int = 0

    @property
    def affine(self) -> bool:
        return bool(self.rotate or self.shear or self.translate
                    or tuple(self.affine_scale) != (1.0, 1.0))

    def __call__(self, key: jax.Array, images: jax.Array) -> jax.Array:
        """Pixel-space augmentation of a raw batch (uint8 out while only crop/flip are on)."""
        return self._photometric(key, self._geometric(key, images))

    def _geometric(self, key: jax.Array, images: jax.Array) -> jax.Array:
        crop_key, flip_key = jax.random.split(key)
        if self.scale_jitter is not None:
            images = ops.scale_jitter(jax.random.fold_in(key, _SCALE_JITTER), images,
                                  self.scale_jitter)
        if self.resized_crop:
            images = ops.random_resized_crop(jax.random.fold_in(key, _RESIZED_CROP), images,
                                         self.crop_scale, self.crop_ratio)
        if self.crop_pad:
            images = ops.random_crop(crop_key, images, self.crop_pad)
        if self.affine:
            images = ops.random_affine(jax.random.fold_in(key, _AFFINE), images, self.rotate,
                                   self.affine_scale, self.shear, self.translate)
        if self.flip:
            images = ops.random_flip(flip_key, images)
        return images

    def _photometric(self, key: jax.Array, images: jax.Array) -> jax.Array:
        if self.brightness or self.contrast or self.saturation:
            images = ops.color_jitter(jax.random.fold_in(key, _JITTER), images, self.brightness,
                                  self.contrast, self.saturation)
        if self.hue:
            images = ops.random_hue(jax.random.fold_in(key, _HUE), images, self.hue)
        if self.color_cast:
            images = ops.color_cast(jax.random.fold_in(key, _CAST), images, self.color_cast)
        if self.lighting:
            eigvals, eigvecs = self.lighting_pca
            images = ops.pca_lighting(jax.random.fold_in(key, _LIGHTING), images,
                                  jnp.asarray(eigvals), jnp.asarray(eigvecs), self.lighting)
        return images

    def cutout(self, key: jax.Array, x: jax.Array) -> jax.Array:
        """Cutout on the preprocessed batch; the identity when `cutout_size` is 0."""
        if not self.cutout_size:
            return x
        return ops.cutout(jax.random.fold_in(key, _CUTOUT), x, self.cutout_size)

    def mixup(self, key: jax.Array, x: jax.Array,
              labels: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(mixed batch, labels of the partners, lam); call only when `mixup_alpha` > 0."""
        mixed, perm, lam = ops.mixup(jax.random.fold_in(key, _MIXUP), x, self.mixup_alpha)
        return mixed, labels[perm], lam


# The keys make_augment reads: every one is in a composed run config's `augment` (each
# conf/augment option lists _base in its defaults), so a missing one is a caller's mistake.
_KEYS = ("crop_pad", "flip", "resized_crop", "crop_scale", "crop_ratio", "brightness",
         "contrast", "saturation", "lighting", "cutout", "mixup", "scale_jitter", "hue",
         "color_cast")
_AFFINE_KEYS = ("rotate", "scale", "shear", "translate")


def _check_complete(cfg: DictConfig) -> None:
    """ConfigError naming the keys a partial `augment` config lacks (no silent defaults)."""
    def absent(node: DictConfig, key: str) -> bool:
        return key not in node or OmegaConf.is_missing(node, key)

    missing = [key for key in _KEYS if absent(cfg, key)]
    if absent(cfg, "affine") or cfg.affine is None:
        missing.append("affine")
    else:
        missing += [f"affine.{key}" for key in _AFFINE_KEYS if absent(cfg.affine, key)]
    if missing:
        raise ConfigError(f"augment config lacks {', '.join(missing)}: make_augment takes a "
                          "complete one (a composed run config's cfg.augment, which "
                          "conf/augment/_base.yaml fills)")


def make_augment(cfg: DictConfig, lighting_pca: tuple[np.ndarray, np.ndarray] | None = None
                 ) -> Augment:
    """The augmentation a complete `augment` config describes (a composed run config's
    `cfg.augment`); a missing key raises ConfigError.

    `lighting_pca`: `cnnlab.data.preprocess.channel_pca(train_images)`, needed when lighting > 0.
    """
    _check_complete(cfg)
    if cfg.lighting and lighting_pca is None:
        raise ValueError("augment.lighting needs the training set's channel_pca")
    return Augment(
        crop_pad=cfg.crop_pad, flip=cfg.flip, resized_crop=cfg.resized_crop,
        crop_scale=tuple(cfg.crop_scale), crop_ratio=tuple(cfg.crop_ratio),
        brightness=cfg.brightness, contrast=cfg.contrast, saturation=cfg.saturation,
        lighting=cfg.lighting, lighting_pca=lighting_pca if cfg.lighting else None,
        cutout_size=cfg.cutout, mixup_alpha=cfg.mixup,
        scale_jitter=None if cfg.scale_jitter is None else tuple(cfg.scale_jitter),
        rotate=cfg.affine.rotate, affine_scale=tuple(cfg.affine.scale), shear=cfg.affine.shear,
        translate=cfg.affine.translate, hue=cfg.hue, color_cast=cfg.color_cast,
    )


def _range(key: str, value: object) -> tuple[float, float]:
    values = list(value) if value is not None else []
    if len(values) != 2 or not 0 < values[0] <= values[1]:
        raise ConfigError(f"augment.{key}={values} must be [min, max] with 0 < min <= max")
    return values[0], values[1]


def _validate_sizes(cfg: DictConfig, image_shape: list[int] | None) -> None:
    """Sizes in pixels against the images (when their shape is known): a cutout square or a
    padding as large as the image blanks it; scale jitter crops the images' own size out of
    images resized up; a grey image has no hue."""
    if image_shape is None:
        return
    side = min(image_shape[0], image_shape[1])
    for key in ("crop_pad", "cutout"):
        if cfg[key] >= side:
            raise ConfigError(f"augment.{key}={cfg[key]} must be smaller than the "
                              f"{image_shape[0]}x{image_shape[1]} images")
    if cfg.scale_jitter is not None and cfg.scale_jitter[0] < side:
        raise ConfigError(
            f"augment.scale_jitter={list(cfg.scale_jitter)}: the training crop is the "
            f"{image_shape[0]}x{image_shape[1]} images' own size, so an image resized to a "
            f"shorter side below {side} is smaller than the crop; use S_min >= {side}")
    if cfg.hue and image_shape[-1] != 3:
        raise ConfigError(f"augment.hue={cfg.hue} rotates the hue of RGB images; these have "
                          f"{image_shape[-1]} channel(s): use augment.hue=0 (augment.color_cast "
                          "and brightness work on any)")


def _validate_geometry_options(cfg: DictConfig) -> None:
    """scale_jitter, affine: ranges of the sampled values."""
    jitter = cfg.scale_jitter
    if jitter is not None and (len(jitter) != 2 or not 0 < jitter[0] <= jitter[1]):
        raise ConfigError(f"augment.scale_jitter={list(jitter)} must be [S_min, S_max] with "
                          "0 < S_min <= S_max pixels, or null")
    if jitter is not None and cfg.resized_crop:
        raise ConfigError("augment.scale_jitter and augment.resized_crop both choose the crop's "
                          "scale; turn one off")
    affine = cfg.affine
    if not 0 <= affine.rotate <= 180:
        raise ConfigError(f"augment.affine.rotate={affine.rotate} must be in [0, 180] degrees")
    if not 0 <= affine.shear < 90:
        raise ConfigError(f"augment.affine.shear={affine.shear} must be in [0, 90) degrees")
    if not 0 <= affine.translate <= 1:
        raise ConfigError(f"augment.affine.translate={affine.translate} must be a fraction of "
                          "the image in [0, 1]")
    _range("affine.scale", affine.scale)
    if not 0 <= cfg.hue <= 180:
        raise ConfigError(f"augment.hue={cfg.hue} must be in [0, 180] degrees (0: off)")
    if not 0 <= cfg.color_cast <= 255:
        raise ConfigError(f"augment.color_cast={cfg.color_cast} must be in [0, 255] levels "
                          "(Wu et al. 2015: 20; 0: off)")


def validate(cfg: DictConfig, image_shape: list[int] | None = None) -> None:
    """Value checks, each failing with one line that names the value and the valid range."""
    _validate_geometry_options(cfg)
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
