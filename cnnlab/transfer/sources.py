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

from cnnlab.config.load import load_run_config
from cnnlab.data.preprocess import PreprocessStats
from cnnlab.errors import ConfigError
from cnnlab.runs.rundir import is_run_dir
from cnnlab.runs.weights import WEIGHTS, check_weights, ema_variables
from cnnlab.transfer import torchvision
from cnnlab.transfer.adapt import ADAPTERS, adapt_stats, refusal
from cnnlab.transfer.plan import MODES

log = logging.getLogger(__name__)

WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".safetensors")
# torchvision's published models were trained on images normalized with ImageNet's statistics
# (torchvision.transforms.Normalize in every recipe of its model zoo).
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


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
    # Imported here: Orbax is slow to import, and validating a config (cnnlab.config.load
    # imports this package) should not pay for it.
    from cnnlab.runs.checkpoint import Checkpointer

    checkpoints = Checkpointer(folder, keep=None)
    try:
        return checkpoints.restore_as_saved(step)
    finally:
        checkpoints.close()


def _run_variables(state: dict[str, Any], averaged: bool, decay: float | None) -> dict:
    if not averaged:
        return {"params": state["params"], "batch_stats": state.get("batch_stats") or {}}
    ema = optax.EmaState(count=np.asarray(state["ema"]["count"]), ema=state["ema"]["ema"])
    params, batch_stats = ema_variables(ema, decay)
    return {"params": params, "batch_stats": batch_stats}


def read_run(run_dir: Path, weights: str) -> Source:
    """The `weights` (final, best, ema) of a cnnlab run, as `cnnlab eval` would pick them."""
    cfg = load_run_config(run_dir)
    step = check_weights(run_dir, cfg, weights)
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
    state_dict = torchvision.read_weights_file(path)
    arrays = torchvision.convert(state_dict, cfg.model, cfg.norm.name)
    return Source(arrays, f"torchvision weights {path} as {cfg.model.name}")


def source_path(cfg: DictConfig) -> Path:
    # Absolute: Orbax refuses relative checkpoint paths (a study names its source relative to
    # where it is launched, and Hydra does not change the working directory).
    return Path(cfg.transfer.source).expanduser().absolute()


def source_preprocess(cfg: DictConfig) -> PreprocessStats | DictConfig | None:
    """What fixes the preprocessing statistics a transfer run normalizes with
    (`transfer.preprocess=source`), so the source's layers see inputs scaled as they learned
    them; None: the run's own training data's.

    Torchvision weights come with ImageNet's per-channel mean and std (returned as they are); a
    cnnlab run's statistics are its own training data's, so its config is returned and the
    caller (cnnlab/training/build.py) loads that data as the source run did and computes them.
    Either is for the source's channels: `fit_channels` makes them this data's.
    """
    tr = cfg.transfer
    if not MODES.get(tr.mode).needs_source or tr.preprocess == "own":
        return None
    path = source_path(cfg)
    if path.is_file():
        if cfg.preprocess.name != "channel":
            raise ConfigError(f"transfer.preprocess=source with torchvision weights uses "
                              f"ImageNet's per-channel mean and std: it needs preprocess=channel, "
                              f"not {cfg.preprocess.name}; or set transfer.preprocess=own")
        return PreprocessStats(mean=np.asarray(IMAGENET_MEAN, np.float32),
                               std=np.asarray(IMAGENET_STD, np.float32))
    return _run_preprocess(cfg, path)


def fit_channels(cfg: DictConfig, stats: PreprocessStats, channels: int) -> PreprocessStats:
    """The source's statistics for this data's `channels`: as they are when the counts agree,
    else reduced or repeated by `transfer.adapt_input` as the first conv's kernels are
    (cnnlab/transfer/adapt.py), or refused in one line naming that key."""
    fitted = adapt_stats(cfg.transfer.adapt_input, stats, channels,
                         f"transfer.source={cfg.transfer.source}")
    if fitted is not stats:
        log.info("transfer: the source's statistics adapted to %d channel(s): mean %s, std %s",
                 channels, np.round(np.asarray(fitted.mean).reshape(-1)[:channels], 4),
                 None if fitted.std is None else np.round(np.asarray(fitted.std), 4))
    return fitted


def _run_preprocess(cfg: DictConfig, path: Path) -> DictConfig | None:
    """The source run's config, whose training data's statistics the run normalizes with."""
    if not is_run_dir(path):
        return None  # read_source says what is wrong with it
    source_cfg = load_run_config(path)
    if source_cfg.preprocess.name != cfg.preprocess.name:
        raise ConfigError(f"transfer.preprocess=source: the source was trained with "
                          f"preprocess={source_cfg.preprocess.name}; set preprocess="
                          f"{source_cfg.preprocess.name} or transfer.preprocess=own")
    log.info("transfer: preprocessing with the source's statistics (%s, of %s)",
             source_cfg.preprocess.name, source_cfg.dataset.name)
    return source_cfg


def check_exists(cfg: DictConfig) -> None:
    """A one-line ConfigError if `transfer.source` is set and names nothing, or a folder that is
    not a cnnlab run (cheap checks, made before the data is read)."""
    if cfg.transfer.source is None:
        return
    path = source_path(cfg)
    if not path.exists():
        raise ConfigError(f"transfer.source={cfg.transfer.source} does not exist; give a cnnlab "
                          f"run directory or a {'/'.join(WEIGHT_FILE_SUFFIXES)} weights file")
    if path.is_dir() and not is_run_dir(path):
        raise ConfigError(f"transfer.source={path} is a folder but not a cnnlab run "
                          "directory (no .hydra/config.yaml)")
    _check_channels(cfg, path)


def _source_channels(path: Path) -> int | None:
    """The channels of the images the source was trained on: torchvision's are RGB (its
    converter builds every model for 3); a run's are its dataset's (None: undeclared)."""
    if path.is_file():
        return 3
    shape = load_run_config(path).dataset.image_shape
    return None if shape is None else int(shape[-1])


def _check_channels(cfg: DictConfig, path: Path) -> None:
    """A channel mismatch under transfer.adapt_input=strict, said before the data is read
    (datasets that do not declare their shape are caught when the weights load)."""
    shape = cfg.dataset.image_shape
    if ADAPTERS.get(cfg.transfer.adapt_input).kernel is not None or shape is None:
        return
    have = _source_channels(path)
    if have is not None and have != shape[-1]:
        raise refusal(f"transfer.source={cfg.transfer.source}", have, int(shape[-1]))


def read_source(cfg: DictConfig) -> Source:
    """The source `cfg.transfer` names; a one-line ConfigError if it is not usable."""
    check_exists(cfg)
    path = source_path(cfg)
    if path.is_dir():
        return read_run(path, cfg.transfer.weights)
    if path.suffix not in WEIGHT_FILE_SUFFIXES:
        raise ConfigError(f"transfer.source={path}: unknown kind of file; valid: a cnnlab run "
                          f"directory or a {', '.join(WEIGHT_FILE_SUFFIXES)} file")
    return read_file(path, cfg)
