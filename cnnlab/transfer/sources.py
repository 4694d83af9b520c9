"""Reading a transfer source into one flat dict of arrays keyed as cnnlab names its variables:
`params/<layer>/.../kernel`, `batch_stats/<layer>/.../mean` (flax.traverse_util's '/' paths).

Sources: an earlier cnnlab run directory (its final, best or EMA weights) or published PyTorch
weights on disk (cnnlab/transfer/torchvision.py converts torchvision's names and layouts).
"""

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import optax
from flax.traverse_util import flatten_dict
from omegaconf import DictConfig

from cnnlab.errors import ConfigError
from cnnlab.rundir import is_run_dir

log = logging.getLogger(__name__)

WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".safetensors")


@dataclasses.dataclass(frozen=True)
class Source:
    """What a source holds, and a line saying where it came from."""

    arrays: dict[str, np.ndarray]
    description: str


def _flat(tree: Any) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in flatten_dict(tree, sep="/").items()}


def _restore_raw(folder: Path, step: int) -> dict[str, Any]:
    """A checkpoint's state as saved (nested dicts of arrays), without a template: the source's
    optimizer and model options need not be rebuilt to read its weights."""
    import orbax.checkpoint as ocp

    from cnnlab.checkpoint import _orbax_errors_quiet

    manager = ocp.CheckpointManager(folder)
    try:
        with _orbax_errors_quiet():
            return manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore())).state
    finally:
        manager.close()


def _run_variables(state: dict[str, Any], averaged: bool, decay: float | None) -> dict:
    if not averaged:
        return {"params": state["params"], "batch_stats": state.get("batch_stats") or {}}
    from cnnlab.steps import ema_variables

    ema = optax.EmaState(count=np.asarray(state["ema"]["count"]), ema=state["ema"]["ema"])
    params, batch_stats = ema_variables(ema, decay)
    return {"params": params, "batch_stats": batch_stats}


def read_run(run_dir: Path, weights: str) -> Source:
    """The `weights` (final, best, ema) of a cnnlab run, as `cnnlab eval` would pick them."""
    from cnnlab.evaluate import WEIGHTS, check_weights

    cfg, step = check_weights(run_dir, weights)
    source = WEIGHTS.get(weights)
    try:
        state = _restore_raw(run_dir / source.folder, step)
    except Exception as error:  # an unreadable checkpoint: say which, in one line
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"transfer.source={run_dir}: its checkpoint {step} is unreadable "
                          f"({first[:200]})") from None
    variables = _run_variables(state, source.averaged, cfg.eval.ema_decay)
    return Source(_flat(variables), f"{cfg.model.name} run {run_dir} ({weights} weights, "
                                    f"step {step:,})")


def read_file(path: Path, cfg: DictConfig) -> Source:
    """Published PyTorch weights, converted into `cfg`'s model (cnnlab/transfer/torchvision.py)."""
    from cnnlab.transfer import torchvision

    state_dict = torchvision.read_weights_file(path)
    arrays = torchvision.convert(state_dict, cfg.model, cfg.norm.name)
    return Source(arrays, f"torchvision weights {path} as {cfg.model.name}")


def read_source(cfg: DictConfig) -> Source:
    """The source `cfg.transfer` names; a one-line ConfigError if it is not usable."""
    # Absolute: Orbax refuses relative checkpoint paths (a study names its source relative to
    # where it is launched, and Hydra does not change the working directory).
    path = Path(cfg.transfer.source).expanduser().absolute()
    if not path.exists():
        raise ConfigError(f"transfer.source={path} does not exist; give a cnnlab run directory "
                          f"or a {'/'.join(WEIGHT_FILE_SUFFIXES)} weights file")
    if path.is_dir():
        if not is_run_dir(path):
            raise ConfigError(f"transfer.source={path} is a folder but not a cnnlab run "
                              "directory (no .hydra/config.yaml)")
        return read_run(path, cfg.transfer.weights)
    if path.suffix not in WEIGHT_FILE_SUFFIXES:
        raise ConfigError(f"transfer.source={path}: unknown kind of file; valid: a cnnlab run "
                          f"directory or a {', '.join(WEIGHT_FILE_SUFFIXES)} file")
    return read_file(path, cfg)
