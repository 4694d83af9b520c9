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

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnlab.errors import ConfigError
from cnnlab.models.blocks import BasicBlock, Dropout
from cnnlab.models.layers import InputFit, Layers, at_least_float32
from cnnlab.models.regularization import DropoutPlaces, check_stochastic_depth, linear_decay
from cnnlab.models.scan import scan_blocks
from cnnlab.registry import described

# The dropout places this family has: no hidden fc layers, no conv layers outside its blocks
# but the stem.
DROPOUT_PLACES = ("stage", "head", "block")


@dataclasses.dataclass
class CifarResNetOptions:
    """The family's options, each declared once: the config schema, checked by `validate()`,
    and the one field `CifarResNet` holds them in. Every value comes from
    conf/model/_cifar_resnet.yaml and the model file on top of it, the only place a default is
    written."""

    depth: int = described("layers: 6n+2 (20, 32, 44, 56, 110, ...)")
    width: int = described("filters of the first stage (16; doubled per stage)")
    residual: bool = described("shortcuts; false: the paper's plain net")
    shortcut: str = described("A: zero-padded identity, B: projection on change, C: all")
    # Huang et al. 2016's p_L.
    stochastic_depth: float = described("last block's survival probability (1: off)")
    # batch: the paper; example: drop path.
    stochastic_depth_mode: str = described("one draw per block and batch | per example")
    dropout_at: DropoutPlaces = described("dropout rates by place (0: none): stage, head, block")
    # cnnlab.models.scan: the same variables and numbers.
    scan_blocks: bool | None = described(
        "each stage's blocks as one scan (flat compile); null: off CPU")

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
    """Built from `options` as they are (no copy of them field by field): `family.build`."""

    options: CifarResNetOptions
    num_classes: int
    layers: Layers
    fit: InputFit = InputFit()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        lay, opts = self.layers, self.options
        x = lay.conv(self.fit(x), opts.width, 3, name="stem")
        x = lay.act(lay.norm(name="stem_norm")(x, train))
        for stage in range(3):
            x = self._stage(stage, x, train)
            # Dropout rates (0 = none) after each stage, before the classifier, inside blocks.
            if opts.dropout_at.stage:
                x = Dropout(opts.dropout_at.stage, name=f"stage{stage + 1}_dropout")(x, train)
        x = jnp.mean(x, axis=(1, 2))
        if opts.dropout_at.head:
            x = Dropout(opts.dropout_at.head, name="head_dropout")(x, train)
        # float32 logits under any train.precision: softmax and losses need its range.
        logits = lay.dense(self.num_classes, name="head")(x)
        return at_least_float32(logits)

    def _stage(self, stage: int, x: jax.Array, train: bool) -> jax.Array:
        opts = self.options
        blocks_per_stage = (opts.depth - 2) // 6
        # Blocks are numbered 1..L across the stages, as in the paper.
        survival = linear_decay(3 * blocks_per_stage, opts.stochastic_depth)
        survival = survival[stage * blocks_per_stage:(stage + 1) * blocks_per_stage]
        names = [f"stage{stage + 1}_block{block + 1}" for block in range(blocks_per_stage)]
        # Stride 2 starts every stage but the first: that block differs from the rest. Each
        # stage's blocks of one shape run as one scan (cnnlab.models.scan); init always unrolls.
        first = 1 if stage > 0 else 0
        scanned = opts.scan_blocks and not self.is_initializing() and len(names) - first > 1
        for block, name in enumerate(names[:first] if scanned else names):
            x = self._block(stage, block, survival[block], name=name)(x, train)
        if scanned:
            gated = opts.residual and opts.stochastic_depth < 1
            x = scan_blocks(self, names[first:], self._block(stage, first, 1.0, parent=None),
                            x, train, survival[first:] if gated else None)
        return x

    def _block(self, stage: int, block: int, survival: float, **where: object) -> BasicBlock:
        opts = self.options
        return BasicBlock(
            features=opts.width * 2**stage,
            layers=self.layers,
            stride=2 if stage > 0 and block == 0 else 1,
            residual=opts.residual,
            shortcut=opts.shortcut,
            survival=survival,
            per_example=opts.stochastic_depth_mode == "example",
            dropout=opts.dropout_at.block,
            **where,
        )
