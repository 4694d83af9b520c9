"""Layer lists as data: the entries of a `layers:` list in `conf/model/*.yaml`, parsed and checked.

An entry is either a short string in the papers' own notation, or a one-kind mapping whose key
is the layer kind and whose value is its main setting, with further options beside it:

    conv3-64                      VGG's notation: a 3x3 convolution with 64 filters
    fc-4096                       a fully connected layer with 4096 units
    maxpool, lrn, dropout, ...    a kind with its default settings
    {conv: 96, kernel: 11, stride: 4, padding: 0, name: conv1}
    {inception: [64, 96, 128, 16, 32, 32], name: inception3a}
    {bottleneck: 64, repeat: 3, name: conv2}       -> conv2_1, conv2_2, conv2_3
    {dense: 16, growth: 12, name: dense1}          a DenseNet block of 16 layers, k = 12
    {transition: 0.5}, preact                      DenseNet's transition; norm -> activation alone

Every entry may carry `name` (default: kind + running number) and `repeat` (only the first copy
of a repeated block gets its `stride`). Parsing needs no JAX, so configs are checked instantly.
"""

import dataclasses
import re
from collections.abc import Callable
from typing import Any

from cnnlab.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    kind: str
    name: str
    options: tuple[tuple[str, Any], ...]

    def __getitem__(self, key: str) -> Any:
        return dict(self.options)[key]


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _padding(value: Any) -> bool:
    """'same', P on every side, or a pair [before, after] (the same on both axes): torchvision's
    AlexNet pads its 11x11/4 conv1 by 2 on 224 pixels and drops the last row, i.e. [2, 1]."""
    if isinstance(value, list | tuple):
        return len(value) == 2 and all(map(_non_negative_int, value))
    return value == "same" or _non_negative_int(value)


def _rate(value: Any) -> bool:
    return value is None or (isinstance(value, int | float) and 0 <= value < 1)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _non_negative_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _fraction(value: Any) -> bool:
    return _number(value) and 0 < value <= 1


def _widths(value: Any) -> bool:
    return isinstance(value, list | tuple) and len(value) == 6 and all(map(_positive_int, value))


@dataclasses.dataclass(frozen=True)
class Kind:
    """A layer kind: the key its main value fills, and each option's default and check."""

    main: str | None
    options: dict[str, tuple[Any, Callable[[Any], bool], str]]


# The default of an option every entry must give.
REQUIRED = object()
_INT = (_positive_int, "a positive integer")
_PAD = (_padding, "a non-negative integer, 'same' or a pair [before, after] of them")
_NUM = (_number, "a number")

KINDS: dict[str, Kind] = {
    "conv": Kind("features", {"features": (REQUIRED, *_INT), "kernel": (3, *_INT),
                              "stride": (1, *_INT), "padding": ("same", *_PAD),
                              "groups": (1, *_INT),
                              "connections": ("full", lambda v: isinstance(v, str), "a name"),
                              # false: the conv alone, without the norm and activation after it.
                              "norm_act": (True, lambda v: isinstance(v, bool), "true or false")}),
    "fc": Kind("features", {"features": (REQUIRED, *_INT)}),
    # stride null: the kernel size.
    "maxpool": Kind("kernel", {"kernel": (2, *_INT), "stride": (None, *_INT),
                               "padding": (0, *_PAD)}),
    "avgpool": Kind("kernel", {"kernel": (2, *_INT), "stride": (None, *_INT),
                               "padding": (0, *_PAD)}),
    "global_avgpool": Kind(None, {}),
    "subsample": Kind("kernel", {"kernel": (2, *_INT)}),
    "lrn": Kind("size", {"size": (5, *_INT), "k": (2.0, *_NUM), "alpha": (1e-4, *_NUM),
                         "beta": (0.75, *_NUM)}),
    # rate null: the model's `dropout` option.
    "dropout": Kind("rate", {"rate": (None, _rate, "a probability in [0, 1)")}),
    "inception": Kind("widths", {"widths": (REQUIRED, _widths, "six positive integers: #1x1, "
                                            "#3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj")}),
    "aux": Kind("weight", {"weight": (0.3, _number, "a number")}),
    "basic": Kind("features", {"features": (REQUIRED, *_INT), "stride": (1, *_INT)}),
    "bottleneck": Kind("features", {"features": (REQUIRED, *_INT), "stride": (1, *_INT)}),
    # Huang et al. 2017: num_layers BN-ReLU-Conv layers adding `growth` maps each;
    # bottleneck_width: the 1x1 conv's width before each 3x3, in units of growth (DenseNet-B:
    # 4, torchvision's bn_size; 0: no 1x1).
    "dense": Kind("num_layers", {"num_layers": (REQUIRED, *_INT), "growth": (REQUIRED, *_INT),
                                 "bottleneck_width": (4, _non_negative_int,
                                                      "a non-negative integer")}),
    # BN-ReLU-Conv 1x1 to floor(compression x the maps), then 2x2 average pooling.
    "transition": Kind("compression", {"compression": (0.5, _fraction, "a number in (0, 1]")}),
    "preact": Kind(None, {}),
}
COMMON = ("name", "repeat")
# Short forms in the papers' notation: VGG's conv<F>-<K>, and fc-<N>.
_SHORT = [
    (re.compile(r"conv(\d+)-(\d+)"), lambda m: ("conv", {"kernel": int(m[1]),
                                                         "features": int(m[2])})),
    (re.compile(r"fc-(\d+)"), lambda m: ("fc", {"features": int(m[1])})),
]


