"""The `stack` family: a network written as the list of its layers, as the papers tabulate them.

LeNet-5, AlexNet, ZFNet, the VGG configurations, GoogLeNet, the ImageNet ResNets and DenseNet are
all `layers:` lists in `conf/model/` (syntax in `cnnlab.models.spec`), built from
`cnnlab.models.blocks`. After
the list comes the optional `head:` list, then the classifier: a dense layer with one unit per
class of the dataset.

The lists hold each paper's own dropout (`dropout` entries). `dropout_at` adds more at kinds of
places (after conv or fc layers, at stage ends, before the classifier, inside residual blocks),
and `stochastic_depth` drops residual blocks (both in cnnlab.models.regularization).
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax

from cnnlab.errors import ConfigError
from cnnlab.models import blocks
from cnnlab.models.layers import InputFit, Layers, LocalResponseNorm, at_least_float32
from cnnlab.models.regularization import (
    DROPOUT_PLACES,
    DropoutPlaces,
    check_stochastic_depth,
    linear_decay,
)
from cnnlab.models.scan import scan_blocks
from cnnlab.models.spec import LayerSpec, parse_layers
from cnnlab.registry import described

RESIDUAL_KINDS = ("basic", "bottleneck")
POOL_KINDS = ("maxpool", "avgpool", "subsample", "transition")
# What each dropout place is, for messages.
PLACE_NAMES = {"conv": "conv layers", "stage": "pooling layers or residual stages",
               "fc": "hidden fc layers", "head": "layers", "block": "residual blocks"}


@dataclasses.dataclass
class StackOptions:
    """The family's options, each declared once: the config schema, checked by `validate()`,
    and the one field `Stack` holds them in. Every value comes from conf/model/_stack.yaml and
    the model file on top of it, the only place a default is written."""

    layers: list[Any] = described("the layer list (syntax: cnnlab.models.spec)")
    head: list[Any] = described("layers between the features and the classifier (VGG's FCs)")
    dropout: float = described("rate of `dropout` entries that do not give their own")
    residual: bool = described("residual blocks' shortcuts; false: the plain counterpart")
    shortcut: str = described("A: zero-padded identity, B: projection on change, C: all")
    # The paper: the first 1x1; torchvision ("v1.5"): the 3x3.
    stride_at: str = described("bottleneck downsampling in the 1x1 | 3x3")
    # Off drops them and their weights.
    aux_classifiers: bool = described("GoogLeNet's auxiliary classifiers (`aux` entries)")
    width: float = described("multiplies every layer's width (not the classifier's)")
    # Huang et al. 2016's p_L.
    stochastic_depth: float = described("last residual block's survival probability (1: off)")
    # batch: the paper; example: drop path.
    stochastic_depth_mode: str = described("one draw per block and batch | per example")
    dropout_at: DropoutPlaces = described("dropout added by place (0: none)")
    # cnnlab.models.scan: the same variables and numbers.
    scan_blocks: bool | None = described(
        "residual block runs as one scan (flat compile); null: off CPU")

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
        has_blocks = any(s.kind in RESIDUAL_KINDS for s in body + head)
        check_stochastic_depth(
            self.stochastic_depth, self.stochastic_depth_mode, has_blocks and self.residual,
            "model.residual=false removes their shortcuts" if has_blocks
            else "this model has none (only basic and bottleneck blocks have shortcuts)")
        self.dropout_at.validate(DROPOUT_PLACES, "stack")
        if self.dropout_at.block and not has_blocks:
            raise ConfigError(f"model.dropout_at.block={self.dropout_at.block}: this model has "
                              "no residual blocks (basic, bottleneck) to put dropout in")
        self.dropout_after()

    def specs(self) -> tuple[tuple[LayerSpec, ...], tuple[LayerSpec, ...]]:
        used: set[str] = {"classifier"}
        return (tuple(parse_layers(list(self.layers), "model.layers", used)),
                tuple(parse_layers(list(self.head), "model.head", used)))

    def survival(self) -> tuple[tuple[str, float], ...]:
        """(block name, p_l) of every residual block, numbered 1..L through the whole list."""
        if self.stochastic_depth == 1 or not self.residual:
            return ()
        body, head = self.specs()
        names = [s.name for s in body + head if s.kind in RESIDUAL_KINDS]
        return tuple(zip(names, linear_decay(len(names), self.stochastic_depth), strict=True))

    def dropout_after(self) -> tuple[tuple[str, float], ...]:
        """(layer name, rate) of every dropout `dropout_at` adds after a layer of the lists.

        One dropout per position: a position already next to one of the list's own `dropout`
        entries keeps that entry alone, and where two places meet the later of conv, stage, fc,
        head sets the rate. A place that ends up with no position is a ConfigError.
        """
        body, head = self.specs()
        specs = body + head
        rates: dict[int, float] = {}
        for place, rate in self.dropout_at.active().items():
            if place == "block":
                continue
            candidates = [i for i in range(len(specs)) if _is_place(place, specs, i)]
            free = [i for i in candidates if not _next_to_dropout(specs, i)]
            if not free:
                where = ("has its own dropout entry at every such place already (its rate: "
                         "the entry's, or model.dropout)" if candidates
                         else f"has no {PLACE_NAMES[place]}")
                raise ConfigError(f"model.dropout_at.{place}={rate}: this model {where}")
            rates.update(dict.fromkeys(free, rate))
        used = {s.name for s in specs}
        for i in rates:
            if f"{specs[i].name}_dropout" in used:
                raise ConfigError(f"model.dropout_at: the dropout after {specs[i].name} would be "
                                  f"named {specs[i].name}_dropout, which a layer already is")
        return tuple((specs[i].name, rates[i]) for i in sorted(rates))


def _is_place(place: str, specs: tuple[LayerSpec, ...], i: int) -> bool:
    """Whether the position right after specs[i] is a `place` (see DropoutPlaces)."""
    kind = specs[i].kind
    if place in ("conv", "fc"):
        return kind == place
    if place == "head":
        return i == len(specs) - 1
    # stage: a pooling layer, or a residual block the next layer does not continue (a stride
    # starts the next stage).
    if kind in POOL_KINDS:
        return True
    if kind not in RESIDUAL_KINDS:
        return False
    following = specs[i + 1] if i + 1 < len(specs) else None
    return (following is None or following.kind not in RESIDUAL_KINDS
            or following["stride"] > 1)


def _next_to_dropout(specs: tuple[LayerSpec, ...], i: int) -> bool:
    return specs[i].kind == "dropout" or (i + 1 < len(specs) and specs[i + 1].kind == "dropout")


@dataclasses.dataclass(frozen=True)
class Context:
    """What a layer needs beyond its own spec: the Stack's fields, and what its options imply
    for each layer, derived once per trace."""

    layers: Layers
    options: StackOptions
    num_classes: int
    # (residual block name, survival probability); blocks not listed always survive.
    survival: tuple[tuple[str, float], ...] = ()
    # (layer name, rate) of the dropout layers `dropout_at` adds after layers of the lists.
    dropout_after: tuple[tuple[str, float], ...] = ()

    def width(self, features: int) -> int:
        return blocks.scaled(features, self.options.width)


def _conv(spec: LayerSpec, ctx: Context) -> nn.Module:
    table = spec["connections"] != "full"
    return blocks.ConvUnit(spec["features"] if table else ctx.width(spec["features"]),
                           spec["kernel"], ctx.layers, spec["stride"], spec["padding"],
                           spec["groups"], spec["connections"], norm_act=spec["norm_act"],
                           name=spec.name)


def _residual_block(block: type) -> Callable[..., nn.Module]:
    def build(spec: LayerSpec, ctx: Context, **where: Any) -> nn.Module:
        """The block of `spec`; `where` (default: named after it) places it, `parent=None` for
        the unbound block a scan applies."""
        extra = {"stride_at": ctx.options.stride_at} if block is blocks.Bottleneck else {}
        return block(ctx.width(spec["features"]), ctx.layers, spec["stride"],
                     ctx.options.residual, ctx.options.shortcut,
                     survival=dict(ctx.survival).get(spec.name, 1.0),
                     per_example=ctx.options.stochastic_depth_mode == "example",
                     dropout=ctx.options.dropout_at.block, **(where or {"name": spec.name}),
                     **extra)
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
    "dense": lambda s, c: blocks.DenseBlock(s["num_layers"], c.width(s["growth"]), c.layers,
                                            s["bottleneck_width"], name=s.name),
    "transition": lambda s, c: blocks.Transition(s["compression"], c.layers, name=s.name),
    "preact": lambda s, c: blocks.NormAct(c.layers, name=s.name),
}


def repeats(specs: tuple[LayerSpec, ...], i: int, ends: set[str]) -> int:
    """How many layers from specs[i] on repeat the residual block before it: same kind and
    width, stride 1, so each one's input and output have the shape of the previous block's
    output. A name in `ends` (a dropout follows it) ends the run."""
    if i == 0 or specs[i - 1].kind not in RESIDUAL_KINDS or specs[i - 1].name in ends:
        return 0
    previous, count = specs[i - 1], 0
    for spec in specs[i:]:
        if (spec.kind != previous.kind or spec["features"] != previous["features"]
                or spec["stride"] != 1):
            break
        count += 1
        if spec.name in ends:
            break
    return count


class Stack(nn.Module):
    """Built from `options` as they are (no copy of them field by field): `family.build`."""

    options: StackOptions
    num_classes: int
    layers: Layers
    fit: InputFit = InputFit()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = self.fit(x)
        opts = self.options
        body, head = opts.specs()
        ctx = Context(self.layers, opts, self.num_classes, opts.survival(), opts.dropout_after())
        dropout_after = dict(ctx.dropout_after)
        specs, i = body + head, 0
        # Runs of repeated residual blocks run as one scan (cnnlab.models.scan); init unrolls.
        scanning = opts.scan_blocks and not self.is_initializing()
        while i < len(specs):
            count = repeats(specs, i, set(dropout_after)) if scanning else 0
            if count > 1:
                x = self._scan(specs[i:i + count], ctx, x, train)
            else:
                count = 1
                layer = BUILDERS[specs[i].kind](specs[i], ctx)
                x = x if layer is None else layer(x, train)
            i += count
            if (last := specs[i - 1].name) in dropout_after:
                x = blocks.Dropout(dropout_after[last], name=f"{last}_dropout")(x, train)
        # float32 logits under any train.precision: softmax and losses need its range.
        logits = blocks.Dense(self.num_classes, self.layers, activate=False,
                              name="classifier")(x)
        return at_least_float32(logits)

    def _scan(self, run: tuple[LayerSpec, ...], ctx: Context, x: jax.Array,
              train: bool) -> jax.Array:
        survival = [dict(ctx.survival).get(spec.name, 1.0) for spec in run]
        block = BUILDERS[run[0].kind](run[0], ctx, parent=None)
        return scan_blocks(self, [spec.name for spec in run], block, x, train,
                           survival if min(survival) < 1 else None)
