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

from cnnlab.models import conv
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

    def conv(self, features: int, kernel: int, stride: int = 1, padding: int | None = None,
             name: str | None = None) -> nn.Conv:
        pad = (kernel - 1) // 2 if padding is None else padding
        return nn.Conv(
            features,
            (kernel, kernel),
            strides=(stride, stride),
            padding=((pad, pad), (pad, pad)),
            use_bias=self.conv_bias,
            kernel_init=self.conv_init,
            bias_init=self.bias_init,
            conv_general_dilated=self.conv_impl,
            name=name,
        )

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
