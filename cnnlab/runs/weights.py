"""Which saved weights of a run a command reads (`final`, `best`, `ema`): `cnnlab viz` and
transfer learning's run sources pick them as `cnnlab eval` does (cnnlab/training/evaluate.py's
WEIGHTS)."""

from pathlib import Path

from omegaconf import DictConfig

from cnnlab.config.load import load_run_config
from cnnlab.errors import ConfigError
from cnnlab.runs.rundir import RunDir
from cnnlab.training.evaluate import WEIGHTS


def check_weights(run_dir: Path, weights: str) -> tuple[DictConfig, int]:
    """A run's config and the newest checkpoint step of its `weights`; ConfigError if none."""
    cfg = load_run_config(run_dir)
    source = WEIGHTS.get(weights)
    if source.averaged and cfg.eval.ema_decay is None:
        raise ConfigError(f"{run_dir} was trained without eval.ema_decay: it has no averaged "
                          "weights")
    found = RunDir(run_dir).checkpoint_steps(source.folder)
    if not found:
        raise ConfigError(f"{run_dir} has no {source.what} (nothing saved in {source.folder}/)")
    return cfg, found[-1]
