"""Asynchronous checkpoints (cnnlab/runs/checkpoint.py): a save returns while Orbax writes, a
kill during the write loses nothing, and the device-side checksum catches corruption."""

import os
import signal
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cnnlab.runs import checkpoint
from cnnlab.runs.rundir import RunDir
from tests.helpers import REPO, train_tiny
from tests.test_faults import FAULTS, _params


def _state(seed: int = 0) -> dict:
    key = jax.random.PRNGKey(seed)
    return {"w": jax.random.normal(key, (64, 32)), "step": jnp.int32(7),
            "half": jnp.arange(10, dtype=jnp.bfloat16), "flag": jnp.array([True, False]),
            "rng": key}


def test_a_save_returns_before_its_files_are_written_and_wait_ends_it(tmp_path, monkeypatch):
    """The commit is held until the test releases it: `save` must return meanwhile (the
    synchronous save never did), and `wait` must find the checkpoint complete."""
    release, committing, committed = threading.Event(), threading.Event(), threading.Event()
    from orbax.checkpoint._src.checkpointers import async_checkpointer

    commit = async_checkpointer._on_commit_callback

    def held_commit(*args: object, **kwargs: object) -> None:
        committing.set()
        release.wait(20)
        commit(*args, **kwargs)
        committed.set()

    monkeypatch.setattr(async_checkpointer, "_on_commit_callback", held_commit)
    saver = checkpoint.Checkpointer(tmp_path / "ckpt", keep=2)
    state = _state()
    saver.save(1, state, {"note": "first"})
    returned_before_commit = not committed.is_set()
    assert committing.wait(20)
    assert returned_before_commit and not (tmp_path / "ckpt" / "1").is_dir()
    release.set()
    saver.wait()
    assert saver.all_steps() == [1]
    restored, meta = saver.restore(1, state)
    assert meta == {"note": "first"}
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    saver.close()


def test_a_restored_state_runs_the_fresh_states_compiled_program(tmp_path):
    """Orbax restores arrays committed to their device; a one-device run's fresh state is not,
    and jit compiled a second program for the restored one (every resume compiled again)."""
    state = _state()
    step = jax.jit(lambda s: jax.tree.map(lambda x: x + 1 if x.dtype != jnp.bool_ else ~x, s))
    step(state)
    saver = checkpoint.Checkpointer(tmp_path / "ckpt", keep=2)
    saver.save(1, state, {})
    saver.wait()
    restored, _ = saver.restore(1, state)
    saver.close()
    for a, b in zip(jax.tree.leaves(step(state)), jax.tree.leaves(step(restored)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert step._cache_size() == 1


def test_a_snapshot_waits_for_nothing_and_saves_the_state_as_it_was(tmp_path):
    """The loop's checkpoint (`snapshot`) moves nothing to the host and survives the state's
    buffers being donated to the next chunk; `flush` (at the next tick) saves it, verified."""
    saver = checkpoint.Checkpointer(tmp_path / "ckpt", keep=2)
    state = jax.tree.map(lambda x: x + 0 if x.dtype != jnp.bool_ else ~x, _state())
    expected = jax.device_get(state)
    with jax.transfer_guard_device_to_host("disallow"):
        saver.snapshot(3, state, {"note": "queued"})
    for leaf in jax.tree.leaves(state):
        leaf.delete()  # what donating them to the next chunk does
    assert saver.all_steps() == []  # nothing handed to Orbax yet
    saver.flush()
    saver.wait()
    restored, meta = saver.restore(3, _state())
    assert meta == {"note": "queued"}  # and its checksum verified
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    saver.close()


def test_the_loop_queues_its_checkpoint_and_saves_it_at_the_next_tick(tmp_path):
    """The checkpoint action at a due step reads nothing back from the device (it would wait
    for the chunk that computes the state); the next tick hands it to Orbax, and the last one
    is saved and waited for at once."""
    from cnnlab.training import actions
    from tests.helpers import compose_config

    action = actions.Checkpoint(compose_config(["checkpoint.every=10"]), RunDir(tmp_path))
    first = actions.Tick(10, 10, False, _state(), {})
    with jax.transfer_guard_device_to_host("disallow"):
        action.settle(first)
        action(first)
    assert action.checkpoints.all_steps() == []
    action.settle(actions.Tick(15, 5, False, _state(1), {}))  # not due: only the hand-over
    action.checkpoints.wait()
    assert action.checkpoints.all_steps() == [10]
    last = actions.Tick(20, 5, True, _state(2), {})
    action.settle(last)
    action(last)
    assert action.checkpoints.all_steps() == [10, 20]
    restored, _ = action.checkpoints.restore(10, _state(5))
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(_state()["w"]))
    action.close()


def test_the_checksum_changes_with_any_flipped_bit_and_moved_words():
    state = _state()
    reference = checkpoint.state_checksum(state)
    assert checkpoint.state_checksum(_state()) == reference  # a function of the contents
    words = np.asarray(state["w"]).view(np.uint32).ravel().copy()
    for index, bit in [(0, 0), (1000, 31), (2047, 17)]:
        flipped = words.copy()
        flipped[index] ^= np.uint32(1 << bit)
        changed = {**state, "w": jnp.asarray(flipped.view(np.float32).reshape(64, 32))}
        assert checkpoint.state_checksum(changed) != reference
    swapped = words.copy()
    swapped[[3, 4]] = swapped[[4, 3]]
    assert checkpoint.state_checksum(
        {**state, "w": jnp.asarray(swapped.view(np.float32).reshape(64, 32))}) != reference
    assert checkpoint.state_checksum({**state, "flag": jnp.array([True, True])}) != reference


def test_verify_reads_the_new_checksum_and_the_sha256_of_older_checkpoints():
    state, other = _state(0), _state(1)
    assert checkpoint.verify(state, {checkpoint.CHECKSUM: checkpoint.state_checksum(state),
                                     "x": 1}) == {"x": 1}
    assert checkpoint.verify(state, {checkpoint.DIGEST: checkpoint.state_digest(state)}) == {}
    for key, digest in ((checkpoint.CHECKSUM, checkpoint.state_checksum),
                        (checkpoint.DIGEST, checkpoint.state_digest)):
        with pytest.raises(ValueError, match="do not match the checksum"):
            checkpoint.verify(state, {key: digest(other)})


def test_a_kill_during_a_background_save_resumes_from_the_previous_checkpoint(
        tmp_path, fashion_dir):
    run_dir = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(REPO / "tests" / "kill_during_save.py"),
                           str(fashion_dir), str(run_dir)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    # Killed with checkpoint 15's files written but not committed: 5 and 10 are complete.
    before = (run_dir / "killed_while_saving_15").read_text().split()
    assert any(name.startswith("15.") for name in before), before
    assert RunDir(run_dir).checkpoint_steps() == [5, 10]
    summary = train_tiny(run_dir, fashion_dir, FAULTS)
    assert summary["status"] == "finished" and summary["resumed_from"] == 10
    straight = tmp_path / "straight"
    assert train_tiny(straight, fashion_dir, FAULTS)["status"] == "finished"
    for a, b in zip(_params(straight, 20), _params(run_dir, 20), strict=True):
        np.testing.assert_array_equal(a, b)
    assert ocp.CheckpointManager(run_dir / "checkpoints").all_steps() == [5, 10, 15, 20]
