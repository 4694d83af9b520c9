"""Repeated blocks run as one `lax.scan`: compile time that does not grow with depth.

A stage of a residual net repeats the same block n times. Unrolled, XLA compiles each copy
separately, so ResNet-110 takes five times ResNet-20's compile. `scan_blocks` runs such a run of
identical blocks as a scan over their stacked variables: one copy is compiled whatever n is.

The variables stay where the unrolled model keeps them (`stage1_block2`, ...): they are stacked
when the scan reads them and written back per block, so checkpoints, transfer learning, weight
conversion and every per-layer tool see one layout, and a run may switch `model.scan_blocks`
on resume. Initialization always runs the unrolled blocks, so a seed gives the same weights
either way (`init_variables` runs a scanned model's init op by op: compiling 600 unrolled
blocks takes minutes). What differs: dropout and stochastic-depth draws (one key per block
split from the parent's, not the unrolled model's per-module keys), and per-module hooks (Flax's
`capture_intermediates`, method interceptors, the activation recorder), which do not see inside
the scan; `unrolled()` gives the same model without it for those.

Inside a compiled chunk of training steps the stacking is hoisted out of the steps: the chunk
stacks each run's variables (and everything shaped like them: optimizer state, moving
averages) once on entry (`stack_runs`), under the run's `stacked_name`, the steps read and
update them stacked, and the chunk unstacks them on exit (`unstack_runs`). The state, its
checkpoints and every tool outside the chunk keep the per-block names; per step there is no
stacking, no per-block write-back and no per-block optimizer update, so the program's size
stops growing with depth (docs/speed.md). The runs are those the model scans
(`recording_runs` learns them by tracing).
"""

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# The collections a block reads (stacked); those of them the caller made mutable are written
# back, together with what the blocks sow.
READ = ("params", "batch_stats")
WRITTEN = ("batch_stats", "intermediates")


def scan_blocks(parent: nn.Module, names: Sequence[str], block: nn.Module, x: jax.Array,
                train: bool, survival: Sequence[float] | None = None) -> jax.Array:
    """Apply the children `names` of `parent`, blocks with identical variable shapes, in order.

    Called inside `parent`'s compact method instead of calling the blocks. `block` is an unbound
    module (`parent=None`) that computes one of them; `survival` their stochastic-depth survival
    probabilities (None: no gate), given to `block` per step.
    """
    key = stacked_name(names)
    for runs in _RECORDERS:
        runs.append(tuple(names))
    # A collection the chunk stacked holds the run under `key` already (module docstring).
    stacked = {col for col in READ if col in parent.variables and key in parent.variables[col]}
    variables = {col: parent.variables[col][key] if col in stacked
                 else _stack([parent.variables[col][name] for name in names])
                 for col in READ if col in parent.variables}
    mutable = [col for col in WRITTEN if parent.is_mutable_collection(col)]
    keys = (jax.random.split(parent.make_rng("dropout"), len(names))
            if train and parent.has_rng("dropout") else None)
    gates = None if survival is None else jnp.asarray(survival)

    def step(y: jax.Array, per_block: tuple) -> tuple[jax.Array, dict]:
        block_vars, key, p = per_block
        out = block.apply(block_vars, y, train=train, survival=p,
                          rngs={} if key is None else {"dropout": key},
                          mutable=mutable or False)
        return out if mutable else (out, {})

    x, written = jax.lax.scan(step, x, (variables, keys, gates))
    for col, values in written.items():
        if col in stacked:
            parent.put_variable(col, key, values)
            continue
        for i, name in enumerate(names):
            parent.put_variable(col, name, jax.tree.map(lambda leaf, i=i: leaf[i], values))
    return x


def _stack(trees: list) -> dict:
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def stacked_name(names: Sequence[str]) -> str:
    """The key a run of blocks' stacked variables have inside a chunk: not a module name, so it
    cannot clash with one."""
    return f"{names[0]}:{names[-1]}"


# The lists `recording_runs` fills, innermost last.
_RECORDERS: list[list[tuple[str, ...]]] = []


@contextlib.contextmanager
def recording_runs() -> Iterator[list[tuple[str, ...]]]:
    """The runs of blocks every `scan_blocks` traced within the block calls, in call order
    (a run traced twice is listed twice)."""
    runs: list[tuple[str, ...]] = []
    _RECORDERS.append(runs)
    try:
        yield runs
    finally:
        _RECORDERS.remove(runs)


def scanned_runs(body: Callable, carry: object, xs: object) -> tuple[tuple[str, ...], ...]:
    """The runs of blocks that a `lax.scan` body `body(carry, x)` scans, once each: traced
    abstractly on the first of `xs` (None: no per-step input)."""
    with recording_runs() as runs:
        jax.eval_shape(body, carry, jax.tree.map(lambda a: a[0], xs))
    return tuple(dict.fromkeys(runs))


def stacked_scan(body: Callable, carry: object, xs: object, **options: object) -> tuple:
    """`jax.lax.scan(body, carry, xs, **options)` with the variables of the blocks `body` scans
    (and all that mirrors them) stacked in the carry from the first step to the last: a
    chunk of training steps (module docstring)."""
    runs = scanned_runs(body, carry, xs)
    carry, ys = jax.lax.scan(body, stack_runs(carry, runs), xs, **options)
    return unstack_runs(carry, runs), ys


def _restructure(tree: object, change: Callable[[dict], dict]) -> object:
    """`tree` with `change` applied to each of its dicts, innermost first: the variables and
    whatever mirrors their nesting (optax states hold dicts shaped like the params)."""
    def visit(node: object) -> object:
        if not isinstance(node, dict):
            return node
        return change({key: _restructure(value, change) for key, value in node.items()})
    return jax.tree.map(visit, tree, is_leaf=lambda node: isinstance(node, dict))


def stack_runs(tree: object, runs: Sequence[tuple[str, ...]]) -> object:
    """Every dict of `tree` that holds all the blocks of a run, with them replaced by their
    stacked variables under `stacked_name(run)` (the layout a chunk's steps use)."""
    def change(node: dict) -> dict:
        for run in runs:
            if all(name in node for name in run):
                node[stacked_name(run)] = _stack([node.pop(name) for name in run])
        return node
    return _restructure(tree, change)


def unstack_runs(tree: object, runs: Sequence[tuple[str, ...]]) -> object:
    """`stack_runs` undone: each run's blocks back under their own names, in their order."""
    def change(node: dict) -> dict:
        for run in runs:
            if (key := stacked_name(run)) in node:
                stacked = node.pop(key)
                node.update({name: jax.tree.map(lambda leaf, i=i: leaf[i], stacked)
                             for i, name in enumerate(run)})
        return node
    return _restructure(tree, change)


def unrolled(model: nn.Module) -> nn.Module:
    """`model` with its repeated blocks unrolled (same variables): for per-module hooks."""
    if not scans_blocks(model):
        return model
    # The option lives in the model's one options field (cnnlab.models.ModelFamily); a copy,
    # so the model's own options are left as they are.
    return model.clone(options=dataclasses.replace(model.options, scan_blocks=False))


def scans_blocks(model: nn.Module) -> bool:
    """Whether `model` runs its repeated blocks as scans (families without the option do not)."""
    return bool(getattr(getattr(model, "options", None), "scan_blocks", False))
