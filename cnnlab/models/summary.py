"""Per-layer output shapes, parameters and multiply-adds of a model, without running it.

The model is traced once under `jax.eval_shape` with every module call intercepted, so the
figures come from the modules actually built (their kernels and the shapes they really see),
not from a second description of the architecture. Multiply-adds (MACs) count convolutions and
dense layers, as the papers do (one MAC per weight use; biases, norms, pooling and activations
are not counted). Training-only branches (GoogLeNet's auxiliary classifiers) have parameters but
are left out of the inference MACs.
"""

import dataclasses
import json
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnlab.errors import require
from cnnlab.models import blocks, count_params
from cnnlab.models.layers import Identity, LocalResponseNorm
from cnnlab.models.regularization import StochasticDepth
from cnnlab.registry import Registry


@dataclasses.dataclass
class Row:
    path: tuple[str, ...]
    kind: str
    output_shape: tuple[int, ...]
    params: int = 0
    macs: int = 0
    train_only: bool = False

    @property
    def name(self) -> str:
        return "/".join(self.path)


@dataclasses.dataclass
class Summary:
    model: str
    input_shape: tuple[int, ...]
    # After the model's input fit (resize or pad), what its first layer sees.
    model_input_shape: tuple[int, ...]
    rows: list[Row]
    params: int
    macs: int

    def at_depth(self, depth: int) -> list[Row]:
        return [row for row in self.rows if len(row.path) <= depth]

    def to_dict(self, depth: int = 1) -> dict[str, Any]:
        return {
            "model": self.model,
            "input_shape": list(self.input_shape),
            "model_input_shape": list(self.model_input_shape),
            "params": self.params,
            "macs": self.macs,
            "layers": [
                {"name": r.name, "type": r.kind, "output_shape": list(r.output_shape),
                 "params": r.params, "macs": r.macs, "train_only": r.train_only}
                for r in self.at_depth(depth)
            ],
        }

    def to_json(self, depth: int = 1) -> str:
        return json.dumps(self.to_dict(depth), indent=2)

    def to_table(self, depth: int = 1) -> str:
        header = ("layer", "type", "output", "params", "MACs")
        lines = [(("  " * (len(r.path) - 1)) + r.path[-1] + (" (train only)" * r.train_only),
                  r.kind, _shape(r.output_shape), f"{r.params:,}", f"{r.macs:,}")
                 for r in self.at_depth(depth)]
        total = ("total", "", "", f"{self.params:,}", f"{self.macs:,}")
        widths = [max(len(line[i]) for line in [header, *lines, total]) for i in range(5)]

        def fmt(line: tuple[str, ...]) -> str:
            left = [line[i].ljust(widths[i]) for i in range(3)]
            right = [line[i].rjust(widths[i]) for i in range(3, 5)]
            return "  ".join(left + right).rstrip()

        rule = "-" * len(fmt(header))
        seen = _shape(self.input_shape)
        if self.model_input_shape != self.input_shape:
            seen += f" -> {_shape(self.model_input_shape)}"
        title = (f"{self.model}: input {seen}, {self.params:,} parameters, "
                 f"{self.macs / 1e9:.3g} G multiply-adds")
        return "\n".join([title, rule, fmt(header), rule, *map(fmt, lines), rule, fmt(total)])


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def _kind(module: nn.Module) -> str:
    """A short description in the papers' terms: `conv 11x11/4`, `maxpool 3x3/2`, `fc`."""
    if isinstance(module, blocks.ConvUnit | nn.Conv):
        k, s = (module.kernel, module.stride) if isinstance(module, blocks.ConvUnit) else (
            module.kernel_size[0], module.strides[0] if module.strides else 1)
        return f"conv {k}x{k}/{s}"
    if isinstance(module, blocks.Pool):
        return f"{module.kind}pool {module.kernel}x{module.kernel}/{module.stride}"
    if isinstance(module, StochasticDepth):
        return f"stochastic depth {module.survival:.3g}"
    labels = {blocks.Dense: "fc", nn.Dense: "dense", blocks.GlobalAvgPool: "global avgpool",
              blocks.AuxClassifier: "aux classifier", blocks.Subsample: "subsample",
              blocks.TableConv: "conv (table)",
              LocalResponseNorm: "lrn"}
    for cls, label in labels.items():
        if isinstance(module, cls):
            return label
    return type(module).__name__.lower()


