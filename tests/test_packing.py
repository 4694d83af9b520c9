"""Packed checkpoints (cnnlab/runs/packing.py): a state saved as one buffer per dtype restores
to the same bits and structure as the state saved as a tree, reads back without a template as
the tree-saved one does, refuses a state of other shapes by name before reading, and a
checkpoint saved as a tree (every run before packing) still restores."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cnnlab.runs import checkpoint, packing
from tests.helpers import saved_state, tiny_step


def _flat(tree: object) -> dict[str, np.ndarray]:
    """Leaves by their path, dict keys and sequence indices alike as text."""
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
        flat["/".join(names)] = np.asarray(jax.random.key_data(leaf) if jax.dtypes.issubdtype(
            leaf.dtype, jax.dtypes.prng_key) else leaf)
    return flat


def _assert_same(a: object, b: object) -> None:
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for key in fa:
        assert fa[key].dtype == fb[key].dtype and fa[key].shape == fb[key].shape, key
        np.testing.assert_array_equal(fa[key], fb[key], err_msg=key)


@pytest.fixture(scope="module")
def train_state() -> object:
    """A real train state: BN statistics, SGD momentum's trace, optax's empty states, EMA."""
    state = tiny_step(["eval.ema_decay=0.9"]).state
    # Not the initial values (zeros, ones): every leaf distinct from its neighbours.
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.PRNGKey(3), len(leaves))
    return jax.tree.unflatten(tree, [
        leaf + jax.random.normal(k, leaf.shape).astype(leaf.dtype)
        if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf
        for k, leaf in zip(keys, leaves, strict=True)])


def _save(folder: object, state: object) -> None:
    saver = checkpoint.Checkpointer(folder, keep=None)
    saver.save(5, state, {"note": "x"})
    saver.close()


def test_a_packed_train_state_restores_as_the_tree_saved_one(tmp_path, train_state, monkeypatch):
    _save(tmp_path / "packed", train_state)
    with monkeypatch.context() as m:
        m.setattr(packing, "packable", lambda leaves: False)  # how runs saved before packing
        _save(tmp_path / "tree", train_state)
    # What Orbax wrote: one array per dtype, against one per leaf.
    raw = ocp.StandardCheckpointer().restore(tmp_path / "packed" / "5" / "state")
    dtypes = {str(x.dtype) for x in jax.tree.leaves(train_state)}
    assert set(raw) == {"buffers"} and set(raw["buffers"]) == dtypes
    n_leaves = len(jax.tree.leaves(train_state))
    assert n_leaves > 20 and len(jax.tree.leaves(saved_state(tmp_path / "tree" / "5"))) == n_leaves
    like = jax.tree.map(jnp.zeros_like, train_state)
    for folder in ("packed", "tree"):
        saver = checkpoint.Checkpointer(tmp_path / folder, keep=None)
        restored, meta = saver.restore(5, like)
        assert meta == {"note": "x"}  # the layout and checksum are not the caller's
        assert jax.tree.structure(restored) == jax.tree.structure(train_state)
        _assert_same(restored, train_state)
        as_saved = saver.restore_as_saved(5)
        saver.close()
        if folder == "packed":
            packed_as_saved = as_saved
    # Without a template: the same nested dicts (lists for tuples) and values either way.
    _assert_same(packed_as_saved, as_saved)
    assert packed_as_saved["opt_state"][0] is None  # optax's empty state, as Orbax gives it
    # And the test's own reader (NumPy slicing of the layout) agrees with packing.unpack_saved.
    _assert_same(jax.tree.leaves(saved_state(tmp_path / "packed" / "5")["params"]),
                 jax.tree.leaves(packed_as_saved["params"]))


def test_every_dtype_and_a_typed_key_round_trip(tmp_path):
    state = {"w": jnp.arange(12.0).reshape(3, 4), "half": jnp.arange(5, dtype=jnp.bfloat16),
             "flag": jnp.array([True, False, True]), "step": jnp.int32(7),
             "n": jnp.arange(3, dtype=jnp.int32), "key": jax.random.key(4),
             "old_key": jax.random.PRNGKey(5), "empty": jnp.zeros((0, 3))}
    _save(tmp_path / "c", state)
    layout = json.loads((tmp_path / "c" / "5" / "meta" / "metadata").read_text())[packing.LAYOUT]
    assert {e["buffer"] for e in layout} == {"float32", "bfloat16", "bool", "int32", "uint32"}
    saver = checkpoint.Checkpointer(tmp_path / "c", keep=None)
    restored, _ = saver.restore(5, jax.tree.map(lambda x: x, state))
    saver.close()
    assert restored["key"].dtype == state["key"].dtype
    _assert_same(restored, state)


def test_a_state_of_other_shapes_is_refused_by_name(tmp_path, train_state):
    _save(tmp_path / "c", train_state)
    wider = train_state.replace(params={**train_state.params, "head": {
        "kernel": jnp.zeros((5, 11)), "bias": jnp.zeros(11)}})
    saver = checkpoint.Checkpointer(tmp_path / "c", keep=None)
    with pytest.raises(ValueError, match=r"params\.head\.bias is float32\[\d+\] there and "
                                         r"float32\[11\] here"):
        saver.restore(5, wider)
    # Resuming: no usable checkpoint, the reason in the one line (cnnlab/training/loop.py then
    # names the config keys that changed), and the checkpoint left in place.
    with pytest.raises(checkpoint.NoUsableCheckpoint, match=r"5 \(ValueError: params\.head"):
        saver.restore_latest(wider)
    saver.close()
    assert (tmp_path / "c" / "5").is_dir()


def test_state_that_is_not_all_on_one_replicated_sharding_is_saved_as_a_tree(tmp_path):
    state = {"w": jnp.ones(3), "host": np.ones(2, np.float32)}
    assert not packing.packable(jax.tree.leaves(state))
    _save(tmp_path / "c", state)
    raw = ocp.StandardCheckpointer().restore(tmp_path / "c" / "5" / "state")
    assert set(raw) == {"w", "host"}
