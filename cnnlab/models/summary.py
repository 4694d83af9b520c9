"""Per-layer output shapes, parameters, multiply-adds, receptive fields and activation memory of
a model, without running it.

The model is traced once under `jax.eval_shape` with every module call intercepted, so the
figures come from the modules actually built (their kernels and the shapes they really see),
not from a second description of the architecture. Multiply-adds (MACs) count convolutions and
dense layers, as the papers do (one MAC per weight use; biases, norms, pooling and activations
are not counted). Training-only branches (GoogLeNet's auxiliary classifiers) have parameters but
are left out of the inference MACs.

Receptive field and jump (the distance on the input between neighbouring outputs) follow the
notes' rule through the modules in the order they run: a window of size k and stride s maps
(r, j) to (r + (k - 1) j, j s), starting from (1, 1) at the model's input (after its input fit).
Convolutions and poolings are windows; a fully connected layer or global pooling on an N x N map
is an N x N window, so its field may exceed the image (it then counts padding). A block with
parallel branches (inception, residual, dense) takes the largest field and jump of any layer
inside it, which is the field of its widest branch; norms, activations and dropout keep their
input's.

Activation memory, per image and in the model's float32:
- `activation_bytes` (forward): the layer's output; a layer that returns its input unchanged
  (dropout at inference) holds none. The total adds the model's input to the outputs of the
  layers listed at depth 1, the CS231n notes' "memory" count (what a block computes inside is
  not in it).
- `saved_bytes` (training): what JAX's autodiff keeps from the forward pass for the backward one,
  read from the residuals of `jax.vjp` of a training-mode forward (batch norm on batch
  statistics, dropout on), each attributed to the layer whose scope computed it: for ReLU its
  output and a one-byte mask, for batch norm the centred input and its normalized value, for max
  pooling its output, for dropout its mask and output; a conv or dense layer's input is the
  previous layer's output, counted there. Broadcast constants are left out (XLA recomputes
  them); the weights are not activations. The total adds the model's input where the first
  layer keeps it. XLA may fuse or recompute some of these, so this is what autodiff asks to
  keep, before compiler optimizations.
"""

import dataclasses
import json
import math
import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.extend.core as jax_core
import jax.numpy as jnp

from cnnlab.errors import require
from cnnlab.models import blocks, count_params
from cnnlab.models.blocks import AUX_COLLECTION
from cnnlab.models.layers import Identity, LocalResponseNorm
from cnnlab.models.regularization import StochasticDepth
from cnnlab.models.scan import unrolled
from cnnlab.registry import Registry


