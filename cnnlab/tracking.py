"""Where metrics go: `metrics.jsonl` and `summary.json` in the run directory, and W&B.

The local files are the source of truth (offline tools such as `cnnlab compare` read them); W&B
mirrors them. W&B defaults to offline mode, which needs neither an API key nor a network.
"""

import json
import math
import os
import secrets
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
WANDB_ID_FILE = "wandb_id.txt"
SUMMARY_OWNED_KEYS = ("images_per_sec", "wall_time")


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """`{"model": {"depth": 20}}` -> `{"model.depth": 20}`: W&B's run filters and
    parallel-coordinates panels take one column per leaf."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep the fact that it diverged readable
    return value


class RunTracker:
    """Appends one JSON object per logging event and mirrors it to W&B."""

    def __init__(self, run_dir: Path, config: dict, logger: DictConfig, group: str | None,
                 resume_step: int | None, tags: list[str] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / METRICS_FILE
        self._drop_events_after(resume_step or 0)
        tags = list(dict.fromkeys([*logger.tags, *(tags or [])]))
        self._wandb = (self._init_wandb(flatten(config), logger, group, tags)
                       if logger.mode != "disabled" else None)

    def _drop_events_after(self, step: int) -> None:
        """On resume, forget events past the checkpoint: they are recomputed identically."""
        if not self.metrics_path.exists():
            return
        kept = [
            line for line in self.metrics_path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= step
        ]
        self.metrics_path.write_text("".join(f"{line}\n" for line in kept))

    def _init_wandb(self, config: dict, logger: DictConfig, group: str | None,
                    tags: list[str]) -> Any:
        import wandb

        id_path = self.run_dir / WANDB_ID_FILE
        if not id_path.exists():
            id_path.write_text(secrets.token_hex(4))
        os.environ.setdefault("WANDB_SILENT", "true")
        run = wandb.init(
            project=logger.project,
            entity=logger.entity,
            group=group,
            tags=tags,
            name=logger.name,
            config=config,
            dir=str(self.run_dir),
            mode=logger.mode,
            id=id_path.read_text().strip(),
            resume="allow",
            settings=wandb.Settings(console="off", x_disable_stats=True),
        )
        # W&B's summary would default to a metric's last logged value; for these keys the run's
        # summary says something else (median throughput, total time), so only it sets them.
        for key in SUMMARY_OWNED_KEYS:
            run.define_metric(key, summary="none")
        return run

    @property
    def wandb_dir(self) -> str | None:
        return None if self._wandb is None else self._wandb.dir

    def log(self, step: int, metrics: dict[str, float]) -> None:
        event = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(event) + "\n")
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def write_summary(self, summary: dict[str, Any]) -> None:
        clean = write_summary(self.run_dir, summary)
        if self._wandb is not None:
            self._wandb.summary.update(clean)

    def log_image(self, step: int, key: str, path: Path) -> None:
        """An image file (e.g. the run's error curves) as a W&B media panel."""
        if self._wandb is not None:
            import wandb

            self._wandb.log({key: wandb.Image(str(path))}, step=step)

    def finish(self, failed: bool = False) -> None:
        if self._wandb is not None:
            self._wandb.finish(exit_code=1 if failed else 0)
            self._wandb = None


def write_summary(run_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """Write `summary.json` atomically (readers never see half a file); returns what was written."""
    clean = {k: _jsonable(v) for k, v in summary.items()}
    path = Path(run_dir) / SUMMARY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(clean, indent=2) + "\n")
    tmp.replace(path)
    return clean


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / SUMMARY_FILE
    return json.loads(path.read_text()) if path.exists() else None
