"""The config schema (typed structured configs) and the checks that run before anything compiles.

Hydra merges `conf/` onto `Config` below, so a wrong type (`train.steps=abc`) or an unknown key
(`train.stepz=1`) fails at composition; `validate` then checks values and registry names.
"""

import dataclasses
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf, open_dict

from cnnlab.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


@dataclasses.dataclass
class DatasetConfig:
    name: str = MISSING
    train_split: str = "train"
    test_split: str = "test"
    image_key: str = "image"
    label_key: str = "label"
    # Known without loading the data: used by `cnnlab summary` and the geometry check.
    image_shape: list[int] | None = None
    num_classes: int | None = None
    data_dir: str | None = None
    download: bool = True
    val_size: int = 0
    val_seed: int = 0
    max_examples: int | None = None
    default_augment: str = "none"
    # Shapes only (ImageNet): `cnnlab summary` uses it, `cnnlab train` refuses it.
    summary_only: bool = False


@dataclasses.dataclass
class InitConfig:
    conv: str = "he_normal"
    dense: str = "he_normal"
    bias: str = "zeros"


@dataclasses.dataclass
class ActivationConfig:
    name: str = "relu"


@dataclasses.dataclass
class NormConfig:
    name: str = "batch"
    momentum: float | None = None
    epsilon: float | None = None


@dataclasses.dataclass
class AugmentConfig:
    name: str = "none"
    crop_pad: int = 0
    flip: bool = False


@dataclasses.dataclass
class OptimizerConfig:
    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0


@dataclasses.dataclass
class ScheduleConfig:
    name: str = "constant"
    warmup_steps: int = 0
    milestones: list[float] | None = None
    factor: float = 0.1
    final_factor: float = 0.0


@dataclasses.dataclass
class LoggerConfig:
    mode: str = "offline"
    project: str = "cnnlab"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = dataclasses.field(default_factory=list)
    name: str | None = None


@dataclasses.dataclass
class TrainConfig:
    steps: int = 600
    batch_size: int = 128
    steps_per_call: int = 10
    log_every: int = 50
    eval_every: int = 0
    eval_batch_size: int = 1000
    stop_on_nan: bool = True


@dataclasses.dataclass
class CheckpointConfig:
    enabled: bool = True
    every: int = 500
    keep: int = 2


@dataclasses.dataclass
class SummaryConfig:
    # table: aligned text; json: the same rows and totals for programs.
    format: str = "table"
    # Nesting depth of the rows: 1 lists the top-level layers and blocks, 2 their parts, ...
    depth: int = 1


@dataclasses.dataclass
class Config:
    # A model family's own keys are typed by that family's schema (cnnlab.models).
    model: dict[str, Any] = MISSING
    dataset: DatasetConfig = MISSING
    init: InitConfig = MISSING
    activation: ActivationConfig = MISSING
    norm: NormConfig = MISSING
    augment: AugmentConfig = MISSING
    optimizer: OptimizerConfig = MISSING
    schedule: ScheduleConfig = MISSING
    logger: LoggerConfig = MISSING
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    summary: SummaryConfig = dataclasses.field(default_factory=SummaryConfig)
    seed: int = 0
    progress: bool = True


ConfigStore.instance().store(name="config_schema", node=Config)

LOGGER_MODES = ("online", "offline", "disabled")
SCHEDULES = ("constant", "step", "cosine")
OPTIMIZERS = ("sgd",)
SUMMARY_FORMATS = ("table", "json")


