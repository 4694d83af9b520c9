"""The `pattern` family: the notes' typical architecture [(CONV-ACT)*N - POOL?]*M - (FC-ACT)*K,
SOFTMAX as a handful of numbers, for architecture search (experiments/pattern_search.yaml).

Stage s (0-based) of the M stages is N `width * growth^s`-filter convolutions of `kernel` x
`kernel` (stride 1, 'same' padding; each conv -> norm -> activation as everywhere), then, unless
`pool` is none, a 2x2/2 pooling with 'same' padding (odd sizes round up: 7 -> 4), so any M fits
until the maps are 1x1. Then optionally a global average pool (`gap`), K hidden fully connected
layers of `fc_width` units, and the classifier. The numbers become a `stack` layer list
(`PatternOptions.layers`), so the model is built, counted and summarized as any listed one.
"""

import dataclasses
from typing import Any

import flax.linen as nn

from cnnlab.errors import ConfigError
from cnnlab.models import stack
from cnnlab.models.regularization import DropoutPlaces
from cnnlab.registry import described

POOLS = ("max", "avg", "none")


@dataclasses.dataclass
class PatternOptions:
    """The family's options, each declared once (config schema, `validate()`); the model is
    the `stack` model they describe (`as_stack`). Every value comes from
    conf/model/pattern.yaml."""

    n: int = described("N: (CONV-ACT) per stage, >= 1")
    m: int = described("M: stages, >= 1")
    k: int = described("K: hidden (FC-ACT) layers, >= 0")
    width: int = described("filters of the first stage's convs")
    growth: float = described("width multiplier from one stage to the next (VGG: 2)")
    fc_width: int = described("units of each hidden fc layer")
    kernel: int = described("conv kernel side")
    pool: str = described("pooling after each stage: max, avg or none")
    gap: bool = described("global average pooling before the fc layers")

    def stage_widths(self) -> list[int]:
        return [max(1, round(self.width * self.growth ** stage)) for stage in range(self.m)]

    def layers(self) -> list[Any]:
        """The layer list of the pattern (cnnlab.models.spec syntax)."""
        entries: list[Any] = []
        for features in self.stage_widths():
            entries += [f"conv{self.kernel}-{features}"] * self.n
            if self.pool != "none":
                entries.append({f"{self.pool}pool": 2, "padding": "same"})
        return entries + (["global_avgpool"] if self.gap else [])

    def head(self) -> list[Any]:
        return [f"fc-{self.fc_width}"] * self.k

    def stack_options(self) -> stack.StackOptions:
        """The same net as a `stack` model: the generated lists, every extra off."""
        return stack.StackOptions(
            layers=self.layers(), head=self.head(), dropout=0.0, residual=False, shortcut="B",
            stride_at="1x1", aux_classifiers=False, width=1.0, stochastic_depth=1.0,
            stochastic_depth_mode="batch", scan_blocks=False,
            dropout_at=DropoutPlaces(conv=0.0, stage=0.0, fc=0.0, head=0.0, block=0.0))

    def validate(self) -> None:
        for key, low in (("n", 1), ("m", 1), ("k", 0), ("width", 1), ("fc_width", 1),
                         ("kernel", 1)):
            value = getattr(self, key)
            if not isinstance(value, int) or value < low:
                raise ConfigError(f"model.{key}={value} must be an integer >= {low}")
        if self.pool not in POOLS:
            raise ConfigError(f"model.pool='{self.pool}'; valid choices: {', '.join(POOLS)}")
        if not self.growth > 0:
            raise ConfigError(f"model.growth={self.growth} must be positive")
        self.stack_options().validate()


def as_stack(options: PatternOptions, **fields: Any) -> nn.Module:
    """The pattern's net: the `stack` module of its generated lists (`fields`: the Stack's
    other fields, as `ModelFamily.build` passes them)."""
    return stack.Stack(options=options.stack_options(), **fields)
