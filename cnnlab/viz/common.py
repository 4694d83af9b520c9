"""The `cnnlab viz` kinds' registry and what several kinds share (which images, which class)."""

import dataclasses
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

from cnnlab.errors import ConfigError, require
from cnnlab.registry import Registry
from cnnlab.viz.network import Network, Restored
from cnnlab.viz.options import READS, REQUIRES, VizOptions
from cnnlab.viz.output import Output


@dataclasses.dataclass(frozen=True)
class Kind:
    """A visualisation: `draw(restored, options, output)` writes its files through `output`."""

    draw: Callable[[Restored, VizOptions, Output], None]
    # Options that must be set for this kind (checked before anything is loaded): REQUIRES's.
    requires: tuple[str, ...] = ()
    # The dataset's splits it looks at ("train", "test"): only these are read.
    splits: tuple[str, ...] = ("test",)


KINDS: Registry[Kind] = Registry("viz kind")


def kind(name: str, splits: tuple[str, ...] = ("test",)) -> Callable:
    """Register the decorated draw function as kind `name`, which READS must list and which
    reads the dataset's `splits`."""
    if name not in READS:
        raise KeyError(f"viz kind '{name}' has no entry in cnnlab.viz.options.READS")

    def register(draw: Callable[[Restored, VizOptions, Output], None]) -> Callable:
        KINDS.register(name, Kind(draw, REQUIRES.get(name, ()), splits))
        return draw

    return register


def image_indices(options: VizOptions, count: int) -> np.ndarray:
    """The test images shown: `indices`, or the first `images`."""
    indices = np.asarray(options.indices if options.indices else range(min(options.images,
                                                                           count)))
    require(int(indices.max()) < count,
            f"indices: {int(indices.max())} is past the test split's {count} images")
    return indices


def class_targets(restored: Restored, options: VizOptions, indices: np.ndarray,
                  pixels: jnp.ndarray) -> np.ndarray:
    """Each image's class to explain: its label, the predicted class, or one class for all."""
    if options.target == "label":
        return restored.dataset.test.labels[indices]
    if options.target == "predicted":
        logits = restored.network.jit(Network.logits)(pixels)
        return np.asarray(jnp.argmax(logits, axis=-1), np.int32)
    target = int(options.target)
    classes = restored.network.num_classes
    if not 0 <= target < classes:
        raise ConfigError(f"target={target}: the model has classes 0..{classes - 1}")
    return np.full(len(indices), target, np.int32)


def neuron_channels(options: VizOptions, count: int) -> np.ndarray:
    """`channels` repeated over `count` images (default: channel 0)."""
    channels = options.channels or [0]
    return np.resize(np.asarray(channels, np.int32), count)


def describe_neuron(options: VizOptions) -> str:
    return f"{options.layer[0]} channel(s) {','.join(map(str, options.channels or [0]))} " \
        f"({options.neuron_at})"
