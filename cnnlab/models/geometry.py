"""Output sizes of convolutions and poolings, checked with the lecture notes' rule.

A window of size F moved with stride S over an input of size N padded by P on each side fits a
whole number of times only if (N - F + 2P) / S + 1 is a positive integer. Frameworks silently
drop the leftover rows; cnnlab refuses such a layer with a one-line error instead, because it is
almost always a mistake (AlexNet's 11x11/4 conv1 needs 227 pixels, not 224).

`padding="same"` asks for ceil(N / S) outputs, which always fits: the total padding
(out - 1) * S + F - N is split with (F - 1) // 2 before and the rest after, which is exactly what
PyTorch's symmetric padding of (F - 1) // 2 computes once it has dropped the leftover rows.
"""

import math

from cnnlab.errors import ConfigError

Padding = int | str
Pads = tuple[tuple[int, int], tuple[int, int]]


def _describe(label: str, kernel: int, stride: int, padding: Padding) -> str:
    pad = f", pad {padding}" if isinstance(padding, int) and padding else ""
    return f"{label} ({kernel}x{kernel}, stride {stride}{pad})"


def _axis_pads(size: int, kernel: int, stride: int, padding: Padding) -> tuple[int, int] | None:
    """(before, after) padding of one axis, or None where the window does not tile the input."""
    if padding == "same":
        out = math.ceil(size / stride)
        total = max((out - 1) * stride + kernel - size, 0)
        before = min((kernel - 1) // 2, total)
        return before, total - before
    span = size - kernel + 2 * padding
    if span < 0 or span % stride:
        return None
    return padding, padding


def window_pads(label: str, spatial: tuple[int, int], kernel: int, stride: int,
                padding: Padding) -> Pads:
    """The explicit padding of a kernel x kernel window on an H x W input; ConfigError if none."""
    if padding != "same" and not (isinstance(padding, int) and padding >= 0):
        raise ConfigError(f"{label}: padding={padding!r} must be a non-negative integer or 'same'")
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
