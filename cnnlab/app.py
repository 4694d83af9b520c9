"""The Hydra application behind `cnnlab train`: one call per run (per job of a multirun)."""

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from cnnlab.config import CONF_DIR, resolve_presets, validate_for_training
from cnnlab.data import DatasetUnavailableError
from cnnlab.errors import ConfigError


def sweep_group() -> str | None:
    """Runs of one multirun share a W&B group named after the sweep directory."""
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    return "sweep-" + "_".join(Path(hc.sweep.dir).parts[-2:])


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def train_task(cfg: DictConfig) -> float | None:
    """Train one configuration; returns the final test error (for sweepers that optimize it)."""
    from cnnlab.train import train

    # Orbax/TFDS (through absl) and JAX log routine steps at INFO; keep the terminal
    # for the progress bar and our own messages.
    for noisy in ("absl", "jax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        resolve_presets(cfg)
        validate_for_training(cfg)
        summary = train(cfg, run_dir, group=cfg.logger.group or sweep_group())
    except (ConfigError, DatasetUnavailableError) as e:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # Hydra records the failed job and the sweep goes on
        print(f"cnnlab: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    error = summary.get("final/test/error")
    if error is not None:
        print(f"{summary['model']} on {summary['dataset']}: test error {error:.2f}% "
              f"(accuracy {100 - error:.2f}%) at step {summary['final_step']}, "
              f"{summary['wall_time']:.0f} s; run directory: {run_dir}")
    return error


def run_train_app() -> None:
    train_task()
