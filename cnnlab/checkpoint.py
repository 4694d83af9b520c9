"""Orbax checkpoints of the train state plus a small JSON of run bookkeeping, verified on restore.

Orbax writes into a temporary folder and renames it when complete, so a run killed mid-save
leaves the previous checkpoint as the latest. What Orbax cannot see (bytes flipped on disk, a
file truncated after the fact) a SHA-256 of the state, saved in the metadata, catches: a bad
checkpoint is reported in one line and the previous one is used.
"""

import hashlib
import logging
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from cnnlab.errors import ConfigError

log = logging.getLogger(__name__)
DIGEST = "state_sha256"


class NoUsableCheckpoint(ConfigError):
    """Checkpoints exist but none can be restored: the run says so rather than start over."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, unwritable folder): training stops."""


def state_digest(state: Any) -> str:
    """SHA-256 over the state's leaves (dtype, shape and bytes), in tree order."""
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(jax.device_get(state)):
        array = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0][:200]}" if lines else type(error).__name__


class Checkpointer:
    """Saves `(state, meta)` under `directory/<step>`; the newest usable one is resumed."""

    def __init__(self, directory: Path, keep: int | None) -> None:
        # keep=None keeps every checkpoint (snapshot ensembles need all of them).
        self.directory = Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict) -> None:
        meta = {**meta, DIGEST: state_digest(state)}
        try:
            self._manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
            self._manager.wait_until_finished()
        except Exception as error:  # Orbax wraps OSError (ENOSPC, EACCES) in its own types
            raise CheckpointWriteError(
                f"could not save checkpoint {step} in {self.directory}: {_one_line(error)}"
            ) from None

    def restore(self, step: int, like: Any) -> tuple[Any, dict]:
        """Restore into the structure, shapes, dtypes and shardings of `like`, verified."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        meta = dict(restored.meta)
        expected = meta.pop(DIGEST, None)
        if expected is not None and state_digest(restored.state) != expected:
            raise ValueError("its contents do not match the checksum saved with it")
        return restored.state, meta

    def restore_latest(self, like: Any) -> tuple[int, Any, dict] | None:
        """(step, state, meta) of the newest checkpoint that restores and verifies, falling
        back past bad ones with a one-line warning each (they are moved aside to
        `<step>.unusable`, kept for inspection); None when there is none at all."""
        failures = []
        # Orbax reports each array that failed to load through asyncio's logger as well.
        quiet = logging.getLogger("asyncio")
        level, quiet.level = quiet.level, logging.CRITICAL
        try:
            for step in reversed(self.all_steps()):
                try:
                    state, meta = self.restore(step, like)
                except Exception as error:  # any unreadable checkpoint: try the one before
                    failures.append((step, _one_line(error)))
                    continue
                self._set_aside([s for s, _ in failures])
                return step, state, meta
        finally:
            quiet.setLevel(level)
        if failures:
            raise NoUsableCheckpoint(
                f"no usable checkpoint in {self.directory}: "
                f"{'; '.join(f'{s} ({why})' for s, why in failures)}; move the folder away to "
                "train from the start")
        return None

    def _set_aside(self, steps: list[int]) -> None:
        for step in steps:
            log.warning("checkpoint %d in %s is unusable; resuming from an earlier one (it is "
                        "kept as %d.unusable)", step, self.directory, step)
            target = self.directory / f"{step}.unusable"
            while target.exists():
                target = target.with_name(target.name + "_")
            (self.directory / str(step)).rename(target)
        if steps:
            self._manager.reload()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