def group_options(group: str) -> list[str]:
    """The option names of a config group, from the YAML files in `conf/<group>/`."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml") if not p.stem.startswith("_"))


def resolve_presets(cfg: DictConfig) -> None:
    """Replace `augment: default` by the preset the dataset names, so logs show what ran."""
    if cfg.augment.name != "default":
        return
    preset = cfg.dataset.default_augment
    if preset not in group_options("augment") or preset == "default":
        raise ConfigError(
            f"dataset.default_augment='{preset}'; valid choices: "
            + ", ".join(o for o in group_options("augment") if o != "default")
        )
    with open_dict(cfg):
        preset_cfg = OmegaConf.load(CONF_DIR / "augment" / f"{preset}.yaml")
        cfg.augment = OmegaConf.merge(OmegaConf.structured(AugmentConfig), preset_cfg)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _positive(cfg: DictConfig, *keys: str) -> None:
    for key in keys:
        value = OmegaConf.select(cfg, key)
        _require(value > 0, f"{key}={value} must be a positive integer")


def _multiple_of_call(cfg: DictConfig, key: str) -> None:
    value, per_call = OmegaConf.select(cfg, key), cfg.train.steps_per_call
    _require(
        value % per_call == 0,
        f"{key}={value} must be a multiple of train.steps_per_call={per_call}",
    )


def validate(cfg: DictConfig) -> None:
    """Check values and names; raises ConfigError with a one-line message naming the choices."""
    # Local import: cnnlab.models pulls in JAX, which the CLI's fast error path should not need.
    from cnnlab import augment, models
    from cnnlab.models import layers

    models.model_options(cfg.model)
    for key, registry in (
        ("init.conv", layers.INITIALIZERS),
        ("init.dense", layers.INITIALIZERS),
        ("init.bias", layers.INITIALIZERS),
        ("activation.name", layers.ACTIVATIONS),
        ("norm.name", layers.NORMS),
    ):
        registry.get(OmegaConf.select(cfg, key))
    augment.validate(cfg.augment)

    _positive(cfg, "train.steps", "train.batch_size", "train.steps_per_call", "train.log_every",
              "train.eval_batch_size", "checkpoint.every", "checkpoint.keep")
    _require(cfg.train.eval_every >= 0, f"train.eval_every={cfg.train.eval_every} must be >= 0")
    for key in ("train.log_every", "train.eval_every", "checkpoint.every"):
        _multiple_of_call(cfg, key)
    _require(cfg.seed >= 0, f"seed={cfg.seed} must be a non-negative integer")
    _require(cfg.dataset.val_size >= 0, f"dataset.val_size={cfg.dataset.val_size} must be >= 0")
    _require(
        cfg.dataset.max_examples is None or cfg.dataset.max_examples > 0,
        f"dataset.max_examples={cfg.dataset.max_examples} must be positive or null",
    )

    opt = cfg.optimizer
    _require(opt.name in OPTIMIZERS,
             f"unknown optimizer '{opt.name}'; valid choices: {', '.join(OPTIMIZERS)}")
    _require(opt.lr > 0, f"optimizer.lr={opt.lr} must be positive")
    _require(0 <= opt.momentum < 1, f"optimizer.momentum={opt.momentum} must be in [0, 1)")
    _require(opt.weight_decay >= 0, f"optimizer.weight_decay={opt.weight_decay} must be >= 0")

    sched = cfg.schedule
    _require(sched.name in SCHEDULES,
             f"unknown schedule '{sched.name}'; valid choices: {', '.join(SCHEDULES)}")
    _require(sched.warmup_steps >= 0, f"schedule.warmup_steps={sched.warmup_steps} must be >= 0")
    if sched.name == "step":
        ms = list(sched.milestones or [])
        _require(
            all(0 < m < 1 for m in ms) and ms == sorted(ms),
            f"schedule.milestones={ms} must be increasing fractions of train.steps in (0, 1)",
        )

    _require(cfg.logger.mode in LOGGER_MODES,
             f"logger.mode='{cfg.logger.mode}'; valid choices: {', '.join(LOGGER_MODES)}")
    _require(cfg.summary.format in SUMMARY_FORMATS,
             f"summary.format='{cfg.summary.format}'; valid choices: {', '.join(SUMMARY_FORMATS)}")
    _require(cfg.summary.depth >= 1, f"summary.depth={cfg.summary.depth} must be >= 1")
    shape = cfg.dataset.image_shape
    _require(shape is None or (len(shape) == 3 and min(shape) > 0),
             f"dataset.image_shape={shape} must be [height, width, channels] or null")
    if shape is not None:
        models.check_geometry(cfg, tuple(shape))


def validate_for_training(cfg: DictConfig) -> None:
    validate(cfg)
    _require(not cfg.dataset.summary_only,
             f"dataset={cfg.dataset.name} describes shapes for `cnnlab summary` only; cnnlab "
             "keeps datasets in device memory, which it does not fit")
