"""Pluggable layer parts: initializers, activations and normalizations, each a registry.

Blocks never hard-code these: a model receives a `Layers` bundle built from the config groups
`init`, `activation` and `norm`, so `init=glorot_uniform activation=tanh norm=none` changes every
layer of every model the same way.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnlab.errors import ConfigError
from cnnlab.models import conv, geometry
from cnnlab.registry import Registry

Initializer = Callable[..., jax.Array]
Activation = Callable[[jax.Array], jax.Array]

# Plain (untruncated) normals: the variance formulas of LeCun, Glorot and He are stated for them.
INITIALIZERS: Registry[Initializer] = Registry("initializer")
INITIALIZERS.register("he_normal", nn.initializers.variance_scaling(2.0, "fan_in", "normal"))
INITIALIZERS.register("he_uniform", nn.initializers.variance_scaling(2.0, "fan_in", "uniform"))
INITIALIZERS.register("glorot_normal", nn.initializers.variance_scaling(1.0, "fan_avg", "normal"))
INITIALIZERS.register(
    "glorot_uniform", nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
)
INITIALIZERS.register("lecun_normal", nn.initializers.variance_scaling(1.0, "fan_in", "normal"))
INITIALIZERS.register("lecun_uniform", nn.initializers.variance_scaling(1.0, "fan_in", "uniform"))
INITIALIZERS.register("zeros", nn.initializers.zeros)

ACTIVATIONS: Registry[Activation] = Registry("activation")
ACTIVATIONS.register("relu", nn.relu)
ACTIVATIONS.register("tanh", jnp.tanh)
# LeCun et al. 1998 (Appendix A): f(x) = 1.7159 tanh(2x/3), so that f(+-1) = +-1.
ACTIVATIONS.register("scaled_tanh", lambda x: 1.7159 * jnp.tanh(2.0 / 3.0 * x))


class Identity(nn.Module):
    """The `norm=none` choice: keeps block code free of `if norm` branches."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        return x


class BatchNorm(nn.Module):
    """BatchNorm taking `train` at call time; batch statistics in training, running ones in eval."""

    momentum: float = 0.9
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        return nn.BatchNorm(
            use_running_average=not train, momentum=self.momentum, epsilon=self.epsilon
        )(x)


class LocalResponseNorm(nn.Module):
    """Krizhevsky et al. 2012, section 3.3: b_i = a_i / (k + alpha * sum_j a_j^2) ** beta, the sum
    running over the `size` channels centred on i (clipped at the edges).

    As in the paper, alpha multiplies the plain sum; PyTorch and Caffe divide alpha by `size`.
    """

    size: int = 5
    k: float = 2.0
    alpha: float = 1e-4
    beta: float = 0.75

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        half = self.size // 2
        squares = jax.lax.reduce_window(
            jnp.square(x), 0.0, jax.lax.add, (1, 1, 1, self.size), (1, 1, 1, 1),
            ((0, 0), (0, 0), (0, 0), (half, self.size - 1 - half)))
        return x / (self.k + self.alpha * squares) ** self.beta


# Each entry builds a norm module factory from the norm config's extra keys.
NORMS: Registry[Callable[..., Callable[[], nn.Module]]] = Registry("norm")
NORMS.register("none", lambda: Identity)
NORMS.register(
    "batch",
    lambda momentum=0.9, epsilon=1e-5: functools.partial(
        BatchNorm, momentum=momentum, epsilon=epsilon
    ),
)


@dataclasses.dataclass(frozen=True)
class InputFit:
    """Bring images to the size a model was designed for: `resize` (bilinear, antialiased) or
    `pad` (centred zero padding, as LeCun et al. padded 28x28 digits to 32x32)."""

    size: int | None = None
    mode: str = "resize"

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.size is None or x.shape[1:3] == (self.size, self.size):
            return x
        n, h, w, c = x.shape
        if self.mode == "resize":
            return jax.image.resize(x, (n, self.size, self.size, c), "bilinear")
        if h > self.size or w > self.size:
            raise ConfigError(f"model.input_size={self.size} with input_fit=pad cannot hold a "
                              f"{h}x{w} input; use model.input_fit=resize")
        top, left = (self.size - h) // 2, (self.size - w) // 2
        return jnp.pad(x, ((0, 0), (top, self.size - h - top), (left, self.size - w - left),
                           (0, 0)))


@dataclasses.dataclass(frozen=True)
class Layers:
    """What every block needs to build its layers; one instance per model."""

    conv_init: Initializer
    dense_init: Initializer
    bias_init: Initializer
    act: Activation
    norm: Callable[[], nn.Module]
    # Convolutions followed by a normalization need no bias (it would be subtracted away).
    conv_bias: bool
    # None: lax.conv_general_dilated. On CPU, a version with a fast kernel gradient (conv.py).
    conv_impl: Callable | None = None

    def conv(self, x: jax.Array, features: int, kernel: int, stride: int = 1,
             padding: geometry.Padding = "same", groups: int = 1, name: str | None = None,
             label: str | None = None) -> jax.Array:
        """Apply a kernel x kernel convolution to `x`, refusing geometry that does not tile.

        `label` names the layer in the error message (default: `name`).
        """
        pads = geometry.window_pads(label or name or "conv", x.shape[1:3], kernel, stride,
                                    padding)
        return nn.Conv(
            features,
            (kernel, kernel),
            strides=(stride, stride),
            padding=pads,
            feature_group_count=groups,
            use_bias=self.conv_bias,
            kernel_init=self.conv_init,
            bias_init=self.bias_init,
            conv_general_dilated=self.conv_impl,
            name=name,
        )(x)

    def dense(self, features: int, name: str | None = None) -> nn.Dense:
        return nn.Dense(
            features, kernel_init=self.dense_init, bias_init=self.bias_init, name=name
        )


def build_layers(init: Any, activation: Any, norm: Any) -> Layers:
    """Build the `Layers` bundle from the `init`, `activation` and `norm` config nodes."""
    norm_options = {k: v for k, v in dict(norm).items() if k != "name" and v is not None}
    return Layers(
        conv_init=INITIALIZERS.get(init.conv),
        dense_init=INITIALIZERS.get(init.dense),
        bias_init=INITIALIZERS.get(init.bias),
        act=ACTIVATIONS.get(activation.name),
        norm=NORMS.get(norm.name)(**norm_options),
        conv_bias=norm.name == "none",
        conv_impl=conv.conv_general_dilated if jax.default_backend() == "cpu" else None,
    )
