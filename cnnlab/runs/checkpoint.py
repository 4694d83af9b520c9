"""Orbax checkpoints of the train state plus a small JSON of run bookkeeping, verified on restore.

Orbax writes into a temporary folder and renames it when complete, so a run killed mid-save
leaves the previous checkpoint as the latest. What Orbax cannot see (bytes flipped on disk, a
file truncated after the fact) a SHA-256 of the state, saved in the metadata, catches: a bad
checkpoint is reported in one line and the previous one is used.
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
import numpy as np
import orbax.checkpoint as ocp

from cnnlab import parallel
from cnnlab.errors import ConfigError

log = logging.getLogger(__name__)
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
    """SHA-256 over the state's leaves (dtype, shape and bytes), in tree order."""
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(jax.device_get(state)):
        array = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


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


class Checkpointer:
    """Saves `(state, meta)` under `directory/<step>`; the newest usable one is resumed."""

    def __init__(self, directory: Path, keep: int | None) -> None:
        # keep=None keeps every checkpoint (snapshot ensembles need all of them).
        self.directory = Path(directory).absolute()
        self._failed_save = False
        _ignore_orbax_teardown_errors()
        self._manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict) -> None:
        meta = {**meta, DIGEST: state_digest(state)}
        try:
            with _orbax_errors_quiet(restore=False):
                self._manager.save(step, args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
                self._manager.wait_until_finished()
        except Exception as error:  # Orbax wraps OSError (ENOSPC, EACCES) in its own types
            self._failed_save = True
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

    def restore_as_saved(self, step: int) -> Any:
        """The state of checkpoint `step` as saved, nested dicts of arrays, without a template
        (a transfer source's weights, whatever its optimizer). Not checked against its digest,
        which is defined over the run's own state structure."""
        with _orbax_errors_quiet():
            return self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore())).state

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
        try:
            with _orbax_errors_quiet():
                self._manager.wait_until_finished()
                self._manager.close()
        except Exception:
            # Orbax raises a failed save's error again here; the save has reported it already.
            if not self._failed_save:
                raise
