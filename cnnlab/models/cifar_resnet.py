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
from cnnlab.models.blocks import BasicBlock
from cnnlab.models.layers import InputFit, Layers

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


class CifarResNet(nn.Module):
    depth: int
    num_classes: int
    layers: Layers
    width: int = 16
    residual: bool = True
    shortcut: Shortcut = "A"
    fit: InputFit = InputFit()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        lay = self.layers
        blocks_per_stage = (self.depth - 2) // 6
        x = lay.conv(self.fit(x), self.width, 3, name="stem")
        x = lay.act(lay.norm(name="stem_norm")(x, train))
        for stage in range(3):
            for block in range(blocks_per_stage):
                x = BasicBlock(
                    features=self.width * 2**stage,
                    layers=lay,
                    stride=2 if stage > 0 and block == 0 else 1,
                    residual=self.residual,
                    shortcut=self.shortcut,
                    name=f"stage{stage + 1}_block{block + 1}",
                )(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return lay.dense(self.num_classes, name="head")(x)


def build(options: CifarResNetOptions, num_classes: int, layers: Layers,
          fit: InputFit) -> nn.Module:
    return CifarResNet(
        depth=options.depth,
        num_classes=num_classes,
        layers=layers,
        width=options.width,
        residual=options.residual,
        shortcut=options.shortcut,
        fit=fit,
    )