def _split_entry(entry: Any, where: str) -> tuple[str, dict[str, Any]]:
    """(kind, given options) of one list entry."""
    if isinstance(entry, str):
        if entry in KINDS:
            return entry, {}
        for pattern, make in _SHORT:
            if match := pattern.fullmatch(entry):
                return make(match)
        raise ConfigError(f"{where}: unknown layer '{entry}'; valid: conv<F>-<K> (e.g. conv3-64),"
                          f" fc-<N>, or one of {', '.join(KINDS)}")
    if isinstance(entry, dict):
        kinds = [key for key in entry if key in KINDS]
        if len(kinds) != 1:
            raise ConfigError(f"{where}: a layer mapping needs exactly one kind key "
                              f"({', '.join(KINDS)}); got {list(entry)}")
        kind = kinds[0]
        given = {k: v for k, v in entry.items() if k != kind}
        main = KINDS[kind].main
        if main is not None:
            given[main] = entry[kind]
        return kind, given
    raise ConfigError(f"{where}: a layer must be a string or a mapping, not {entry!r}")


def _entry_options(kind: str, given: dict[str, Any], where: str) -> dict[str, Any]:
    """An entry's options checked against its kind's table, defaults filled in."""
    spec = KINDS[kind]
    unknown = sorted(set(given) - set(spec.options))
    if unknown:
        raise ConfigError(f"{where}: {kind} has no option '{unknown[0]}'; valid: "
                          f"{', '.join([*spec.options, *COMMON])}")
    options = {}
    for option, (default, check, expected) in spec.options.items():
        if option not in given and default is REQUIRED:
            raise ConfigError(f"{where}: {kind} needs its {option}")
        value = given.get(option, default)
        if option in given and not check(value):
            raise ConfigError(f"{where}: {kind} {option}={value!r} must be {expected}")
        options[option] = list(value) if isinstance(value, list | tuple) else value
    if "stride" in options and options["stride"] is None:  # pools: stride = kernel
        options["stride"] = options["kernel"]
    return options


def parse_layers(entries: list[Any], key: str, used: set[str] | None = None) -> list[LayerSpec]:
    """Parse a list of layer entries (config key `key`, for messages) into expanded specs."""
    specs: list[LayerSpec] = []
    used = set() if used is None else used
    counters: dict[str, int] = {}
    for index, entry in enumerate(entries):
        where = f"{key}[{index}]"
        kind, given = _split_entry(entry, where)
        name, repeat = given.pop("name", None), given.pop("repeat", 1)
        if not _positive_int(repeat):
            raise ConfigError(f"{where}: repeat={repeat!r} must be a positive integer")
        options = _entry_options(kind, given, where)
        for copy in range(repeat):
            counters[kind] = counters.get(kind, 0) + 1
            if name is None:
                layer_name = f"{kind}{counters[kind]}"
            else:
                layer_name = name if repeat == 1 else f"{name}_{copy + 1}"
            if layer_name in used:
                raise ConfigError(f"{where}: layer name '{layer_name}' is used twice")
            used.add(layer_name)
            copy_options = dict(options)
            if copy and "stride" in copy_options and kind in ("basic", "bottleneck"):
                copy_options["stride"] = 1
            specs.append(LayerSpec(kind, str(layer_name), tuple(
                (k, tuple(v) if isinstance(v, list) else v) for k, v in copy_options.items())))
    return specs
