"""How pixels become the network's input: the `preprocess` config group.

`preprocess(images, stats)` is the one function every path calls (train step, evaluation,
test-time augmentation): a pure function of a pixel batch and of `PreprocessStats`, a pytree of
training-set statistics that travels inside the data pytree (`DeviceSplit.stats`,
cnnlab/data/device.py), so that a 3072x3072 whitening matrix is a device buffer and not a
constant baked into the compiled step.

Pixels are on the [0, 1] scale: uint8 batches are divided by 255 first; float batches (made by
the pixel-space augmentations of cnnlab/data/augment/ops.py) are taken to be on that scale
already. Statistics are computed once, on the host, in float64 over chunks of the uint8 training
split after the validation hold-out (`compute_stats`), and stored as float32.

* `channel`: (x - mu_c) / sigma_c with the per-channel mean and std (the default; the same
  float32 operations as before this module existed, so default runs are unchanged bit for bit).
* `mean_image`: x - m with m the per-pixel mean image (H, W, C). AlexNet (Krizhevsky et al. 2012,
  sec. 2): "We did not pre-process the images in any other way, except for subtracting the mean
  activity over the training set from each pixel"; the lecture notes list the same "training set
  mean-subtraction pre-processing". Nothing is divided, as in the paper, so inputs keep the
  [0, 1] scale's spread (std about 0.25-0.35 per pixel for CIFAR/Fashion-MNIST).
* `zca`: ZCA whitening, y = W (x - m) on the flattened image (D = H*W*C), with
  W = U diag(1 / sqrt(lambda + eps)) U^T from the eigendecomposition Sigma = U diag(lambda) U^T
  of the training images' covariance (Bell & Sejnowski 1997; used for CIFAR-10 by Krizhevsky
  2009, Coates, Lee & Ng 2011, Goodfellow et al. 2013). W is symmetric, and the whitened training
  data has covariance U diag(lambda / (lambda + eps)) U^T: the identity along directions whose
  variance is well above eps, damped below it (eps keeps pixel noise from being amplified).
  `preprocess.epsilon` defaults to 0.01 on the [0, 1] scale: Coates et al.'s code and pylearn2's
  ZCA (`filter_bias=0.1`, Goodfellow et al. 2013's CIFAR-10 pipeline) use 0.1 on data that
  global contrast normalization has brought to about unit variance per pixel, while raw CIFAR-10
  pixels on the [0, 1] scale have variance about 0.06, so the same relative damping is ~0.006.
* `none`: x itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from omegaconf import DictConfig

from cnnlab.data.share import Total, total_of, unchanged
from cnnlab.errors import ConfigError
from cnnlab.registry import Registry

if TYPE_CHECKING:
    from cnnlab.data.types import Dataset

log = logging.getLogger(__name__)

# Bytes of float64 per chunk when computing statistics (~128 MB): bounds the temporaries whatever
# the image size, e.g. 5,461 CIFAR images of 3,072 values at a time.
_CHUNK_BYTES = 1 << 27
# ZCA needs a D x D matrix on the host (float64) and on the device (float32): 64x64x3 at most.
MAX_ZCA_DIMS = 64 * 64 * 3


class PreprocessStats(struct.PyTreeNode):
    """Training-set statistics of one preprocessing method; None fields are not used by it.

    mean: subtracted, [0, 1] scale: (C,) for channel, (H, W, C) for mean_image and zca.
    std: divided: (C,) for channel.
    whiten: (D, D) symmetric ZCA matrix W, D = H*W*C, applied to the flattened mean-free image.
    """

    mean: jax.Array | None = None
    std: jax.Array | None = None
    whiten: jax.Array | None = None


def to_unit(images: jax.Array) -> jax.Array:
    """Pixels on the [0, 1] scale as float32: uint8 / 255; float input is returned as it is."""
    if jnp.issubdtype(images.dtype, jnp.floating):
        return images
    return images.astype(jnp.float32) / 255.0


def preprocess(images: jax.Array, stats: PreprocessStats) -> jax.Array:
    """(N, H, W, C) pixels (uint8, or float on the [0, 1] scale) -> the network's float input.

    Which fields of `stats` are set decides what is applied, so one function serves every method
    and the structure of the pytree, fixed per run, selects the computation when compiling.
    """
    x = to_unit(images)
    if stats.mean is not None:
        x = x - stats.mean
    if stats.std is not None:
        x = x / stats.std
    if stats.whiten is not None:
        n = x.shape[0]
        # HIGHEST: GPUs would otherwise round the float32 operands to TF32 (10-bit mantissa),
        # an error of ~1e-3 of the whitened values; the matmul is small next to the network.
        x = jnp.dot(x.reshape(n, -1), stats.whiten,
                    precision=jax.lax.Precision.HIGHEST).reshape(x.shape)
    return x


def normalize(images: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
    """Per-channel standardization: `preprocess` with channel statistics (the old name)."""
    return preprocess(images, PreprocessStats(mean=mean, std=std))


# ------------------------------------------------------------------ statistics, on the host

def _chunks(images: np.ndarray) -> Iterator[np.ndarray]:
    rows = max(1, _CHUNK_BYTES // (8 * max(1, int(np.prod(images.shape[1:])))))
    for start in range(0, len(images), rows):
        yield images[start:start + rows]


def pixel_mean(images: np.ndarray, total: Total = unchanged) -> np.ndarray:
    """Mean image (H, W, C) of uint8 NHWC images, float64 on the [0, 1] scale. `total`: the
    sums over the processes' images (`images` one process's share, cnnlab/data/share.py)."""
    sums = np.zeros(images.shape[1:], np.float64)
    for chunk in _chunks(images):
        sums += chunk.sum(axis=0, dtype=np.float64)
    return total(sums) / (255.0 * total(np.float64(len(images))))


def pixel_covariance(images: np.ndarray, mean: np.ndarray,
                     total: Total = unchanged) -> np.ndarray:
    """(D, D) population covariance of the flattened images (float64, [0, 1] scale); `total`
    as `pixel_mean`'s.

    Centred chunk by chunk with the exact mean (a second pass): E[xx^T] - mm^T in one pass
    would cancel catastrophically for pixels whose variance is small next to their mean.
    """
    flat_mean = mean.reshape(-1)
    cov = np.zeros((flat_mean.size, flat_mean.size), np.float64)
    for chunk in _chunks(images):
        centred = chunk.reshape(len(chunk), -1) / 255.0 - flat_mean
        cov += centred.T @ centred
    return total(cov) / total(np.float64(len(images)))


def zca_matrix(cov: np.ndarray, epsilon: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """W = U diag(1 / sqrt(lambda + eps)) U^T, with (lambda, U) the eigenpairs of `cov`."""
    eigvals, eigvecs = np.linalg.eigh(cov)
    # Rounding leaves the null directions' eigenvalues at about -1e-17 instead of 0.
    eigvals = np.maximum(eigvals, 0.0)
    whiten = (eigvecs / np.sqrt(eigvals + epsilon)) @ eigvecs.T
    # Symmetric by construction; averaging removes the last-bit asymmetry of the product.
    return (whiten + whiten.T) / 2, eigvals, eigvecs


def channel_pca(images: np.ndarray, total: Total = unchanged) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending) and eigenvectors (columns) of the C x C covariance of the pixel
    values of uint8 NHWC images on the [0, 1] scale: AlexNet's PCA over "the set of RGB pixel
    values throughout the training set" (Krizhevsky et al. 2012, sec. 4.1), for the lighting
    augmentation. float32. `total` as `pixel_mean`'s."""
    channels = images.shape[-1]
    pixels = images.reshape(-1, 1, 1, channels)  # every pixel an "image" of C values
    mean = pixel_mean(pixels, total)
    eigvals, eigvecs = np.linalg.eigh(pixel_covariance(pixels, mean, total))
    order = np.argsort(eigvals)[::-1]
    return (np.maximum(eigvals[order], 0.0).astype(np.float32),
            eigvecs[:, order].astype(np.float32))


