"""Orbax checkpoints of the train state plus a small JSON of run bookkeeping, verified on restore.

Saves are asynchronous: `save` returns once Orbax has copied the state off the device, and the
files are written by Orbax's background thread while training goes on; a save waits only for
the one before it (`wait`), and `close` for the last. The training loop goes one step further
(`snapshot`, then `flush`): a checkpoint is first a copy of the state queued on the device behind
the chunk that computes it, with its checksum, which the host does not wait for; it is handed to
Orbax at the next tick, once the next chunk is queued, so the device is never idle while Orbax
copies the state to the host. Orbax writes into a temporary folder and
renames it when complete, so a run killed mid-save (or during the write in the background)
leaves the previous checkpoint as the latest.

The state is saved packed where it can be, one flat array per dtype with its layout in the
metadata (cnnlab/runs/packing.py): Orbax's cost is per array, and packed a save costs a tenth of
the CPU; checkpoints saved as trees restore as before.

What Orbax cannot see (bytes flipped on disk, a file truncated after the fact) a checksum of
the state, saved in the metadata, catches: a bad checkpoint is reported in one line and the
previous one is used. The checksum is computed on the device by a compiled function
(`state_checksum`: two 32-bit sums per array, one of them position-weighted), so it needs no
host copy of the state and works on sharded arrays (XLA reduces across the shards); only a few
bytes per array reach the host. Checkpoints written before it carry a SHA-256 of the host copy
(`state_sha256`), which is still verified.
"""

import contextlib
import hashlib
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from cnnlab import parallel
from cnnlab.errors import ConfigError
from cnnlab.runs import packing

log = logging.getLogger(__name__)
# The metadata key of the checksum: `state_checksum` now; `state_sha256` in checkpoints written
# before saves became asynchronous (2026-12-05), still verified on restore.
CHECKSUM = "state_checksum"
DIGEST = "state_sha256"


class NoUsableCheckpoint(ConfigError):
    """Checkpoints exist but none can be restored: the run says so rather than start over."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, unwritable folder): training stops."""


# Orbax logs each failed write or read with a traceback, from several threads, through absl's
# logger, and asyncio logs its never-retrieved futures when they are collected; the caller
# reports the failure itself, in one line.
_ORBAX_ERROR_LOGGERS = ("absl", "asyncio")


@contextlib.contextmanager
def _orbax_errors_quiet(restore: bool = True) -> Iterator[None]:
    """Orbax's error logs off inside the block; with `restore=False` they stay off if it
    raises (a failed save ends the run, and Orbax's threads report it again until exit)."""
    loggers = [logging.getLogger(name) for name in _ORBAX_ERROR_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    failed = True
    try:
        yield
        failed = False
    finally:
        if restore or not failed:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)


def state_digest(state: Any) -> str:
    """SHA-256 over the state's leaves (dtype, shape and bytes), in tree order: the checksum of
    checkpoints written before `state_checksum` (it copies the whole state to the host)."""
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(jax.device_get(state)):
        array = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _words(leaf: jax.Array) -> jax.Array:
    """The leaf's bits as a flat uint32 vector (narrower types widened, wider ones split)."""
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        leaf = jax.random.key_data(leaf)
    if leaf.dtype == jnp.bool_:
        leaf = leaf.astype(jnp.uint8)
    size = leaf.dtype.itemsize
    if size >= 4:  # 8-byte types gain a trailing axis of two words
        return jax.lax.bitcast_convert_type(leaf, jnp.uint32).ravel()
    unsigned = {1: jnp.uint8, 2: jnp.uint16}[size]
    return jax.lax.bitcast_convert_type(leaf, unsigned).astype(jnp.uint32).ravel()


@jax.jit
def _leaf_sums(leaves: list[jax.Array]) -> jax.Array:
    """(leaves, 2) uint32: each leaf's sum of words and sum of words times odd weights, modulo
    2^32. Integer sums do not depend on the order of the reduction, so any device count or
    sharding gives the same numbers; the weighted sum changes with any single flipped bit and
    with words that change places."""
    sums = []
    for leaf in leaves:
        words = _words(leaf)
        weights = jnp.arange(words.shape[0], dtype=jnp.uint32) * 2 + 1
        sums.append(jnp.stack([jnp.sum(words, dtype=jnp.uint32),
                               jnp.sum(words * weights, dtype=jnp.uint32)]))
    return jnp.stack(sums) if sums else jnp.zeros((0, 2), jnp.uint32)


