"""The CIFAR-10 networks of He et al. 2016 ("Deep Residual Learning", section 4.2).

Depth 6n+2: a 3x3 conv with 16 filters, then three stages of n two-conv blocks on feature maps of
32, 16 and 8 pixels with 16, 32 and 64 filters, then global average pooling and a dense layer.
`residual=False` gives the paper's plain counterpart: the same layers with no shortcuts.
Shortcut options as in the paper's ImageNet section: A = identity, zero-padded channels when the
shape changes (no parameters; what the CIFAR table uses); B = 1x1 projection only where the shape
changes; C = projections on every block.
"""

import dataclasses
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnlab.errors import ConfigError
from cnnlab.models.layers import Layers

Shortcut = Literal["A", "B", "C"]


@dataclasses.dataclass
class CifarResNetOptions:
    depth: int = 20
    width: int = 16
    residual: bool = True
    shortcut: str = "A"

    def validate(self) -> None:
        if self.depth < 8 or (self.depth - 2) % 6:
            raise ConfigError(
                f"model.depth={self.depth} is not 6n+2 with n >= 1 (e.g. 20, 32, 44, 56, 110)"
            )
        if self.width < 1:
            raise ConfigError(f"model.width={self.width} must be a positive integer")
        if self.shortcut not in ("A", "B", "C"):
            raise ConfigError(f"model.shortcut='{self.shortcut}'; valid choices: A, B, C")


def pad_shortcut(x: jax.Array, features: int, stride: int) -> jax.Array:
    """Option A: subsample by the stride and zero-pad the new channels, half on each side."""
    x = x[:, ::stride, ::stride, :]
    extra = features - x.shape[-1]
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))


class BasicBlock(nn.Module):
    """Two 3x3 conv-norm layers; with `residual`, the input is added back before the last act."""

    features: int
    stride: int
    layers: Layers
    residual: bool = True
    shortcut: Shortcut = "A"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        lay = self.layers
        y = lay.conv(self.features, 3, self.stride, name="conv1")(x)
        y = lay.act(lay.norm(name="norm1")(y, train))
        y = lay.conv(self.features, 3, 1, name="conv2")(y)
        y = lay.norm(name="norm2")(y, train)
        if self.residual:
            y = y + self._shortcut(x, train)
        return lay.act(y)

    def _shortcut(self, x: jax.Array, train: bool) -> jax.Array:
        reshapes = self.stride != 1 or x.shape[-1] != self.features
        if self.shortcut == "C" or (self.shortcut == "B" and reshapes):
            x = self.layers.conv(self.features, 1, self.stride, padding=0, name="proj")(x)
            return self.layers.norm(name="proj_norm")(x, train)
        return pad_shortcut(x, self.features, self.stride) if reshapes else x


class CifarResNet(nn.Module):
    depth: int
    num_classes: int
    layers: Layers
    width: int = 16
    residual: bool = True
    shortcut: Shortcut = "A"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        lay = self.layers
        blocks_per_stage = (self.depth - 2) // 6
        x = lay.conv(self.width, 3, name="stem")(x)
        x = lay.act(lay.norm(name="stem_norm")(x, train))
        for stage in range(3):
            for block in range(blocks_per_stage):
                x = BasicBlock(
                    features=self.width * 2**stage,
                    stride=2 if stage > 0 and block == 0 else 1,
                    layers=lay,
                    residual=self.residual,
                    shortcut=self.shortcut,
                    name=f"stage{stage + 1}_block{block + 1}",
                )(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return lay.dense(self.num_classes, name="head")(x)


def build(options: CifarResNetOptions, num_classes: int, layers: Layers) -> nn.Module:
    return CifarResNet(
        depth=options.depth,
        num_classes=num_classes,
        layers=layers,
        width=options.width,
        residual=options.residual,
        shortcut=options.shortcut,
    )