def _own_macs(module: nn.Module, inputs: jax.ShapeDtypeStruct, output: Any) -> int:
    """Multiply-adds of a leaf conv or dense layer for one example."""
    if isinstance(module, nn.Conv):
        kernel_taps = math.prod(module.kernel_size) * inputs.shape[-1] // module.feature_group_count
        return math.prod(output.shape[1:]) * kernel_taps
    if isinstance(module, nn.Dense):
        return inputs.shape[-1] * output.shape[-1]
    return 0


def _subtree_size(tree: Any, path: tuple[str, ...]) -> int:
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return 0
        tree = tree[key]
    return count_params(tree)


def summarize(model: nn.Module, image_shape: tuple[int, ...], name: str = "") -> Summary:
    """Trace `model` on one image of `image_shape` and tabulate every module it calls."""
    calls: list[list[Any]] = []

    def record(next_fun: Any, args: tuple, kwargs: dict, context: Any) -> Any:
        module = context.module
        if context.method_name != "__call__" or module.scope is None or not module.path:
            return next_fun(*args, **kwargs)
        # Appended before the call so that a block precedes its parts.
        call = [tuple(module.path), module, args[0] if args else None, None]
        calls.append(call)
        call[3] = next_fun(*args, **kwargs)
        return call[3]

    def init(x: jax.Array) -> Any:
        with nn.intercept_methods(record):
            return model.init(jax.random.PRNGKey(0), x, train=False)

    variables = jax.eval_shape(init, jax.ShapeDtypeStruct((1, *image_shape), jnp.float32))
    params = variables.get("params", {})

    rows: dict[tuple[str, ...], Row] = {}
    train_only: set[tuple[str, ...]] = set()
    for path, module, inputs, output in calls:
        if isinstance(module, Identity):
            continue
        if isinstance(module, blocks.AuxClassifier):
            train_only.add(path)
        if path not in rows:  # a module's first call is the one that shaped it
            out_shape = output.shape[1:] if hasattr(output, "shape") else ()
            rows[path] = Row(path, _kind(module), tuple(out_shape),
                             params=_subtree_size(params, path))
        rows[path].macs += _own_macs(module, inputs, output)
    # A row's MACs include those of everything nested in it.
    leaf_macs = {path: row.macs for path, row in rows.items()}
    for path, row in rows.items():
        row.macs = sum(m for p, m in leaf_macs.items() if p[:len(path)] == path)
        row.train_only = any(path[:len(t)] == t for t in train_only)
    ordered = list(rows.values())
    fit = getattr(model, "fit", None)
    fitted = tuple(image_shape)
    if fit is not None and fit.size is not None:
        fitted = (fit.size, fit.size, image_shape[-1])
    return Summary(
        model=name,
        input_shape=tuple(image_shape),
        model_input_shape=fitted,
        rows=ordered,
        params=_subtree_size(params, ()),
        macs=sum(r.macs for r in ordered if len(r.path) == 1 and not r.train_only),
    )


# `summary.format`: how `cnnlab summary` prints a Summary at a depth.
FORMATS: Registry[Callable[[Summary, int], str]] = Registry("summary.format")
FORMATS.register("table", Summary.to_table)
FORMATS.register("json", Summary.to_json)


def validate(cfg: Any) -> None:
    FORMATS.get(cfg.format)
    require(cfg.depth >= 1, f"summary.depth={cfg.depth} must be >= 1")
