"""Where a visualisation goes: PNGs and their numbers in RUN_DIR/viz/, the run's W&B run and
its TensorBoard event files.

The PNGs are logged as images to the run's own W&B run, resumed by the id the run keeps in
wandb_id.txt (offline by default: a new offline-run-* folder of the same id, which `wandb sync`
merges into the run).
"""

import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from cnnlab.runs import tensorboard
from cnnlab.runs.rundir import RunDir

log = logging.getLogger(__name__)


class Output:
    """Writes one kind's files into RUN_DIR/viz/ and remembers the PNGs."""

    def __init__(self, run_dir: Path, kind: str, dpi: int = 100) -> None:
        self.folder = Path(run_dir) / "viz"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.kind = kind
        self.dpi = dpi
        self.written: list[Path] = []

    def path(self, name: str, suffix: str) -> Path:
        return self.folder / f"{name}{suffix}"

    def figure(self, fig: Any, name: str | None = None) -> Path:
        """Save a matplotlib figure as NAME.png (default: the kind's name) and close it."""
        import matplotlib.pyplot as plt

        path = self.path(name or self.kind, ".png")
        fig.savefig(path, dpi=self.dpi, bbox_inches="tight")
        plt.close(fig)
        self.written.append(path)
        return path

    def arrays(self, name: str | None = None, **arrays: Any) -> Path:
        path = self.path(name or self.kind, ".npz")
        np.savez_compressed(path, **{k: np.asarray(v) for k, v in arrays.items()})
        self.written.append(path)
        return path

    def json(self, record: dict[str, Any], name: str | None = None) -> Path:
        path = self.path(name or self.kind, ".json")
        # NumPy and JAX values (scalars, arrays) as plain JSON numbers and lists.
        path.write_text(json.dumps(record, indent=2, default=lambda v: np.asarray(v).tolist())
                        + "\n")
        self.written.append(path)
        return path

    @property
    def pngs(self) -> list[Path]:
        return [p for p in self.written if p.suffix == ".png"]


def wandb_mode(choice: str, logger: DictConfig) -> str:
    """`wandb=run`: the run's own logger.mode; otherwise the choice (offline, disabled)."""
    return str(logger.mode) if choice == "run" else choice


def log_images(run_dir: Path, logger: DictConfig, mode: str, kind: str,
               pngs: list[Path]) -> Path | None:
    """Log the PNGs as `viz/<kind>/<name>` images of the run's W&B run; the offline folder."""
    if mode == "disabled" or not pngs:
        return None
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    run = wandb.init(project=logger.project, entity=logger.entity, dir=str(run_dir), mode=mode,
                     id=RunDir(run_dir).wandb_id(secrets.token_hex(4)), resume="allow",
                     settings=wandb.Settings(console="off", x_disable_stats=True))
    run.log({f"viz/{kind}/{p.stem}": wandb.Image(str(p)) for p in pngs})
    folder = Path(run.dir).parent
    run.finish()
    return folder


def tensorboard_images(run_dir: Path, logger: DictConfig, kind: str, pngs: list[Path]) -> None:
    """The PNGs as TensorBoard images `viz/<kind>/<name>` at the run's last step, in an event
    file of their own in the run directory, when the run writes event files
    (`logger.tensorboard` of its config)."""
    if not logger.get("tensorboard") or not pngs:
        return
    step = int((RunDir(run_dir).read_summary() or {}).get("final_step") or 0)
    writer = tensorboard.EventWriter(Path(run_dir))
    try:
        for png in pngs:
            writer.image(step, f"viz/{kind}/{png.stem}", png)
    finally:
        writer.close()
