"""Which convolution implementation each layer shape uses on CPU (`train.conv_impl`).

`xla` (the default) is cnnlab's convolution as before (cnnlab.models.conv), bit for bit.
A candidate's name (`im2col`, `winograd2`, `winograd4`; cnnlab.models.conv_impl) forces it
wherever it applies (Winograd: stride-1 3x3 kernels; elsewhere `xla`). `auto` times the
candidates on each distinct layer shape the first time a model is traced, like cuDNN's
benchmark mode, and keeps the fastest: forward and both gradients of one call, the best of a
few runs each. The choices are kept in memory and, when a compile cache directory is set, in
`conv_impl.json` inside it, so a second run (and a resumed one) picks the same implementation
without timing; a file that cannot be read is ignored and rewritten.

GPU and TPU never get here: cnnlab.models.layers uses XLA's convolutions there.
"""

import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from cnnlab.errors import ConfigError
from cnnlab.models import conv, conv_impl
from cnnlab.registry import unknown_choice

CACHE_FILE = "conv_impl.json"
# Timed runs per candidate after its first (compiling) call; the fastest counts.
REPS = 3
# Choices of this process, by cache file (None: memory only) and layer key.
_CHOSEN: dict[tuple[str | None, str], str] = {}


def modes() -> list[str]:
    return ["auto", *conv_impl.IMPLS.names()]


def check_mode(mode: str | None) -> str:
    """`train.conv_impl` (null, from configs saved before the key: xla)."""
    name = "xla" if mode is None else str(mode)
    if name not in modes():
        raise ConfigError(unknown_choice("train.conv_impl", name, modes()))
    return name


def layer_key(x: jax.Array, w: jax.Array, strides: tuple, pads: tuple) -> str:
    return (f"x{tuple(x.shape)} w{tuple(w.shape)} s{tuple(strides)} p{tuple(pads)} "
            f"{jnp.dtype(x.dtype).name} {jax.__version__}")


def candidates(w_shape: tuple, strides: tuple, dtype: jnp.dtype) -> list[str]:
    """The implementations that can compute the layer; Winograd's transforms lose too many
    bits in 16-bit floats, so bfloat16 layers choose between xla and im2col."""
    names = [n for n in conv_impl.IMPLS.names() if conv_impl.applies(n, w_shape, strides)]
    if jnp.dtype(dtype).itemsize < 4:
        names = [n for n in names if not n.startswith("winograd")]
    return names


def time_candidate(name: str, shapes: tuple, strides: tuple, pads: tuple) -> float:
    """Best seconds of one forward and both gradients of candidate `name`."""
    x_shape, w_shape, y_shape, dtype = shapes
    impl = conv_impl.IMPLS.get(name)

    def step(x, w, dy):
        _, vjp = jax.vjp(lambda x, w: impl(x, w, strides, pads), x, w)
        return vjp(dy)

    step = jax.jit(step)
    rng = np.random.default_rng(0)
    args = [jnp.asarray(rng.standard_normal(s), dtype) for s in (x_shape, w_shape, y_shape)]
    jax.block_until_ready(step(*args))
    best = np.inf
    for _ in range(REPS):
        start = time.perf_counter()
        jax.block_until_ready(step(*args))
        best = min(best, time.perf_counter() - start)
    return best


def _read(path: Path | None) -> dict[str, str]:
    if path is None or not path.exists():
        return {}
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # corrupt or unreadable: timed again and rewritten
    ok = isinstance(table, dict) and all(isinstance(v, str) and v in conv_impl.IMPLS
                                         for v in table.values())
    return table if ok else {}


def _write(path: Path | None, key: str, name: str) -> None:
    if path is None:
        return
    table = _read(path) | {key: name}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
        tmp.replace(path)  # atomic: a concurrent reader sees the old or the new table
    except OSError:
        pass  # a read-only cache: the choice stays in memory


def choose(x: jax.Array, w: jax.Array, strides: tuple, pads: tuple,
           path: Path | None) -> str:
    """The fastest candidate for this layer shape: from memory, the cache file, or timed."""
    key = layer_key(x, w, strides, pads)
    cached = _CHOSEN.get((str(path), key)) or _read(path).get(key)
    if cached is None:
        y_shape = (x.shape[0], *conv_impl.out_size(x.shape, w.shape, strides, pads),
                   w.shape[3])
        shapes = (x.shape, w.shape, y_shape, x.dtype)
        # Timed for real while the model is being traced (concrete arrays, not tracers).
        with jax.ensure_compile_time_eval():
            times = {n: time_candidate(n, shapes, strides, pads)
                     for n in candidates(w.shape, strides, x.dtype)}
        cached = min(times, key=times.get)
        _write(path, key, cached)
    _CHOSEN[(str(path), key)] = cached
    return cached


@dataclasses.dataclass(frozen=True)
class ConvChoice:
    """A drop-in for `lax.conv_general_dilated` (as `nn.Conv` calls it) that computes plain
    NHWC convolutions with the implementation `mode` names or, `auto`, the fastest; anything
    else (grouped, dilated, string padding) and `xla` go to cnnlab.models.conv."""

    mode: str = "xla"
    cache: str | None = None  # the compile cache directory (`compile_cache_dir`)

    @property
    def path(self) -> Path | None:
        return None if self.cache is None else Path(self.cache).expanduser() / CACHE_FILE

    def implementation(self, x: jax.Array, w: jax.Array, strides: tuple,
                       pads: tuple) -> Callable:
        name = self.mode
        # A batch of 1 is the dummy image models are initialized on (init_variables): what it
        # computes is thrown away, so it is not worth timing.
        if name == "auto":
            name = "xla" if x.shape[0] == 1 else choose(x, w, strides, pads, self.path)
        if not conv_impl.applies(name, w.shape, strides):
            name = "xla"
        return conv_impl.IMPLS.get(name)

    def __call__(self, lhs: jax.Array, rhs: jax.Array, window_strides, padding, *args,
                 **kwargs) -> jax.Array:
        if self.mode == "xla" or not conv.is_plain(lhs, rhs, padding, *args, **kwargs):
            return conv.conv_general_dilated(lhs, rhs, window_strides, padding, *args, **kwargs)
        strides, pads = tuple(window_strides), tuple(tuple(p) for p in padding)
        return self.implementation(lhs, rhs, strides, pads)(lhs, rhs, strides, pads)


# cnnlab's convolution as before `train.conv_impl` (the default of build_layers).
XLA_CONV = ConvChoice()
