"""Which saved weights of a run a command reads (`final`, `best`, `ema`, `snapshots`), and the
averaged weights read out of a saved state: `cnnlab eval` (cnnlab/training/ensemble.py),
`cnnlab viz` and transfer learning's run sources all pick them from this one table."""

import dataclasses
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import optax
from omegaconf import DictConfig

from cnnlab.errors import ConfigError
from cnnlab.registry import Registry
from cnnlab.runs.rundir import BEST, CHECKPOINTS, SNAPSHOTS, RunDir


@dataclasses.dataclass(frozen=True)
class WeightSource:
    """Which weights of a run a command uses: a checkpoint folder, its newest step or every
    step, raw or averaged (EMA) weights."""

    folder: str
    what: str  # for "RUN has no <what>"
    every_step: bool = False
    averaged: bool = False


WEIGHTS: Registry[WeightSource] = Registry("eval.weights")
WEIGHTS.register("final", WeightSource(CHECKPOINTS, "checkpoint"))
WEIGHTS.register("best", WeightSource(BEST, "best checkpoint (kept with dataset.val_size > 0 and "
                                      "early_stopping.keep_best=true)"))
WEIGHTS.register("ema", WeightSource(CHECKPOINTS, "checkpoint", averaged=True))
WEIGHTS.register("snapshots", WeightSource(SNAPSHOTS, "snapshots (schedule=cyclic_cosine)",
                                           every_step=True))


def ema_variables(ema: Any, decay: float) -> tuple[Any, Any]:
    """(params, batch_stats) of the bias-corrected average m_t / (1 - decay^t) that training
    keeps in `TrainState.ema` (cnnlab/training/steps.py's `ema_transform`)."""
    # Before any step (t = 0) the average is empty; return the zeros rather than 0 / 0.
    count = jnp.maximum(ema.count, 1)
    averaged = optax.tree.bias_correction(ema.ema, decay, count)
    return averaged["params"], averaged["batch_stats"]


def check_weights(run_dir: Path, cfg: DictConfig, weights: str) -> int:
    """The newest checkpoint step of the `weights` of the run in `run_dir`, trained with `cfg`
    (its saved config, cnnlab.config.load's `load_run_config`); ConfigError if it has none."""
    source = WEIGHTS.get(weights)
    if source.averaged and cfg.eval.ema_decay is None:
        raise ConfigError(f"{run_dir} was trained without eval.ema_decay: it has no averaged "
                          "weights")
    found = RunDir(run_dir).checkpoint_steps(source.folder)
    if not found:
        raise ConfigError(f"{run_dir} has no {source.what} (nothing saved in {source.folder}/)")
    return found[-1]