@dataclasses.dataclass
class Row:
    path: tuple[str, ...]
    kind: str
    output_shape: tuple[int, ...]
    params: int = 0
    macs: int = 0
    train_only: bool = False
    receptive_field: int = 1
    jump: int = 1
    # Per image: the output held in the forward pass, and what training keeps for backward
    # (everything nested included, as with MACs).
    activation_bytes: int = 0
    saved_bytes: int = 0

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
    # Per image, the model's input included (module docstring).
    activation_bytes: int = 0
    saved_bytes: int = 0

    def at_depth(self, depth: int) -> list[Row]:
        return [row for row in self.rows if len(row.path) <= depth]

    def to_dict(self, depth: int = 1) -> dict[str, Any]:
        return {
            "model": self.model,
            "input_shape": list(self.input_shape),
            "model_input_shape": list(self.model_input_shape),
            "params": self.params,
            "macs": self.macs,
            "activation_bytes": self.activation_bytes,
            "saved_bytes": self.saved_bytes,
            "layers": [
                {"name": r.name, "type": r.kind, "output_shape": list(r.output_shape),
                 "params": r.params, "macs": r.macs, "train_only": r.train_only,
                 "receptive_field": r.receptive_field, "jump": r.jump,
                 "activation_bytes": r.activation_bytes, "saved_bytes": r.saved_bytes}
                for r in self.at_depth(depth)
            ],
        }

    def to_json(self, depth: int = 1) -> str:
        return json.dumps(self.to_dict(depth), indent=2)

    def to_table(self, depth: int = 1) -> str:
        header = ("layer", "type", "output", "params", "MACs", "RF", "jump", "fwd kB",
                  "train kB")
        lines = [(("  " * (len(r.path) - 1)) + r.path[-1] + (" (train only)" * r.train_only),
                  r.kind, _shape(r.output_shape), f"{r.params:,}", f"{r.macs:,}",
                  str(r.receptive_field), str(r.jump), _kb(r.activation_bytes),
                  _kb(r.saved_bytes))
                 for r in self.at_depth(depth)]
        total = ("total", "", "", f"{self.params:,}", f"{self.macs:,}", "", "",
                 _kb(self.activation_bytes), _kb(self.saved_bytes))
        widths = [max(len(line[i]) for line in [header, *lines, total])
                  for i in range(len(header))]

        def fmt(line: tuple[str, ...]) -> str:
            left = [line[i].ljust(widths[i]) for i in range(3)]
            right = [line[i].rjust(widths[i]) for i in range(3, len(header))]
            return "  ".join(left + right).rstrip()

        rule = "-" * len(fmt(header))
        seen = _shape(self.input_shape)
        if self.model_input_shape != self.input_shape:
            seen += f" -> {_shape(self.model_input_shape)}"
        title = (f"{self.model}: input {seen}, {self.params:,} parameters, "
                 f"{self.macs / 1e9:.3g} G multiply-adds; activations per image "
                 f"{self.activation_bytes / 1e6:.1f} MB forward, "
                 f"{self.saved_bytes / 1e6:.1f} MB kept for training")
        return "\n".join([title, rule, fmt(header), rule, *map(fmt, lines), rule, fmt(total)])


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def _kb(nbytes: int) -> str:
    return f"{nbytes / 1e3:,.1f}"


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
              blocks.TableConv: "conv (table)", blocks.DenseBlock: "dense block",
              blocks.DenseLayer: "dense layer", blocks.Transition: "transition",
              blocks.NormAct: "norm-act", LocalResponseNorm: "lrn"}
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


Field = tuple[int, int]  # (receptive field, jump) on the model's input


def _spatial(x: Any) -> int:
    return x.shape[1] if getattr(x, "ndim", 0) == 4 else 1


# The window (kernel, stride) a module slides over its input, by module type.
WINDOWS: dict[type, Callable[[Any, Any], tuple[int, int]]] = {
    nn.Conv: lambda m, x: (m.kernel_size[0], m.strides[0] if m.strides else 1),
    blocks.Pool: lambda m, x: (m.kernel, m.stride),
    blocks.Subsample: lambda m, x: (m.kernel, m.kernel),
    # A fully connected layer or a global pooling sees the whole N x N map.
    blocks.Dense: lambda m, x: (_spatial(x), 1),
    blocks.GlobalAvgPool: lambda m, x: (_spatial(x), 1),
}


@dataclasses.dataclass
class _Call:
    path: tuple[str, ...]
    module: nn.Module
    inputs: Any
    index: int
    train_only: bool
    field_in: Field = (1, 1)
    field_out: Field | None = None
    output: Any = None
    # Order in which calls returned (a block returns after its parts).
    finished: int = -1


# Modules whose parts read a rearrangement of the module's own input (gathered channels, a
# flattened map), never one another's outputs.
READ_OWN_INPUT = (blocks.TableConv, blocks.Dense)