StatsFn = Callable[[DictConfig, "Dataset"], PreprocessStats]
PREPROCESSORS: Registry[StatsFn] = Registry("preprocess")


@PREPROCESSORS.register("channel")
def _channel(cfg: DictConfig, dataset: Dataset) -> PreprocessStats:
    # data.py's float32 mean/std, as before: the default run stays bit for bit the same.
    return PreprocessStats(mean=np.asarray(dataset.mean, np.float32),
                           std=np.asarray(dataset.std, np.float32))


@PREPROCESSORS.register("mean_image")
def _mean_image(cfg: DictConfig, dataset: Dataset) -> PreprocessStats:
    return PreprocessStats(mean=pixel_mean(dataset.train.images, total_of(dataset.train))
                           .astype(np.float32))


@PREPROCESSORS.register("zca")
def _zca(cfg: DictConfig, dataset: Dataset) -> PreprocessStats:
    check_zca_shape(dataset.image_shape)
    start = time.perf_counter()
    images, total = dataset.train.images, total_of(dataset.train)
    mean = pixel_mean(images, total)
    whiten, _, _ = zca_matrix(pixel_covariance(images, mean, total), cfg.epsilon)
    # Tens of seconds on two CPU cores for 50,000 CIFAR images (mostly the 3072^2 eigh).
    log.info("ZCA statistics of %d images, %d dims, in %.1fs", len(images), whiten.shape[0],
             time.perf_counter() - start)
    return PreprocessStats(mean=mean.astype(np.float32), whiten=whiten.astype(np.float32))


@PREPROCESSORS.register("none")
def _none(cfg: DictConfig, dataset: Dataset) -> PreprocessStats:
    return PreprocessStats()


def compute_stats(cfg: DictConfig, dataset: Dataset) -> PreprocessStats:
    """The statistics `cfg.name` needs, from `dataset.train` (host NumPy, float32)."""
    return PREPROCESSORS.get(cfg.name)(cfg, dataset)


def check_zca_shape(image_shape: tuple[int, ...] | list[int]) -> None:
    dims = int(np.prod(image_shape))
    if dims > MAX_ZCA_DIMS:
        raise ConfigError(
            f"preprocess=zca whitens whole {'x'.join(map(str, image_shape))} images: a "
            f"{dims}x{dims} matrix; supported up to {MAX_ZCA_DIMS} values per image (64x64x3)")


def validate(cfg: DictConfig, image_shape: list[int] | None = None) -> None:
    """Name, epsilon (zca only: positive; other methods: null) and, when known, the image size."""
    PREPROCESSORS.get(cfg.name)
    if cfg.name == "zca":
        if cfg.epsilon is None or cfg.epsilon <= 0:
            raise ConfigError(f"preprocess.epsilon={cfg.epsilon} must be positive for "
                              "preprocess=zca (e.g. 0.01 on the [0, 1] pixel scale)")
        if image_shape is not None:
            check_zca_shape(tuple(image_shape))
    elif cfg.epsilon is not None:
        raise ConfigError(f"preprocess.epsilon={cfg.epsilon} is used by preprocess=zca only; "
                          f"set preprocess.epsilon=null for preprocess={cfg.name}")
