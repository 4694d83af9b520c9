"""Where metrics go: `metrics.jsonl` and `summary.json` in the run directory, W&B and
TensorBoard event files.

The local files are the source of truth (offline tools such as `cnnlab compare` read them); W&B
and TensorBoard mirror them. W&B defaults to offline mode, which needs neither an API key nor a
network; TensorBoard's event files (`logger.tensorboard`, cnnlab/runs/tensorboard.py) show in
`tensorboard --logdir` without any account.
"""

import logging
import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from cnnlab.errors import require
from cnnlab.runs import tensorboard
from cnnlab.runs.rundir import RunDir

log = logging.getLogger(__name__)

# Keys whose W&B summary is the run's own (median throughput, total time), not the last logged.
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


class RunTracker:
    """Appends one JSON object per logging event and mirrors it to W&B and TensorBoard."""

    def __init__(self, run_dir: RunDir, config: dict, logger: DictConfig, group: str | None,
                 resume_step: int | None, tags: list[str] | None = None,
                 name: str | None = None) -> None:
        self.run_dir = run_dir
        self.logger = logger
        run_dir.path.mkdir(parents=True, exist_ok=True)
        run_dir.drop_metrics_after(resume_step or 0)
        tags = list(dict.fromkeys([*logger.tags, *(tags or [])]))
        self._wandb = (self._init_wandb(flatten(config), logger, group, tags,
                                        logger.name or name)
                       if logger.mode != "disabled" else None)
        self._tb = None
        if logger.get("tensorboard"):
            # A resumed run logs the steps after its checkpoint again: hide the earlier start's.
            self._tb = tensorboard.EventWriter(run_dir.path,
                                               purge_step=resume_step + 1 if resume_step else None)
            self._tb.hparams(flatten(config))

    def _init_wandb(self, config: dict, logger: DictConfig, group: str | None,
                    tags: list[str], name: str | None) -> Any:
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        run = wandb.init(
            project=logger.project,
            entity=logger.entity,
            group=group,
            tags=tags,
            name=name,
            job_type=logger.job_type,
            config=config,
            dir=str(self.run_dir.path),
            mode=logger.mode,
            id=self.run_dir.wandb_id(secrets.token_hex(4)),
            resume="allow",
            settings=wandb.Settings(console=logger.console,
                                    x_disable_stats=not logger.system_metrics),
        )
        # W&B's summary would default to a metric's last logged value; for these keys the run's
        # summary says something else (median throughput, total time), so only it sets them.
        for key in SUMMARY_OWNED_KEYS:
            run.define_metric(key, summary="none")
        return run

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run_dir.append_metrics(step, metrics)
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)
        if self._tb is not None:
            self._tb.scalars(step, metrics)

    def write_summary(self, summary: dict[str, Any]) -> None:
        clean = self.run_dir.write_summary(summary)
        if self._wandb is not None:
            self._wandb.summary.update(clean)

    def log_image(self, step: int, key: str, path: Path) -> None:
        """An image file (e.g. the run's error curves) as a W&B media panel and a TensorBoard
        image."""
        if self._tb is not None:
            self._tb.image(step, key, path)
        if self._wandb is not None:
            import wandb

            self._wandb.log({key: wandb.Image(str(path))}, step=step)

    def log_table(self, step: int, key: str, columns: Sequence[str],
                  rows: Sequence[Sequence[Any]]) -> None:
        """A table (e.g. per-class errors) as a W&B Table panel and TensorBoard text."""
        if self._tb is not None:
            self._tb.table(step, key, columns, rows)
        if self._wandb is not None:
            import wandb

            self._wandb.log({key: wandb.Table(columns=list(columns), data=[list(r) for r in rows])},
                            step=step)

    def log_histograms(self, step: int, values: dict[str, Any]) -> None:
        """Arrays as W&B and TensorBoard histograms (not in metrics.jsonl, which holds the
        scalars)."""
        if self._tb is not None:
            self._tb.histograms(step, values)
        if self._wandb is not None and values:
            import wandb

            self._wandb.log({key: wandb.Histogram(array) for key, array in values.items()},
                            step=step)

    def log_artifacts(self, config: Path, checkpoint: Path | None) -> None:
        """The run's config and its latest checkpoint as W&B artifacts (`logger.artifacts`)."""
        if self._wandb is None or not self.logger.artifacts:
            return
        import wandb

        run_id = self._wandb.id
        artifact = wandb.Artifact(f"config-{run_id}", type="config")
        artifact.add_file(str(config))
        self._wandb.log_artifact(artifact)
        if checkpoint is not None:
            artifact = wandb.Artifact(f"model-{run_id}", type="model",
                                      metadata={"step": int(checkpoint.name)})
            artifact.add_dir(str(checkpoint))
            self._wandb.log_artifact(artifact, aliases=["latest", f"step-{checkpoint.name}"])

    def finish(self, status: str = "finished", step: int = 0) -> None:
        """Close the W&B run (failed unless `status` is finished) and the event file, whose
        HParams session ends only when the run has (finished or diverged): TensorBoard keeps a
        run's first session end, and a failed or interrupted run may be resumed."""
        failed = status != "finished"
        if self._tb is not None:
            if status in ("finished", "diverged"):
                self._tb.end(step, failed)
            self._tb.close()
            self._tb = None
        if self._wandb is None:
            return
        offline = self._wandb.settings.mode == "offline" or self.logger.mode == "offline"
        folder = Path(self._wandb.dir).parent  # wandb/offline-run-DATE-ID
        self._wandb.finish(exit_code=1 if failed else 0)
        self._wandb = None
        if offline:
            log.info("W&B run saved offline; upload it with: wandb sync %s", folder)


# W&B's own modes: offline needs neither an account nor a network.
LOGGER_MODES = ("online", "offline", "disabled")


# W&B's console capture: wrap writes what the process prints into the run's output.log.
CONSOLE_MODES = ("wrap", "off")


def validate(logger: DictConfig) -> None:
    require(logger.mode in LOGGER_MODES,
            f"logger.mode='{logger.mode}'; valid choices: {', '.join(LOGGER_MODES)}")
    require(logger.console in CONSOLE_MODES,
            f"logger.console='{logger.console}'; valid choices: {', '.join(CONSOLE_MODES)}")
    tensorboard.require_available(bool(logger.get("tensorboard")), "logger.tensorboard=false")
