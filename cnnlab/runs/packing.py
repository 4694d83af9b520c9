"""A checkpoint's state as one flat buffer per dtype, plus the layout that takes it apart again.

Orbax writes each array of a state through its own TensorStore write, asyncio task and metadata
entry: about 0.9 ms of CPU per array, so a ResNet-20's ~200 arrays (parameters, batch
statistics, momenta) cost ~200 ms of CPU per save for 2 MiB of data, and on a CPU that time is
taken from training (benchmarks/checkpoint_cost.py, docs/scale.md). Packed, the same state is
a handful of arrays and a save costs ~20 ms. The copy that packs is the copy a snapshot makes
anyway (the next chunk may donate the state's buffers), so packing costs no extra memory.

`pack` runs on the device, inside the snapshot's compiled function; the layout (each leaf's
path as Orbax names it, dtype, shape and place in its buffer) is plain JSON, saved with the
checkpoint's metadata. `unpack` restores the leaves into a template's structure and shardings
(resume); `unpack_saved` into nested dicts keyed as Orbax would have saved them (reading a
checkpoint without building the run's state: transfer, tests). Only states whose arrays are
all replicated alike (every cnnlab run: data parallel) are packed; others are saved as trees.
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# The metadata key of the layout: its presence says the checkpoint is packed.
LAYOUT = "packed_layout"


def packable(leaves: list[Any]) -> bool:
    """Whether these leaves can be packed: jax arrays, all on one sharding that holds each of
    them whole on every device (one device, or replicated over a mesh)."""
    if not leaves or not all(isinstance(leaf, jax.Array) for leaf in leaves):
        return False
    first = leaves[0].sharding
    return all(leaf.sharding == first for leaf in leaves) and first.is_fully_replicated


def layout(tree: Any) -> list[dict[str, Any]]:
    """Per leaf, in tree order: its Orbax path, dtype, shape, buffer (a dtype's name) and offset
    in that buffer."""
    offsets: dict[str, int] = {}
    entries = []
    for keys, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        path = [_name(key) for key in keys]
        data = _stored(leaf)
        buffer, shape = str(data.dtype), list(data.shape)
        entry = {"path": path, "dtype": str(leaf.dtype), "shape": shape,
                 "buffer": buffer, "offset": offsets.get(buffer, 0)}
        if _is_key(leaf):  # a typed PRNG key is saved as its key data
            entry["key_impl"] = str(jax.random.key_impl(leaf))
        entries.append(entry)
        offsets[buffer] = offsets.get(buffer, 0) + math.prod(shape)
    return entries


def _name(key: Any) -> str | int:
    """A key path's entry as Orbax names it: attributes and dict keys by name, a sequence's
    items by index (Orbax restores tuples as lists)."""
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.SequenceKey):
        return key.idx
    return int(key.key)  # FlattenedIndexKey


def _is_key(leaf: Any) -> bool:
    return jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _stored(leaf: Any) -> Any:
    """What a leaf is saved as: a typed PRNG key as its key data, any other leaf as itself."""
    return jax.random.key_data(leaf) if _is_key(leaf) else leaf


def pack(leaves: list[jax.Array]) -> dict[str, jax.Array]:
    """The leaves raveled and concatenated, one buffer per stored dtype, in leaf order (traced
    inside the snapshot's jit: a copy on the device)."""
    groups: dict[str, list[jax.Array]] = {}
    for leaf in map(_stored, leaves):
        groups.setdefault(str(leaf.dtype), []).append(leaf.ravel())
    return {name: jnp.concatenate(parts) for name, parts in groups.items()}


def buffer_shapes(entries: list[dict[str, Any]]) -> dict[str, tuple[int]]:
    """Each buffer's length, from the layout."""
    sizes: dict[str, int] = {}
    for entry in entries:
        sizes[entry["buffer"]] = entry["offset"] + math.prod(entry["shape"])
    return {name: (size,) for name, size in sizes.items()}


def _leaf(buffers: dict[str, Any], entry: dict[str, Any], xp: Any = jnp) -> Any:
    start, shape = entry["offset"], tuple(entry["shape"])
    data = xp.reshape(buffers[entry["buffer"]][start:start + math.prod(shape)], shape)
    if "key_impl" in entry:
        return jax.random.wrap_key_data(jnp.asarray(data), impl=entry["key_impl"])
    return data


def check_fits(entries: list[dict[str, Any]], like_leaves: list[Any]) -> None:
    """ValueError naming the first leaf whose dtype or shape differs from the template's."""
    if len(entries) != len(like_leaves):
        raise ValueError(f"it holds {len(entries)} arrays where this state has "
                         f"{len(like_leaves)}")
    for entry, leaf in zip(entries, like_leaves, strict=True):
        shape = list(_stored(leaf).shape)
        if entry["dtype"] != str(leaf.dtype) or entry["shape"] != shape:
            raise ValueError(f"{'.'.join(entry['path'])} is {entry['dtype']}{entry['shape']} "
                             f"there and {leaf.dtype}{shape} here")


def unpack(buffers: dict[str, jax.Array], entries: list[dict[str, Any]], like: Any) -> Any:
    """The packed state in `like`'s structure, each leaf on `like`'s sharding; the caller has
    checked that it fits (`check_fits`, before reading the buffers)."""
    like_leaves, tree = jax.tree.flatten(like)
    shardings = [leaf.sharding for leaf in like_leaves]
    split = jax.jit(lambda b: [_leaf(b, e) for e in entries], out_shardings=shardings)
    return jax.tree.unflatten(tree, split(buffers))


def unpack_saved(buffers: dict[str, Any], entries: list[dict[str, Any]]) -> dict[str, Any]:
    """The packed state as nested dicts (lists where the state had tuples, None for their empty
    items) of NumPy arrays, as restoring a tree-saved checkpoint without a template gives."""
    host = {name: np.asarray(buffer) for name, buffer in buffers.items()}
    root: dict[str, Any] = {}
    for entry in entries:
        node: Any = root
        path = entry["path"]
        for key, after in zip(path[:-1], path[1:], strict=True):
            node = _child(node, key, [] if isinstance(after, int) else {})
        _child(node, path[-1], _leaf(host, entry, np))
    return root


def _child(node: Any, key: str | int, new: Any) -> Any:
    """node[key], set to `new` first where it is missing (lists grow, with None between)."""
    if isinstance(node, list):
        node.extend([None] * (key + 1 - len(node)))
        if node[key] is None:
            node[key] = new
        return node[key]
    return node.setdefault(key, new)
