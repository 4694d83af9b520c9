"""The CIFAR-10 networks of He et al. 2016 ("Deep Residual Learning", section 4.2).

Depth 6n+2: a 3x3 conv with 16 filters, then three stages of n two-conv blocks on feature maps of
32, 16 and 8 pixels with 16, 32 and 64 filters, then global average pooling and a dense layer.
`residual=False` gives the paper's plain counterpart: the same layers with no shortcuts.
Shortcut options as in the paper's ImageNet section: A = identity, zero-padded channels when the
shape changes (no parameters; what the CIFAR table uses); B = 1x1 projection only where the shape
changes; C = projections on every block.

Regularizers (cnnlab.models.regularization): `stochastic_depth` is the last block's survival
probability p_L of Huang et al. 2016 (their CIFAR experiments use this very net, 110 layers, 54
blocks, p_L = 0.5); `dropout_at` puts dropout at the end of each stage, before the classifier or
inside every block between its two convs (Zagoruyko & Komodakis 2016).
"""

import dataclasses
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
from omegaconf import MISSING

from cnnlab.errors import ConfigError
from cnnlab.models.blocks import BasicBlock, Dropout
from cnnlab.models.layers import InputFit, Layers, at_least_float32
from cnnlab.models.regularization import DropoutPlaces, check_stochastic_depth, linear_decay
from cnnlab.models.scan import scan_blocks

Shortcut = Literal["A", "B", "C"]
# The dropout places this family has: no hidden fc layers, no conv layers outside its blocks
# but the stem.
DROPOUT_PLACES = ("stage", "head", "block")


@dataclasses.dataclass
class CifarResNetOptions:
    # Every value comes from conf/model/_cifar_resnet.yaml and the model file on top of it.
    depth: int = MISSING
    width: int = MISSING
    residual: bool = MISSING
    shortcut: str = MISSING
    # Huang et al. 2016's p_L, the last block's survival probability (1 = off).
    stochastic_depth: float = MISSING
    # batch: one draw per block and mini-batch (the paper); example: per example (drop path).
    stochastic_depth_mode: str = MISSING
    # Dropout rates by place (0 = none): stage, head, block.
    dropout_at: DropoutPlaces = MISSING
    # Run each stage's repeated blocks as one scan (cnnlab.models.scan): compile time flat in
    # depth, the same variables and numbers.
    scan_blocks: bool = MISSING

    def validate(self) -> None:
        if self.depth < 8 or (self.depth - 2) % 6:
            raise ConfigError(
                f"model.depth={self.depth} is not 6n+2 with n >= 1 (e.g. 20, 32, 44, 56, 110)"
            )
        if self.width < 1:
            raise ConfigError(f"model.width={self.width} must be a positive integer")
        if self.shortcut not in ("A", "B", "C"):
            raise ConfigError(f"model.shortcut='{self.shortcut}'; valid choices: A, B, C")
        check_stochastic_depth(self.stochastic_depth, self.stochastic_depth_mode, self.residual,
                               "this is a plain net (model.residual=false)")
        self.dropout_at.validate(DROPOUT_PLACES, "CIFAR ResNet")


class CifarResNet(nn.Module):
    depth: int
    num_classes: int
    layers: Layers
    width: int = 16
    residual: bool = True
    shortcut: Shortcut = "A"
    fit: InputFit = InputFit()
    # p_L of stochastic depth (1 = off) and whether it draws per example.
    stochastic_depth: float = 1.0
    per_example: bool = False
    # Dropout rates (0 = none) after each stage, before the classifier, inside each block.
    dropout_stage: float = 0.0
    dropout_head: float = 0.0
    dropout_block: float = 0.0
    # Each stage's blocks of one shape (all of stage 1, the others but their first) run as one
    # scan over their variables (cnnlab.models.scan); initialization always unrolls.
    scan_blocks: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        lay = self.layers
        x = lay.conv(self.fit(x), self.width, 3, name="stem")
        x = lay.act(lay.norm(name="stem_norm")(x, train))
        for stage in range(3):
            x = self._stage(stage, x, train)
            if self.dropout_stage:
                x = Dropout(self.dropout_stage, name=f"stage{stage + 1}_dropout")(x, train)
        x = jnp.mean(x, axis=(1, 2))
        if self.dropout_head:
            x = Dropout(self.dropout_head, name="head_dropout")(x, train)
        # float32 logits under any train.precision: softmax and losses need its range.
        logits = lay.dense(self.num_classes, name="head")(x)
        return at_least_float32(logits)

    def _stage(self, stage: int, x: jax.Array, train: bool) -> jax.Array:
        blocks_per_stage = (self.depth - 2) // 6
        # Blocks are numbered 1..L across the stages, as in the paper.
        survival = linear_decay(3 * blocks_per_stage, self.stochastic_depth)
        survival = survival[stage * blocks_per_stage:(stage + 1) * blocks_per_stage]
        names = [f"stage{stage + 1}_block{block + 1}" for block in range(blocks_per_stage)]
        # Stride 2 starts every stage but the first: that block differs from the rest.
        first = 1 if stage > 0 else 0
        scanned = self.scan_blocks and not self.is_initializing() and len(names) - first > 1
        for block, name in enumerate(names[:first] if scanned else names):
            x = self._block(stage, block, survival[block], name=name)(x, train)
        if scanned:
            gated = self.residual and self.stochastic_depth < 1
            x = scan_blocks(self, names[first:], self._block(stage, first, 1.0, parent=None),
                            x, train, survival[first:] if gated else None)
        return x

    def _block(self, stage: int, block: int, survival: float, **where: object) -> BasicBlock:
        return BasicBlock(
            features=self.width * 2**stage,
            layers=self.layers,
            stride=2 if stage > 0 and block == 0 else 1,
            residual=self.residual,
            shortcut=self.shortcut,
            survival=survival,
            per_example=self.per_example,
            dropout=self.dropout_block,
            **where,
        )


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
        stochastic_depth=options.stochastic_depth,
        per_example=options.stochastic_depth_mode == "example",
        dropout_stage=options.dropout_at.stage,
        dropout_head=options.dropout_at.head,
        dropout_block=options.dropout_at.block,
        scan_blocks=options.scan_blocks,
    )
