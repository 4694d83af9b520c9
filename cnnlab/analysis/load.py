"""Loading: run directories and W&B groups -> Run records, each with its status.

Everything comes from the files each run wrote (cnnlab/runs/tracking.py): `.hydra/config.yaml` and
`.hydra/overrides.yaml`, `metrics.jsonl`, `summary.json`; `wandb:ENTITY/PROJECT/GROUP` reads the
same from W&B (online).
"""

import dataclasses
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cnnlab.errors import ConfigError
from cnnlab.runs.rundir import CONFIG, RunDir, find_run_dirs, floats
from cnnlab.runs.tracking import flatten

WANDB_PREFIX = "wandb:"
NO_SUMMARY = "no summary.json (the job crashed before training started)"

# Only finished runs are averaged and drawn. The others are listed: diverged and failed runs
# failed; interrupted and running ones (a kill leaves "running" behind) are incomplete.
FINISHED = "finished"


@dataclasses.dataclass(frozen=True)
class Run:
    """One run as its files describe it."""

    name: str  # for tables: the run dir relative to the compared path when possible
    source: str  # unique id (resolved path or W&B path), to drop runs given twice
    config: dict[str, Any]  # flattened resolved config, all keys
    overrides: tuple[str, ...] | None  # the job's command-line overrides; None: unknown
    summary: dict[str, Any]
    metrics: tuple[dict[str, Any], ...]  # events by step, non-finite strings made floats
    status: str
    reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.status == FINISHED

    @property
    def seed(self) -> Any:
        return self.summary.get("seed", self.config.get("seed"))


def _read_config(path: Path) -> dict[str, Any]:
    # Hydra saves the config unresolved (`name: plain${.depth}`); resolve like the run did.
    # An interpolation that only resolves inside Hydra (${hydra:...}) keeps its raw text.
    try:
        cfg = OmegaConf.load(path)
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: unreadable config ({str(e).splitlines()[0]})") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path}: not a config (a {type(cfg).__name__})")
    try:
        return flatten(OmegaConf.to_container(cfg, resolve=True))
    except OmegaConfBaseException:
        return flatten(OmegaConf.to_container(cfg, resolve=False))


# A kill leaves a summary that still says "running".
_RUNNING = "no final summary: still running, or killed"


def run_status(summary: dict[str, Any] | None) -> tuple[str, str | None]:
    """(status, reason) of a run; a missing summary.json means the job never trained."""
    if summary is None:
        return "failed", NO_SUMMARY
    status = str(summary.get("status", "failed"))
    if status == FINISHED:
        return status, None
    return status, summary.get("failure") or (_RUNNING if status == "running" else None)


def load_run(run_dir: Path, name: str | None = None) -> Run:
    """The Run record of one run directory (it must hold .hydra/config.yaml)."""
    files = RunDir(run_dir)
    metrics = files.read_metrics()
    summary = files.read_summary()
    status, reason = run_status(summary)
    return Run(
        name=name or str(run_dir), source=str(Path(run_dir).resolve()),
        config=_read_config(files / CONFIG), overrides=files.overrides(),
        summary=summary or {}, metrics=tuple(metrics), status=status, reason=reason,
    )


def _load_path(path: Path, relative_names: bool) -> list[Run]:
    if not path.exists():
        raise ConfigError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise ConfigError(f"{path} is not a directory; compare takes multirun directories, run "
                          f"directories or {WANDB_PREFIX}ENTITY/PROJECT/GROUP")
    run_dirs = find_run_dirs(path)
    if not run_dirs:
        raise ConfigError(f"no runs in {path}: no directory there holds {CONFIG}")

    def name(run_dir: Path) -> str:
        if run_dir == path:
            return str(path)
        relative = run_dir.relative_to(path)
        return str(relative if relative_names else path / relative)

    return [load_run(d, name(d)) for d in run_dirs]


def load_runs(paths: Sequence[str]) -> list[Run]:
    """The runs under each PATH, in order, each once."""
    if not paths:
        raise ConfigError("compare needs at least one multirun directory, run directory or "
                          f"{WANDB_PREFIX}ENTITY/PROJECT/GROUP")
    runs: dict[str, Run] = {}
    for spec in paths:
        loaded = (load_wandb_runs(spec) if spec.startswith(WANDB_PREFIX)
                  else _load_path(Path(spec), relative_names=len(paths) == 1))
        for run in loaded:
            runs.setdefault(run.source, run)
    return list(runs.values())


# W&B's run states, onto summary.json's statuses (for runs whose summary has none).
_WANDB_STATES = {"finished": "finished", "crashed": "failed", "failed": "failed",
                 "killed": "interrupted", "running": "running"}


def _wandb_run(remote: Any, project: str) -> Run:
    """A W&B public-API run as the Run its local files would give (no overrides in W&B)."""
    summary = floats({k: v for k, v in dict(remote.summary_metrics).items()
                       if not k.startswith("_")})
    summary.setdefault("status", _WANDB_STATES.get(remote.state, "failed"))
    metrics = []
    for row in remote.scan_history():
        if row.get("_step") is not None:
            values = {k: v for k, v in row.items() if not k.startswith("_") and v is not None}
            metrics.append({**floats(values), "step": int(row["_step"])})
    status, reason = run_status(summary)
    return Run(name=remote.name or remote.id, source=f"{WANDB_PREFIX}{project}/{remote.id}",
               config=flatten(dict(remote.config)), overrides=None, summary=summary,
               metrics=tuple(metrics), status=status, reason=reason)


def load_wandb_runs(spec: str) -> list[Run]:
    """The runs of `wandb:ENTITY/PROJECT/GROUP`, read online (needs `wandb login`)."""
    parts = spec.removeprefix(WANDB_PREFIX).split("/")
    if len(parts) != 3 or not all(parts):
        raise ConfigError(f"'{spec}': expected {WANDB_PREFIX}ENTITY/PROJECT/GROUP")
    entity, project, group = parts
    try:
        import wandb

        remote = wandb.Api(timeout=30).runs(f"{entity}/{project}", filters={"group": group})
        runs = [_wandb_run(r, f"{entity}/{project}") for r in remote]
    except Exception as e:  # no API key, no network, no such project: one line all the same
        lines = str(e).strip().splitlines() or [type(e).__name__]
        raise ConfigError(f"cannot read W&B group {entity}/{project}/{group}: {lines[0]}") from None
    if not runs:
        raise ConfigError(f"W&B project {entity}/{project} has no runs in group {group}")
    return runs


def summary_numbers(runs: Iterable[Run], key: str) -> list[float]:
    """The runs' numbers under a summary.json key; runs without one (or with a bool) left out."""
    values = (run.summary.get(key) for run in runs)
    return [float(v) for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
