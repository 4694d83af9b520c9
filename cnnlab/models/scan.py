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
"""

import dataclasses
from collections.abc import Sequence

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
    variables = {col: _stack([parent.variables[col][name] for name in names])
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
    for col, stacked in written.items():
        for i, name in enumerate(names):
            parent.put_variable(col, name, jax.tree.map(lambda leaf, i=i: leaf[i], stacked))
    return x


def _stack(trees: list) -> dict:
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


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
