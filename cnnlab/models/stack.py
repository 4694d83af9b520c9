"""The `stack` family: a network written as the list of its layers, as the papers tabulate them.

LeNet-5, AlexNet, the VGG configurations, GoogLeNet and the ImageNet ResNets are all `layers:`
lists in `conf/model/` (syntax in `cnnlab.models.spec`), built from `cnnlab.models.blocks`. After
the list comes the optional `head:` list, then the classifier: a dense layer with one unit per
class of the dataset.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
from omegaconf import MISSING

from cnnlab.errors import ConfigError
from cnnlab.models import blocks
from cnnlab.models.layers import InputFit, Layers, LocalResponseNorm
from cnnlab.models.spec import LayerSpec, parse_layers


@dataclasses.dataclass
class StackOptions:
    layers: list[Any] = MISSING
    # Layers between the feature stack and the classifier (VGG's FC-4096 pair, ...).
    head: list[Any] = dataclasses.field(default_factory=list)
    # Rate of `dropout` entries that do not give their own.
    dropout: float = 0.5
    # Residual blocks: false gives the paper's plain counterpart (same layers, no shortcuts).
    residual: bool = True
    shortcut: str = "B"
    # Bottleneck downsampling in the first 1x1 (the paper) or in the 3x3 (torchvision, "v1.5").
    stride_at: str = "1x1"
    # GoogLeNet's auxiliary classifiers (the `aux` entries); off drops them and their weights.
    aux_classifiers: bool = True
    # Multiplies every layer's width (not the classifier's): 0.25 for a quick CPU variant.
    width: float = 1.0

    def validate(self) -> None:
        body, head = self.specs()
        tables = [s.name for s in body + head if s.kind == "conv" and s["connections"] != "full"]
        if tables and self.width != 1:
            raise ConfigError(f"model.width={self.width}: {tables[0]} has a fixed connection "
                              "table, so this model only exists at width 1")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"model.dropout={self.dropout} must be in [0, 1)")
        if self.shortcut not in ("A", "B", "C"):
            raise ConfigError(f"model.shortcut='{self.shortcut}'; valid choices: A, B, C")
        if self.stride_at not in ("1x1", "3x3"):
            raise ConfigError(f"model.stride_at='{self.stride_at}'; valid choices: 1x1, 3x3")
        if self.width <= 0:
            raise ConfigError(f"model.width={self.width} must be positive")

    def specs(self) -> tuple[tuple[LayerSpec, ...], tuple[LayerSpec, ...]]:
        used: set[str] = {"classifier"}
        return (tuple(parse_layers(list(self.layers), "model.layers", used)),
                tuple(parse_layers(list(self.head), "model.head", used)))


@dataclasses.dataclass(frozen=True)
class Context:
    """What a layer needs beyond its own spec."""

    layers: Layers
    options: StackOptions
    num_classes: int

    def width(self, features: int) -> int:
        return blocks.scaled(features, self.options.width)


def _conv(spec: LayerSpec, ctx: Context) -> nn.Module:
    table = spec["connections"] != "full"
    return blocks.ConvUnit(spec["features"] if table else ctx.width(spec["features"]),
                           spec["kernel"], ctx.layers, spec["stride"], spec["padding"],
                           spec["groups"], spec["connections"], name=spec.name)


def _residual_block(block: type) -> Callable[[LayerSpec, Context], nn.Module]:
    def build(spec: LayerSpec, ctx: Context) -> nn.Module:
        extra = {"stride_at": ctx.options.stride_at} if block is blocks.Bottleneck else {}
        return block(ctx.width(spec["features"]), ctx.layers, spec["stride"],
                     ctx.options.residual, ctx.options.shortcut, name=spec.name, **extra)
    return build


def _aux(spec: LayerSpec, ctx: Context) -> nn.Module | None:
    if not ctx.options.aux_classifiers:
        return None
    return blocks.AuxClassifier(ctx.num_classes, ctx.layers, spec["weight"], ctx.options.width,
                                name=spec.name)


def _dropout(spec: LayerSpec, ctx: Context) -> nn.Module:
    rate = ctx.options.dropout if spec["rate"] is None else spec["rate"]
    return blocks.Dropout(rate, name=spec.name)


BUILDERS: dict[str, Callable[[LayerSpec, Context], nn.Module | None]] = {
    "conv": _conv,
    "fc": lambda s, c: blocks.Dense(c.width(s["features"]), c.layers, name=s.name),
    "maxpool": lambda s, c: blocks.Pool("max", s["kernel"], s["stride"], s["padding"],
                                        name=s.name),
    "avgpool": lambda s, c: blocks.Pool("avg", s["kernel"], s["stride"], s["padding"],
                                        name=s.name),
    "global_avgpool": lambda s, c: blocks.GlobalAvgPool(name=s.name),
    "subsample": lambda s, c: blocks.Subsample(c.layers, s["kernel"], name=s.name),
    "lrn": lambda s, c: LocalResponseNorm(s["size"], s["k"], s["alpha"], s["beta"], name=s.name),
    "dropout": _dropout,
    "inception": lambda s, c: blocks.Inception(tuple(c.width(w) for w in s["widths"]),
                                               c.layers, name=s.name),
    "aux": _aux,
    "basic": _residual_block(blocks.BasicBlock),
    "bottleneck": _residual_block(blocks.Bottleneck),
}


class Stack(nn.Module):
    body: tuple[LayerSpec, ...]
    head: tuple[LayerSpec, ...]
    context: Context
    fit: InputFit = InputFit()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = self.fit(x)
        for spec in self.body + self.head:
            layer = BUILDERS[spec.kind](spec, self.context)
            if layer is not None:
                x = layer(x, train)
        ctx = self.context
        return blocks.Dense(ctx.num_classes, ctx.layers, activate=False, name="classifier")(x)


def build(options: StackOptions, num_classes: int, layers: Layers, fit: InputFit) -> nn.Module:
    body, head = options.specs()
    return Stack(body, head, Context(layers, options, num_classes), fit)
