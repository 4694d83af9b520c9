"""Orbax checkpoints of the train state plus a small JSON of run bookkeeping."""

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Saves `(state, meta)` under `directory/<step>`; the newest complete one is resumed.

    Orbax writes into a temporary folder and renames it when complete, so a run killed mid-save
    leaves the previous checkpoint as the latest.
    """

    def __init__(self, directory: Path, keep: int | None) -> None:
        # keep=None keeps every checkpoint (snapshot ensembles need all of them).
        self._manager = ocp.CheckpointManager(
            Path(directory).absolute(),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict) -> None:
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )

    def restore(self, step: int, like: Any) -> tuple[Any, dict]:
        """Restore into the structure, shapes, dtypes and shardings of `like`."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
            ),
        )
        return restored.state, dict(restored.meta)

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
