"""Per-layer convolution timings: every distinct conv of the bench suite's networks, forward,
input gradient and kernel gradient, in each implementation of cnnlab.models.conv_impl, in XLA's
plain convolution (autodiff of `lax.conv_general_dilated`), in cnnlab's layer path and in
PyTorch (same shape, as many threads as the process may use), with GFLOP/s; and XLA's fp32
matmul, the ceiling a matmul formulation can reach.

Each (shape, pass) times every implementation in turn, `--reps` rounds interleaved, and keeps
the fastest call of each (the machine may be shared; the load average is recorded). The order
reverses each round (`suite.alternating_orders`), so that no implementation always follows the
same one: the call right after PyTorch's could run slower, whichever it was (2026-12-06, Intel Xeon:
the 16x16x32 input gradient at 172 and 144 GFLOP/s in the first column, cnnlab's then lax's,
against 228 and 213 in the second; its forward pass, the same code in both, 133 against 219).

    python -m benchmarks.conv_layers                      # all four networks
    python -m benchmarks.conv_layers --models resnet20 --impls lax cnnlab im2col
    XLA_FLAGS=... python -m benchmarks.conv_layers --label flag --no-torch --impls lax cnnlab
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from benchmarks.bench_cnnlab import overrides_for
from benchmarks.suite import ENTRIES, alternating_orders, positive_int, usable_cores
from cnnlab.cli.preflight import compose
from cnnlab.models import build_model, conv, conv_impl
from cnnlab.training import numerics

MODELS = ("resnet20", "resnet56", "resnet18", "vgg11")
PASSES = ("forward", "input grad", "kernel grad")
RESULTS = Path(__file__).parent / "results"
_NHWC = ("NHWC", "HWIO", "NHWC")


def layer_shapes(name: str) -> list[tuple]:
    """(x shape, w shape, strides, pads) of every conv of entry `name`, in order, at its batch."""
    entry = ENTRIES[name]
    cfg = compose(overrides_for(entry, []))
    seen = []

    def recording(lhs, rhs, strides, padding, *args, **kwargs):
        seen.append((tuple(lhs.shape), tuple(rhs.shape), tuple(strides),
                     tuple(tuple(p) for p in padding)))
        return lax.conv_general_dilated(lhs, rhs, strides, padding, *args, **kwargs)

    original, conv.conv_general_dilated = conv.conv_general_dilated, recording
    try:
        model = build_model(cfg, entry.num_classes)
        x = jax.ShapeDtypeStruct((entry.batch_size, *entry.shape), jnp.float32)
        jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), x)
    finally:
        conv.conv_general_dilated = original
    return seen


def distinct_layers(models: list[str]) -> dict[tuple, list[str]]:
    """Each distinct layer shape -> the networks (with counts) that have it."""
    layers: dict[tuple, dict[str, int]] = {}
    for name in models:
        for shape in layer_shapes(name):
            layers.setdefault(shape, {}).setdefault(name, 0)
            layers[shape][name] += 1
    return {k: [f"{m} x{c}" for m, c in v.items()] for k, v in layers.items()}


def flops(x_shape: tuple, w_shape: tuple, strides: tuple, pads: tuple) -> float:
    """Multiply-adds x 2 of the direct convolution (each pass has as many)."""
    ho, wo = conv_impl.out_size(x_shape, w_shape, strides, pads)
    kh, kw, c, o = w_shape
    return 2.0 * x_shape[0] * ho * wo * kh * kw * c * o


def _lax(x, w, strides, pads):
    return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_NHWC)


def _cnnlab(x, w, strides, pads):
    return conv.conv_general_dilated(x, w, strides, pads, dimension_numbers=_NHWC)


def jax_impls(names: list[str]) -> dict[str, Callable]:
    table = {"lax": _lax, "cnnlab": _cnnlab}
    return {n: table.get(n) or conv_impl.IMPLS.get(n) for n in names}


def jax_passes(fn: Callable, strides: tuple, pads: tuple,
               options: dict | None = None) -> dict[str, Callable]:
    """The three passes of `fn` as jitted functions of (x, w, dy), compiled with XLA
    `options` (the training step's: `train.cpu_kernels`)."""
    def f(x, w):
        return fn(x, w, strides, pads)

    jit = functools.partial(jax.jit, compiler_options=options or None)
    return {
        "forward": jit(lambda x, w, dy: f(x, w)),
        "input grad": jit(lambda x, w, dy: jax.vjp(lambda x: f(x, w), x)[1](dy)[0]),
        "kernel grad": jit(lambda x, w, dy: jax.vjp(lambda w: f(x, w), w)[1](dy)[0]),
    }


def torch_passes(x_shape: tuple, w_shape: tuple, strides: tuple, pads: tuple) -> dict:
    """PyTorch's three passes (NCHW, as the eager bench runs) with symmetric padding `lo`:
    PyTorch pads both sides alike and drops a leftover row, which is what cnnlab's uneven
    "same" padding computes."""
    import torch
    import torch.nn.functional as F

    n, h, w_, c = x_shape
    kh, kw, _, o = w_shape
    x = torch.randn(n, c, h, w_)
    w = torch.randn(o, c, kh, kw)
    pad = (pads[0][0], pads[1][0])
    y = F.conv2d(x, w, stride=strides, padding=pad)
    dy = torch.randn_like(y)

    def backward(mask):
        return lambda: torch.ops.aten.convolution_backward(
            dy, x, w, None, list(strides), list(pad), [1, 1], False, [0, 0], 1, mask)

    with torch.no_grad():
        return {"forward": lambda: F.conv2d(x, w, stride=strides, padding=pad),
                "input grad": backward([True, False, False]),
                "kernel grad": backward([False, True, False])}


def _time(call: Callable) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(call())
    return time.perf_counter() - t0


def time_layer(shape: tuple, impls: dict[str, Callable], with_torch: bool,
               reps: int, options: dict | None = None) -> dict[str, dict[str, float]]:
    """Best seconds of each (pass, implementation), the implementations interleaved."""
    x_shape, w_shape, strides, pads = shape
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
    w = jnp.asarray(rng.normal(size=w_shape) / np.sqrt(np.prod(w_shape[:3])), jnp.float32)
    dy = jnp.asarray(rng.normal(size=(x_shape[0], *conv_impl.out_size(x_shape, w_shape,
                                                                        strides, pads),
                                       w_shape[3])), jnp.float32)
    calls: dict[str, dict[str, Callable]] = {p: {} for p in PASSES}
    for name, fn in impls.items():
        if name in ("lax", "cnnlab") or conv_impl.applies(name, w_shape, strides):
            for p, jitted in jax_passes(fn, strides, pads, options).items():
                calls[p][name] = (lambda j: lambda: j(x, w, dy))(jitted)
    if with_torch:
        for p, call in torch_passes(x_shape, w_shape, strides, pads).items():
            calls[p]["torch"] = call
    return best_times(calls, reps)


def best_times(calls: dict[str, dict[str, Callable]], reps: int) -> dict[str, dict[str, float]]:
    """The fastest of `reps` timed calls of each (pass, implementation), after one untimed call
    each (compiling, warming up), the implementations in `alternating_orders`."""
    best: dict[str, dict[str, float]] = {p: {} for p in calls}
    for p, table in calls.items():
        for call in table.values():
            call()  # compile / warm up
        for order in alternating_orders(list(table), reps):
            for name in order:
                best[p][name] = min(best[p].get(name, np.inf), _time(table[name]))
    return best


def matmul_ceiling(sizes=(1024, 1536, 2048), reps: int = 5) -> dict[int, float]:
    """XLA's fp32 matmul GFLOP/s at n x n x n (the best of `reps`)."""
    out = {}
    for n in sizes:
        a = jnp.ones((n, n), jnp.float32)
        dot = jax.jit(jnp.dot)
        dot(a, a).block_until_ready()
        call = functools.partial(dot, a, a)
        out[n] = 2 * n**3 / min(_time(call) for _ in range(reps)) / 1e9
    return out


def describe(shape: tuple) -> str:
    (n, h, w, c), (kh, kw, _, o), (s, _), _ = shape
    return f"{h}x{w}x{c} -> {o}, {kh}x{kw}/{s}, batch {n}"


def markdown(results: list[dict], names: list[str], header: str) -> str:
    cols = names
    lines = [header, "",
             "| layer | networks | pass | GFLOP | " + " | ".join(cols) + " | best |",
             "|---|---|---|---:|" + "---:|" * (len(cols) + 1)]
    for r in results:
        for p in PASSES:
            times = r["seconds"][p]
            cells = [f"{1e3 * times[c]:.0f} ms ({r['gflop'] / times[c]:.0f})" if c in times
                     else "-" for c in cols]
            # The fastest of what train.conv_impl can select (`cnnlab` is its `xla`; lax and
            # torch are references).
            selectable = {("xla" if c == "cnnlab" else c): t for c, t in times.items()}
            best = min((t, c) for c, t in selectable.items() if c in conv_impl.IMPLS)[1]
            lines.append(f"| {r['layer']} | {', '.join(r['networks'])} | {p} | "
                         f"{r['gflop']:.2f} | " + " | ".join(cells) + f" | {best} |")
    return "\n".join(lines) + "\n"


def render(label: str, names: list[str]) -> str:
    """The markdown table of a finished run's JSON (benchmarks/results/LABEL.json)."""
    data = json.loads((RESULTS / f"{label}.json").read_text())
    header = (f"Load average (1 min) at the end: {data['loadavg'][0]:.2f}; "
              f"train.cpu_kernels={data.get('cpu_kernels', 'ynnpack')}; "
              f"XLA_FLAGS={data['xla_flags'] or ''!r}; XLA's fp32 matmul (the ceiling), GFLOP/s: "
              + ", ".join(f"n={n}: {g:.0f}" for n, g in data["matmul_gflops"].items()))
    return markdown(data["results"], names, header)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=list(MODELS), choices=MODELS)
    p.add_argument("--impls", nargs="*",
                   default=["lax", "cnnlab", *conv_impl.IMPLS.names()])
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--reps", type=positive_int, default=6,
                   help="timed rounds, the order reversed each round")
    p.add_argument("--label", default="conv_layers", help="results file name")
    p.add_argument("--cpu-kernels", default="eigen", choices=list(numerics.CPU_KERNELS),
                   help="the library XLA:CPU runs convolutions in (train.cpu_kernels)")
    args = p.parse_args(argv)
    options = numerics.CPU_KERNELS[args.cpu_kernels]
    if not args.no_torch:
        import torch

        torch.set_num_threads(usable_cores())
    impls = jax_impls(args.impls)
    results = []
    for shape, nets in distinct_layers(args.models).items():
        seconds = time_layer(shape, impls, not args.no_torch, args.reps, options)
        results.append({"layer": describe(shape), "shape": shape, "networks": nets,
                        "gflop": flops(*shape) / 1e9, "seconds": seconds})
        print(json.dumps(results[-1]), flush=True)
    ceiling = matmul_ceiling()
    header = (f"Load average (1 min) at the end: {os.getloadavg()[0]:.2f} on "
              f"{os.cpu_count()} cores; train.cpu_kernels={args.cpu_kernels}; "
              f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; XLA's "
              "fp32 matmul (the ceiling), GFLOP/s: "
              + ", ".join(f"n={n}: {g:.0f}" for n, g in ceiling.items()))
    names = [*args.impls, *([] if args.no_torch else ["torch"])]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.label}.json").write_text(json.dumps(
        {"results": results, "matmul_gflops": ceiling, "xla_flags": os.environ.get("XLA_FLAGS"),
         "cpu_kernels": args.cpu_kernels,
         "loadavg": os.getloadavg()}, indent=1))
    table = markdown(results, names, header)
    (RESULTS / f"{args.label}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