class _FieldTracker:
    """Receptive fields of the arrays the modules pass each other, keyed by the array's id.

    An input no module produced (an activation applied between two modules, gathered channels)
    gets the field of the last array a part of the enclosing module produced, or the enclosing
    module's input field (before any part has run, or for READ_OWN_INPUT modules).
    """

    def __init__(self) -> None:
        self.calls: list[_Call] = []
        self.active: list[_Call] = []
        self.fields: dict[int, Field] = {}
        self.returned = 0

    def _inner(self, parent: _Call) -> list[Field]:
        """Fields of the parts of `parent` that have run, in the order they finished."""
        return [c.field_out for c in self.calls[parent.index + 1:]
                if c.field_out is not None and not c.train_only
                and c.path[:len(parent.path)] == parent.path]

    def field_of(self, x: Any) -> Field:
        if id(x) in self.fields:
            return self.fields[id(x)]
        if not self.active:
            return (1, 1)
        parent = self.active[-1]
        if isinstance(parent.module, READ_OWN_INPUT):
            return parent.field_in
        finished = [c for c in self.calls[parent.index + 1:]
                    if c.field_out is not None and c.path[:len(parent.path)] == parent.path
                    and id(c.output) in self.fields and not c.train_only]
        return max(finished, key=lambda c: c.finished).field_out if finished else parent.field_in

    def finish(self, call: _Call) -> Field:
        if id(call.output) in self.fields:  # it returned an array it was given or a part made
            return self.fields[id(call.output)]
        window = next((fn for cls, fn in WINDOWS.items() if isinstance(call.module, cls)), None)
        if window is not None:
            kernel, stride = window(call.module, call.inputs)
            r, j = call.field_in
            return r + (kernel - 1) * j, j * stride
        return _widest(self._inner(call)) or call.field_in


def _widest(fields: list[Field]) -> Field | None:
    """Parallel branches: the largest field and jump of any of them."""
    if not fields:
        return None
    return max(f[0] for f in fields), max(f[1] for f in fields)