@jax.jit
def _snapshot(leaves: list[jax.Array]) -> tuple[list[jax.Array], jax.Array]:
    """Copies of the leaves (the next chunk may donate theirs) and their `_leaf_sums`: one
    dispatch, queued behind the work that computes the leaves."""
    return [jnp.copy(leaf) for leaf in leaves], _leaf_sums(leaves)


@jax.jit
def _packed_snapshot(leaves: list[jax.Array]) -> tuple[dict[str, jax.Array], jax.Array]:
    """As `_snapshot`, the copy packed into one buffer per dtype (cnnlab/runs/packing.py)."""
    return packing.pack(leaves), _leaf_sums(leaves)


def _described(leaves: list[Any]) -> list[tuple[Any, tuple[int, ...]]]:
    return [(leaf.dtype, tuple(leaf.shape)) for leaf in leaves]


def state_checksum(state: Any) -> str:
    """The checksum of checkpoints: computed on the device where the state lives (`_leaf_sums`),
    so neither a host copy of the state nor a whole shard on one host is needed; the host
    hashes the leaves' dtypes and shapes with those sums. Not a defence against tampering:
    against disk and transfer corruption."""
    leaves = jax.tree.leaves(state)
    return _checksum_text(_described(leaves), _leaf_sums(leaves))


def _checksum_text(described: list[tuple[Any, tuple[int, ...]]], device_sums: jax.Array) -> str:
    sums = np.asarray(jax.device_get(device_sums))
    digest = hashlib.sha256()
    for (dtype, shape), (plain, weighted) in zip(described, sums, strict=True):
        digest.update(f"{dtype}{shape}:{int(plain)}:{int(weighted)};".encode())
    return digest.hexdigest()


def _on_host(meta: dict) -> dict:
    """`meta` with its device scalars (a training window's sums) as JSON numbers: read when the
    checkpoint is handed to Orbax, by when the chunk that computed them has run."""
    return jax.tree.map(lambda v: jax.device_get(v).item() if isinstance(v, jax.Array) else v,
                        meta)


def verify(state: Any, meta: dict) -> dict:
    """`meta` without its checksum, once the checksum saved in it matches `state`'s (either
    kind); ValueError otherwise. A checkpoint without one (none of cnnlab's) passes."""
    meta = dict(meta)
    for key, checksum in ((CHECKSUM, state_checksum), (DIGEST, state_digest)):
        expected = meta.pop(key, None)
        if expected is not None and checksum(state) != expected:
            raise ValueError("its contents do not match the checksum saved with it")
    return meta


def _from_the_main_thread(record: logging.LogRecord) -> bool:
    """Orbax's background threads log a failed write with a traceback (and asyncio its futures);
    `Checkpointer.wait` raises it again in the main thread, reported there in one line."""
    return record.levelno < logging.ERROR or record.threadName == "MainThread"


def _quiet_background_errors() -> None:
    for name in _ORBAX_ERROR_LOGGERS:
        logger = logging.getLogger(name)
        if _from_the_main_thread not in logger.filters:
            logger.addFilter(_from_the_main_thread)


def _one_line(error: BaseException) -> str:
    # TensorStore reports an OS error as a ValueError of several hundred characters that ends
    # in the errno: name the errno, which is what the user can act on.
    if code := re.search(r"os_error_code='(\d+)'", str(error)):
        return f"OSError: [Errno {code[1]}] {os.strerror(int(code[1]))}"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0][:200]}" if lines else type(error).__name__


def _ignore_orbax_teardown_errors() -> None:
    """After a failed save or restore, TensorStore's callbacks keep calling into the event loop
    Orbax has already closed (a traceback each, through `sys.unraisablehook`) and leave
    coroutines never awaited; the failure itself is reported in one line (a checkpoint skipped,
    or the run stopped), so these are noise. Installed once per process."""
    previous = sys.unraisablehook
    if getattr(previous, "ignores_orbax_teardown", False):
        return

    def hook(unraisable: "sys.UnraisableHookArgs") -> None:
        if not (isinstance(unraisable.exc_value, RuntimeError)
                and "Event loop is closed" in str(unraisable.exc_value)):
            previous(unraisable)

    hook.ignores_orbax_teardown = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook
    warnings.filterwarnings("ignore", "coroutine .* was never awaited", RuntimeWarning)


