"""`transfer.adapt_input`: a source trained on images with another channel count than this run's
(torchvision's RGB weights on greyscale fashion_mnist, a greyscale run on CIFAR-10).

Only the first layer sees the image, so only its kernels with the image's channels on their input
axis change (HWIO: axis 2); every other weight loads as it is. The rules are timm's
`adapt_input_conv` (timm/models/_manipulate.py), written for cnnlab's HWIO kernels and for any
source channel count I (timm's is I = 3):

* 1 channel: the kernels summed over the source's input channels. A conv with the summed kernel
  on a one-channel image z is exactly the source's conv on z copied into every channel, so a
  greyscale image reaches the rest of the network as the source would see that grey image.
* C channels (C != I): the kernels repeated along the input axis to C and scaled by I / C (timm:
  3 / C), which keeps the response to an image whose channels all equal each other. From a
  one-channel source to RGB this is the grey kernel applied to the mean of R, G and B.

The source's normalization statistics (`transfer.preprocess=source`) are reduced the same way so
the adapted conv sees inputs on the scale the source's did: for 1 channel the mean of the
per-channel means (exactly the mean of the image (R+G+B)/3) and the mean of the per-channel
stds; for C channels channel c takes the source's channel c mod I, as the kernels do.
"""

import dataclasses
import math
from collections.abc import Callable

import numpy as np

from cnnlab.data.preprocess import PreprocessStats
from cnnlab.errors import ConfigError
from cnnlab.registry import Registry

STRICT = "strict"
KEY = "transfer.adapt_input"


@dataclasses.dataclass(frozen=True)
class Adapter:
    """A rule for the first layer's kernels (HWIO, to `channels` inputs) and the statistics
    (channels last) that normalize its inputs; None: the rule refuses a mismatch."""

    kernel: Callable[[np.ndarray, int], np.ndarray] | None
    stats: Callable[[np.ndarray, int], np.ndarray] | None
    description: str


def _timm_kernel(kernel: np.ndarray, channels: int) -> np.ndarray:
    kernel = np.asarray(kernel, np.float32)
    if channels == 1:
        return kernel.sum(axis=2, keepdims=True)
    source = kernel.shape[2]
    repeated = np.concatenate([kernel] * math.ceil(channels / source), axis=2)[:, :, :channels]
    return repeated * np.float32(source / channels)


def _timm_stats(values: np.ndarray, channels: int) -> np.ndarray:
    values = np.asarray(values, np.float32)
    if channels == 1:
        return values.mean(axis=-1, keepdims=True)
    return values[..., np.arange(channels) % values.shape[-1]]


ADAPTERS: Registry[Adapter] = Registry(KEY)
ADAPTERS.register(STRICT, Adapter(None, None, "the first conv must have the data's channels"))
ADAPTERS.register("timm", Adapter(_timm_kernel, _timm_stats, "timm's adapt_input_conv: summed "
                                  "for 1 channel, repeated and scaled by I/C for C"))


def refusal(what: str, source_channels: int, channels: int) -> ConfigError:
    """The one line a channel mismatch ends in under transfer.adapt_input=strict."""
    return ConfigError(f"{what} was trained on {source_channels}-channel images but this data "
                       f"has {channels}; set {KEY}=timm to adapt the first conv (kernels summed "
                       "for 1 channel, repeated and rescaled for more; docs/transfer.md)")


def adapt_kernel(name: str, kernel: np.ndarray, channels: int, what: str) -> np.ndarray:
    """`kernel` (HWIO) of the first layer for `channels` input channels under rule `name`."""
    rule = ADAPTERS.get(name)
    if kernel.shape[2] == channels:
        return kernel
    if rule.kernel is None:
        raise refusal(what, kernel.shape[2], channels)
    return rule.kernel(kernel, channels)


def adapt_stats(name: str, stats: PreprocessStats, channels: int,
                what: str) -> PreprocessStats:
    """The source's normalization statistics for `channels` input channels under rule `name`
    (mean and std have their channels last: (C,) per channel, (H, W, C) for the mean image)."""
    rule = ADAPTERS.get(name)
    present = [np.asarray(v) for v in (stats.mean, stats.std) if v is not None]
    if not present or present[0].shape[-1] == channels:
        return stats
    if rule.stats is None:
        raise refusal(what, present[0].shape[-1], channels)
    if stats.whiten is not None:
        raise ConfigError(f"{KEY}={name} cannot adapt {what}'s ZCA whitening to {channels} "
                          "channels (it mixes every pixel of every channel); set "
                          "transfer.preprocess=own")
    return PreprocessStats(
        mean=None if stats.mean is None else rule.stats(stats.mean, channels),
        std=None if stats.std is None else rule.stats(stats.std, channels))