def _nbytes(tree: Any) -> int:
    """Bytes of one example's arrays (the traced batch holds one)."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree)
               if hasattr(x, "dtype"))


def _scope_path(name_stack: str) -> tuple[str, ...]:
    """A jaxpr equation's module path: `jvp(Stack)/conv1/norm/BatchNorm_0` -> (conv1, norm,
    BatchNorm_0); the first entry is the model itself."""
    parts = [re.sub(r"^(?:\w+\()+([^()]*)\)*$", r"\1", part)
             for part in str(name_stack).split("/")]
    return tuple(part for part in parts[1:] if part)


def _training_forward(model: nn.Module) -> Callable[..., Any]:
    """The forward pass of a training step: (params, other collections, images) -> (logits,
    auxiliary heads' outputs)."""

    def forward(params: Any, state: Any, x: jax.Array) -> Any:
        logits, updates = model.apply(
            {"params": params, **state}, x, train=True, mutable=["batch_stats", AUX_COLLECTION],
            rngs={"dropout": jax.random.PRNGKey(0)})
        return logits, updates.get(AUX_COLLECTION, {})

    return forward


def saved_for_backward(model: nn.Module, variables: Any,
                       image_shape: tuple[int, ...]) -> dict[tuple[str, ...], int]:
    """Bytes per image that `jax.vjp` of a training forward keeps for the backward pass, by the
    module path that computed them; () holds the model's input and what the model computes
    outside any layer (its input fit)."""
    forward = _training_forward(model)
    x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    state = {k: v for k, v in variables.items() if k != "params"}
    closed, shapes = jax.make_jaxpr(
        lambda p, s, x: jax.vjp(lambda p: forward(p, s, x), p), return_shape=True)(
        variables["params"], state, x)
    jaxpr = closed.jaxpr
    count = len(jax.tree_util.tree_leaves(shapes[1]))
    residuals = {v for v in jaxpr.outvars[len(jaxpr.outvars) - count:]
                 if not isinstance(v, jax_core.Literal)}
    saved: dict[tuple[str, ...], int] = {}
    if jaxpr.invars[-1] in residuals:  # the image itself (weights are not activations)
        saved[()] = _nbytes(jaxpr.invars[-1].aval)
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "broadcast_in_dim" and eqn.invars[0].aval.size == 1:
            continue  # a broadcast constant: recomputed, never kept
        for var in eqn.outvars:
            if var in residuals:
                path = _scope_path(eqn.source_info.name_stack)
                saved[path] = saved.get(path, 0) + _nbytes(var.aval)
    return saved


def _attribute(saved: dict[tuple[str, ...], int], paths: list[tuple[str, ...]]) -> dict:
    """Move each scope's bytes to the longest row path it lies in (() if none)."""
    known = set(paths)
    out: dict[tuple[str, ...], int] = {}
    for scope, nbytes in saved.items():
        owner = next((scope[:n] for n in range(len(scope), 0, -1) if scope[:n] in known), ())
        out[owner] = out.get(owner, 0) + nbytes
    return out


def summarize(model: nn.Module, image_shape: tuple[int, ...], name: str = "",
              training_memory: bool = True) -> Summary:
    """Trace `model` on one image of `image_shape` and tabulate every module it calls;
    `training_memory=False` skips tracing the backward pass (saved_bytes stay 0). Repeated
    blocks are unrolled: every one is a row."""
    model = unrolled(model)
    tracker = _FieldTracker()

    def record(next_fun: Any, args: tuple, kwargs: dict, context: Any) -> Any:
        module = context.module
        if context.method_name != "__call__" or module.scope is None or not module.path:
            return next_fun(*args, **kwargs)
        inputs = args[0] if args else None
        parent_train_only = bool(tracker.active) and tracker.active[-1].train_only
        # Appended before the call so that a block precedes its parts.
        call = _Call(tuple(module.path), module, inputs, len(tracker.calls),
                     parent_train_only or isinstance(module, blocks.AuxClassifier))
        call.field_in = tracker.field_of(inputs)
        tracker.calls.append(call)
        tracker.active.append(call)
        try:
            call.output = next_fun(*args, **kwargs)
        finally:
            tracker.active.pop()
        call.field_out = tracker.finish(call)
        call.finished = tracker.returned
        tracker.returned += 1
        tracker.fields[id(call.output)] = call.field_out
        return call.output

    def init(x: jax.Array) -> Any:
        with nn.intercept_methods(record):
            return model.init(jax.random.PRNGKey(0), x, train=False)

    variables = jax.eval_shape(init, jax.ShapeDtypeStruct((1, *image_shape), jnp.float32))
    params = variables.get("params", {})
    rows = _rows(tracker.calls, params)
    ordered = list(rows.values())
    fit = getattr(model, "fit", None)
    fitted = tuple(image_shape)
    if fit is not None and fit.size is not None:
        fitted = (fit.size, fit.size, image_shape[-1])
    top = [r for r in ordered if len(r.path) == 1 and not r.train_only]
    saved_total = 0
    if training_memory:
        saved = _attribute(saved_for_backward(model, variables, image_shape), list(rows))
        for path, row in rows.items():
            row.saved_bytes = sum(b for p, b in saved.items() if p and p[:len(path)] == path)
        saved_total = sum(saved.values())
    return Summary(
        model=name,
        input_shape=tuple(image_shape),
        model_input_shape=fitted,
        rows=ordered,
        params=_subtree_size(params, ()),
        macs=sum(r.macs for r in top),
        activation_bytes=math.prod(fitted) * 4 + sum(r.activation_bytes for r in top),
        saved_bytes=saved_total,
    )


def _rows(calls: list[_Call], params: Any) -> dict[tuple[str, ...], Row]:
    rows: dict[tuple[str, ...], Row] = {}
    for call in calls:
        if isinstance(call.module, Identity):
            continue
        if call.path not in rows:  # a module's first call is the one that shaped it
            output = call.output
            out_shape = output.shape[1:] if hasattr(output, "shape") else ()
            rows[call.path] = Row(
                call.path, _kind(call.module), tuple(out_shape),
                params=_subtree_size(params, call.path), train_only=call.train_only,
                receptive_field=call.field_out[0], jump=call.field_out[1],
                activation_bytes=0 if output is call.inputs else _nbytes(output))
        rows[call.path].macs += _own_macs(call.module, call.inputs, call.output)
    # A row's MACs include those of everything nested in it.
    leaf_macs = {path: row.macs for path, row in rows.items()}
    for path, row in rows.items():
        row.macs = sum(m for p, m in leaf_macs.items() if p[:len(path)] == path)
    return rows


# `summary.format`: how `cnnlab summary` prints a Summary at a depth.
FORMATS: Registry[Callable[[Summary, int], str]] = Registry("summary.format")
FORMATS.register("table", Summary.to_table)
FORMATS.register("json", Summary.to_json)


def validate(cfg: Any) -> None:
    FORMATS.get(cfg.format)
    require(cfg.depth >= 1, f"summary.depth={cfg.depth} must be >= 1")