def _committed_as(like: Any, restored: Any) -> Any:
    """`restored` uncommitted where `like` is: Orbax hands back arrays committed to a device,
    and a one-device run's fresh state is not, which jit treats as another program; without
    this every resumed run compiled its chunk again (a host round trip, once per resume)."""
    if (isinstance(like, jax.Array) and not like.committed and restored.committed
            and not jax.dtypes.issubdtype(restored.dtype, jax.dtypes.prng_key)):
        return jnp.asarray(np.asarray(restored))
    return restored


class Checkpointer:
    """Saves `(state, meta)` under `directory/<step>` in the background; the newest usable one is
    resumed."""

    def __init__(self, directory: Path, keep: int | None) -> None:
        # keep=None keeps every checkpoint (snapshot ensembles need all of them).
        self.directory = Path(directory).absolute()
        self._failed_save = False
        self._pending: int | None = None  # the step being written in the background
        # (step, what Orbax saves, the leaves' dtypes and shapes, their sums on the device,
        # meta) not yet handed to Orbax.
        self._queued: tuple[int, Any, list, jax.Array, dict] | None = None
        _ignore_orbax_teardown_errors()
        _quiet_background_errors()
        # A run saves into checkpoints/ and best/ at the same step. On several hosts each
        # manager's background save meets the other processes at barriers whose names are the
        # same for every manager unless prefixed: two saves at once then collide ("barrier ...
        # is already ongoing") and one process hangs. The folder's name keeps them apart.
        self._manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=True,
                multiprocessing_options=ocp.options.MultiprocessingOptions(
                    barrier_sync_key_prefix=self.directory.name)))

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Start saving checkpoint `step`: returns once the state is off the device (its buffers
        may then be donated to the next step), while Orbax writes the files in the background.
        The previous save is waited for first, so a failed one is reported with its step."""
        self.flush()
        self._queue(step, state, meta, copy=False)
        self.flush()

    def snapshot(self, step: int, state: Any, meta: dict) -> None:
        """Queue checkpoint `step` without waiting for `state` to be computed: a copy of it on
        the device (so its buffers may be donated to the next chunk) and its checksum, both
        queued behind the work that computes it. `flush` (or `wait`, `close`) saves it: call it
        once the next chunk is queued, and the device does not idle while Orbax copies the
        state to the host. Costs one copy of the state in device memory until then."""
        self.flush()
        self._queue(step, state, meta, copy=True)

    def _queue(self, step: int, state: Any, meta: dict, copy: bool) -> None:
        """What `flush` hands to Orbax: the state packed into one buffer per dtype where it can
        be (a copy; its layout in the metadata), else the state's tree, copied if `copy`."""
        leaves, tree = jax.tree.flatten(state)
        if packing.packable(leaves):
            buffers, sums = _packed_snapshot(leaves)
            saved, meta = {"buffers": buffers}, {**meta, packing.LAYOUT: packing.layout(state)}
        elif copy:
            copies, sums = _snapshot(leaves)
            saved = jax.tree.unflatten(tree, copies)
        else:
            saved, sums = state, _leaf_sums(leaves)
        self._queued = (step, saved, _described(leaves), sums, meta)

    def flush(self) -> None:
        """Hand the queued checkpoint (`snapshot`) to Orbax, after the save before it is on disk;
        returns once the state is off the device."""
        if self._queued is None:
            return
        (step, saved, described, sums, meta), self._queued = self._queued, None
        self._wait_pending()
        meta = {**_on_host(meta), CHECKSUM: _checksum_text(described, sums)}
        try:
            with _orbax_errors_quiet(restore=False):
                self._manager.save(step, args=ocp.args.Composite(
                    state=ocp.args.StandardSave(saved), meta=ocp.args.JsonSave(meta)), force=True)
        except Exception as error:  # Orbax wraps OSError (ENOSPC, EACCES) in its own types
            self._failed(step, error)
        self._pending = step

    def wait(self) -> None:
        """Until the queued and background saves (if any) are on disk; CheckpointWriteError if
        one failed."""
        self.flush()
        self._wait_pending()

    def _wait_pending(self) -> None:
        if self._pending is None:
            return
        step, self._pending = self._pending, None
        try:
            with _orbax_errors_quiet(restore=False):
                self._manager.wait_until_finished()
        except Exception as error:
            self._failed(step, error)
        # Orbax's finalizing thread logs some failures (a commit that did not happen) instead of
        # raising them: a checkpoint is saved once its folder has its final name.
        if not (self.directory / str(step)).is_dir():
            self._failed(step, RuntimeError("the checkpoint was not completed"))

    def _failed(self, step: int, error: BaseException) -> None:
        self._failed_save = True
        raise CheckpointWriteError(
            f"could not save checkpoint {step} in {self.directory}: {_one_line(error)}"
        ) from None

    def restore(self, step: int, like: Any) -> tuple[Any, dict]:
        """Restore into the structure, shapes, dtypes and shardings of `like`, verified."""
        meta = self._read_meta(step)
        if (entries := meta.pop(packing.LAYOUT, None)) is not None:
            like_leaves = jax.tree.leaves(like)
            packing.check_fits(entries, like_leaves)  # before reading any array
            abstract = {"buffers": {
                name: jax.ShapeDtypeStruct(shape, name, sharding=like_leaves[0].sharding)
                for name, shape in packing.buffer_shapes(entries).items()}}
            buffers = self._read_state(step, abstract)["buffers"]
            state = packing.unpack(buffers, entries, like)
        else:  # saved as a tree (before packing, or a state that cannot be packed)
            state = self._read_state(step, jax.tree.map(ocp.utils.to_shape_dtype_struct, like))
        meta = verify(state, meta)
        return jax.tree.map(_committed_as, like, state), meta

    def _read_meta(self, step: int) -> dict:
        return dict(self._manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore())).meta)

    def _read_state(self, step: int, abstract: Any) -> Any:
        return self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract))).state

    def restore_as_saved(self, step: int) -> Any:
        """The state of checkpoint `step` as saved, nested dicts of arrays, without a template
        (a transfer source's weights, whatever its optimizer). Not checked against its digest,
        which is defined over the run's own state structure."""
        self.wait()
        with _orbax_errors_quiet():
            saved = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
        entries = saved.meta.get(packing.LAYOUT)
        return saved.state if entries is None else packing.unpack_saved(saved.state["buffers"],
                                                                        entries)

    def restore_latest(self, like: Any) -> tuple[int, Any, dict] | None:
        """(step, state, meta) of the newest checkpoint that restores and verifies, falling
        back past bad ones with a one-line warning each (they are moved aside to
        `<step>.unusable`, kept for inspection); None when there is none at all."""
        failures = []
        for step in reversed(self.all_steps()):
            try:
                with _orbax_errors_quiet():
                    state, meta = self.restore(step, like)
            except Exception as error:  # any unreadable checkpoint: try the one before
                failures.append((step, _one_line(error)))
                continue
            self._set_aside([s for s, _ in failures])
            return step, state, meta
        if failures:
            raise NoUsableCheckpoint(
                f"no usable checkpoint in {self.directory}: "
                f"{'; '.join(f'{s} ({why})' for s, why in failures)}; move the folder away to "
                "train from the start")
        return None

    def _set_aside(self, steps: list[int]) -> None:
        if steps:  # by process 0 of a multi-host job, the others waiting to reload after it
            parallel.primary_only(lambda: self._move_aside(steps), "set checkpoints aside")
            self._manager.reload()

    def _move_aside(self, steps: list[int]) -> None:
        for step in steps:
            log.warning("checkpoint %d in %s is unusable; resuming from an earlier one (it is "
                        "kept as %d.unusable)", step, self.directory, step)
            target = self.directory / f"{step}.unusable"
            while target.exists():
                target = target.with_name(target.name + "_")
            (self.directory / str(step)).rename(target)

    def close(self) -> None:
        """Waits for the save in the background, then closes; a save that fails only now raises
        CheckpointWriteError."""
        self.wait()
        try:
            with _orbax_errors_quiet():
                self._manager.close()
        except Exception:
            # Orbax raises a failed save's error again here; the save has reported it already.
            if not self._failed_save:
                raise
