"""Output sizes of convolutions and poolings, checked with the lecture notes' rule.

A window of size F moved with stride S over an input of size N padded by P on each side fits a
whole number of times only if (N - F + 2P) / S + 1 is a positive integer. Frameworks silently
drop the leftover rows; cnnlab refuses such a layer with a one-line error instead, because it is
almost always a mistake (AlexNet's 11x11/4 conv1 needs 227 pixels, not 224).

`padding="same"` asks for ceil(N / S) outputs, which always fits: the total padding
(out - 1) * S + F - N is split with (F - 1) // 2 before and the rest after, which is exactly what
PyTorch's symmetric padding of (F - 1) // 2 computes once it has dropped the leftover rows.

A pair `padding=(before, after)` pads each axis unevenly, so that a framework's dropped rows can
be written exactly: torchvision's AlexNet conv1 (11x11/4, pad 2) on 224 pixels is (2, 1).
"""

import math

from cnnlab.errors import ConfigError

Padding = int | str | tuple[int, int]
Pads = tuple[tuple[int, int], tuple[int, int]]


def _describe(label: str, kernel: int, stride: int, padding: Padding) -> str:
    if isinstance(padding, tuple):
        pad = f", pad {padding[0]} before and {padding[1]} after"
    else:
        pad = f", pad {padding}" if isinstance(padding, int) and padding else ""
    return f"{label} ({kernel}x{kernel}, stride {stride}{pad})"


def _non_negative_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _valid(padding: object) -> bool:
    if isinstance(padding, tuple | list):
        return len(padding) == 2 and all(map(_non_negative_int, padding))
    return padding == "same" or _non_negative_int(padding)


def _axis_pads(size: int, kernel: int, stride: int, padding: Padding) -> tuple[int, int] | None:
    """(before, after) padding of one axis, or None where the window does not tile the input."""
    if padding == "same":
        out = math.ceil(size / stride)
        total = max((out - 1) * stride + kernel - size, 0)
        before = min((kernel - 1) // 2, total)
        return before, total - before
    before, after = padding if isinstance(padding, tuple) else (padding, padding)
    span = size - kernel + before + after
    if span < 0 or span % stride:
        return None
    return before, after


def window_pads(label: str, spatial: tuple[int, int], kernel: int, stride: int,
                padding: Padding) -> Pads:
    """The explicit padding of a kernel x kernel window on an H x W input; ConfigError if none."""
    if not _valid(padding):
        raise ConfigError(f"{label}: padding={padding!r} must be a non-negative integer, 'same' "
                          "or a pair (before, after) of non-negative integers")
    padding = tuple(padding) if isinstance(padding, list) else padding
    pads = [_axis_pads(size, kernel, stride, padding) for size in spatial]
    if None in pads:
        h, w = spatial
        raise ConfigError(
            f"{_describe(label, kernel, stride, padding)} cannot be applied to a {h}x{w} input: "
            f"(N - F + 2P) / S + 1 is not a whole positive number"
        )
    return pads[0], pads[1]


def output_size(size: int, kernel: int, stride: int, pads: tuple[int, int]) -> int:
    return (size + sum(pads) - kernel) // stride + 1


def tile_size(n: int, bytes_per_item: int, budget: int) -> int:
    """The largest divisor of `n` whose items take at most `budget` bytes (1 if none does)."""
    return max(t for t in range(1, n + 1) if n % t == 0 and (t == 1 or t * bytes_per_item
                                                             <= budget))
