"""Batched, seeded augmentation and normalization, run inside the compiled train step.

Images arrive as the uint8 batch gathered from the device-resident dataset; augmentation works on
raw pixels (so crop padding is black, as in torchvision's RandomCrop(padding=4)), and
normalization turns them into float32 last.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from omegaconf import DictConfig

from cnnlab.errors import ConfigError

Augment = Callable[[jax.Array, jax.Array], jax.Array]


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


def make_augment(cfg: DictConfig) -> Augment:
    """The augmentation an `augment` config describes, as a pure function of (key, images)."""
    pad, flip = cfg.crop_pad, cfg.flip

    def augment(key: jax.Array, images: jax.Array) -> jax.Array:
        crop_key, flip_key = jax.random.split(key)
        if pad:
            images = random_crop(crop_key, images, pad)
        if flip:
            images = random_flip(flip_key, images)
        return images

    return augment


def normalize(images: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
    """uint8 pixels -> float32 standardized per channel with the training set's statistics."""
    return (images.astype(jnp.float32) / 255.0 - mean) / std


def validate(cfg: DictConfig) -> None:
    if cfg.crop_pad < 0:
        raise ConfigError(f"augment.crop_pad={cfg.crop_pad} must be >= 0")
