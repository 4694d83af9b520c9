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
    # Used by leaky_relu only.
    negative_slope: float = 0.01


@dataclasses.dataclass
class NormConfig:
    # Each norm takes some of these keys (null: its default); a key it does not take is refused.
    name: str = "batch"
    momentum: float | None = None
    epsilon: float | None = None
    # lrn: window size n, k, alpha, beta (Krizhevsky et al. 2012, section 3.3).
    size: int | None = None
    k: float | None = None
    alpha: float | None = None
    beta: float | None = None
    # group: number of groups G.
    num_groups: int | None = None


@dataclasses.dataclass
class PreprocessConfig:
    # How pixels become the network's input (cnnlab/preprocess.py): channel, mean_image, zca,
    # none; statistics come from the training split after the validation hold-out.
    name: str = "channel"
    # zca only (null otherwise): eps in W = U diag(1 / sqrt(lambda + eps)) U^T, [0, 1] scale.
    epsilon: float | None = None


@dataclasses.dataclass
class AugmentConfig:
    # Each option is off by default; order and definitions: cnnlab/augment.py.
    name: str = "none"
    crop_pad: int = 0
    flip: bool = False
    # RandomResizedCrop (Szegedy et al. 2015): area fraction ~ U[crop_scale], log aspect ratio
    # ~ U[log crop_ratio], resized back to the image size.
    resized_crop: bool = False
    crop_scale: list[float] = dataclasses.field(default_factory=lambda: [0.08, 1.0])
    crop_ratio: list[float] = dataclasses.field(default_factory=lambda: [3 / 4, 4 / 3])
    # torchvision ColorJitter strengths s: factor ~ U[max(0, 1 - s), 1 + s].
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    # AlexNet's PCA lighting: std of alpha (0.1 in Krizhevsky et al. 2012).
    lighting: float = 0.0
    # Cutout (DeVries & Taylor 2017): side of the zeroed square in pixels.
    cutout: int = 0
    # mixup (Zhang et al. 2018): alpha of Beta(alpha, alpha).
    mixup: float = 0.0


@dataclasses.dataclass
class OptimizerConfig:
    # Update rules: cnnlab/optim.py. Each optimizer reads the keys OPTIMIZER_KEYS lists for it;
    # the others must stay null, so that no value in a run's config is silently unused.
    name: str = "sgd"
    lr: float = 0.1
    # sgd, momentum, nesterov: torch.optim.SGD's momentum and nesterov.
    momentum: float | None = None
    nesterov: bool | None = None
    # adam, adamw: Kingma & Ba's beta1, beta2; adam, adamw, adadelta: epsilon.
    b1: float | None = None
    b2: float | None = None
    eps: float | None = None
    # adadelta: Zeiler's decay rate rho.
    rho: float | None = None
    weight_decay: float = 0.0
    # coupled: wd * w added to the gradient (L2); decoupled: lr * wd * w added to the step.
    decay: str = "coupled"
    # Global-norm clipping of the gradient, before anything else; null: off.
    clip_norm: float | None = None


@dataclasses.dataclass
class RegularizationConfig:
    # Penalties added to the optimized objective (not to the logged loss):
    # l1 * sum |w| + (l2 / 2) * sum w^2 over the weights `apply_to` selects.
    l1: float = 0.0
    l2: float = 0.0
    # kernels: conv and dense kernels only; all: every parameter.
    apply_to: str = "kernels"
    # Szegedy et al. 2016: train against (1 - eps) * one_hot + eps / K.
    label_smoothing: float = 0.0


@dataclasses.dataclass
class ScheduleConfig:
    name: str = "constant"
    warmup_steps: int = 0
    milestones: list[float] | None = None
    # step: lr multiplier at each milestone; plateau: at each reduction.
    factor: float = 0.1
    final_factor: float = 0.0
    # cyclic_cosine (snapshot ensembles, Huang et al. 2017): number of cosine cycles.
    cycles: int = 1
    # plateau: reduce when `metric` has not improved by more than `threshold` (absolute) for
    # `patience` evaluations, at most `max_reductions` times.
    metric: str = "val/error"
    patience: int = 5
    threshold: float = 0.0
    max_reductions: int = 3


@dataclasses.dataclass
class EarlyStoppingConfig:
    # Stop when `metric` has not improved for `patience` evaluations (0: never stop early).
    patience: int = 0
    metric: str = "val/error"
    # Keep the checkpoint of the best evaluation of `metric` in <run_dir>/best.
    keep_best: bool = True


@dataclasses.dataclass
class EvalConfig:
    # Evaluation-time options (cnnlab/evaluate.py): averaged weights, test-time augmentation.
    # Exponential moving average of the weights and BN statistics, updated every step and
    # evaluated as `test_ema/...` (Polyak & Juditsky 1992; Kingma & Ba 2015 sec. 7.2, with
    # its bias correction); null: off. E.g. 0.999 averages over about the last 1,000 steps.
    ema_decay: float | None = None
    # Test-time augmentation: none, flip (image + mirror image), ten_crop (4 corners + centre,
    # each also mirrored; Krizhevsky et al. 2012 sec. 4.1); the softmaxes are averaged.
    # During training a value other than none adds `test_tta/...` to each evaluation.
    tta: str = "none"
    # ten_crop windows: null = windows of the image's size cut from the image zero-padded by
    # augment.crop_pad (the training crops' extremes); N = NxN windows of the image itself,
    # scaled back to the image's size.
    crop_size: int | None = None
    # `cnnlab eval` only: which weights each run contributes: final (latest checkpoint), best
    # (<run_dir>/best), ema (the averaged weights of the latest checkpoint) or snapshots (every
    # <run_dir>/snapshots/<step>, one ensemble member each).
    weights: str = "final"
    # `cnnlab eval` only: table (aligned text) or json; output: also write the JSON report to
    # this file (null: do not); batch_size: null = each run's train.eval_batch_size.
    format: str = "table"
    output: str | None = None
    batch_size: int | None = None


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
    # With stop_on_nan, a mean training loss above this also counts as diverged (null: only
    # NaN/inf). Cross-entropy starts near ln(classes); weights that blew up give 1e10 and more.
    divergence_threshold: float | None = 1.0e4


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
    preprocess: PreprocessConfig = MISSING
    augment: AugmentConfig = MISSING
    optimizer: OptimizerConfig = MISSING
    regularization: RegularizationConfig = dataclasses.field(
        default_factory=RegularizationConfig)
    schedule: ScheduleConfig = MISSING
    logger: LoggerConfig = MISSING
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    early_stopping: EarlyStoppingConfig = dataclasses.field(default_factory=EarlyStoppingConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    summary: SummaryConfig = dataclasses.field(default_factory=SummaryConfig)
    seed: int = 0
    progress: bool = True
    compile_cache_dir: str | None = None


ConfigStore.instance().store(name="config_schema", node=Config)

MAX_DIRNAME = 100


def short_dirname(name: str) -> str:
    """A multirun job's folder name from its overrides, cut to MAX_DIRNAME characters.

    Names past the file system's 255-byte limit would crash the sweep; the hash of the whole
    keeps cut names distinct. The job's full overrides are in `.hydra/overrides.yaml`.
    """
    if len(name) <= MAX_DIRNAME:
        return name
    import hashlib

    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    return f"{name[:MAX_DIRNAME - 9]}~{digest}"


OmegaConf.register_new_resolver("short_dirname", short_dirname, replace=True)

LOGGER_MODES = ("online", "offline", "disabled")
SCHEDULES = ("constant", "step", "cosine", "cyclic_cosine", "plateau")
OPTIMIZERS = ("sgd", "momentum", "nesterov", "adadelta", "adam", "adamw")
# torch.optim.SGD under three names: plain, heavy-ball and Nesterov presets.
SGD_FAMILY = ("sgd", "momentum", "nesterov")
# The keys each optimizer reads besides lr, weight_decay, decay and clip_norm.
OPTIMIZER_KEYS = {**{name: ("momentum", "nesterov") for name in SGD_FAMILY},
                  "adadelta": ("rho", "eps"), "adam": ("b1", "b2", "eps"),
                  "adamw": ("b1", "b2", "eps")}
DECAY_MODES = ("coupled", "decoupled")
REGULARIZE_TARGETS = ("kernels", "all")
SUMMARY_FORMATS = ("table", "json")
TTA_MODES = ("none", "flip", "ten_crop")
EVAL_WEIGHTS = ("final", "best", "ema", "snapshots")


def group_options(group: str) -> list[str]:
    """The option names of a config group, from the YAML files in `conf/<group>/`.

    Options in sub-folders are named by their path, as Hydra names them (`smoke/init_study`).
    """
    root = CONF_DIR / group
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml")
                  if not any(part.startswith("_") for part in p.relative_to(root).parts))


def resolve_presets(cfg: DictConfig) -> None:
    """Replace `augment: default` by the preset the dataset names, so logs show what ran.

    Keys set on the command line (`augment.cutout=16`) stay on top of the preset: they are the
    ones that differ from the schema's defaults, which is all that `default.yaml` holds. (So
    `augment.flip=false`, a schema default, cannot undo a preset's flip: name the preset.)
    """
    if cfg.augment.name != "default":
        return
    preset = cfg.dataset.default_augment
    if preset not in group_options("augment") or preset == "default":
        raise ConfigError(
            f"dataset.default_augment='{preset}'; valid choices: "
            + ", ".join(o for o in group_options("augment") if o != "default")
        )
    with open_dict(cfg):
        schema = OmegaConf.structured(AugmentConfig)
        preset_cfg = OmegaConf.load(CONF_DIR / "augment" / f"{preset}.yaml")
        overrides = {key: value for key, value in cfg.augment.items()
                     if key != "name" and value != schema[key]}
        cfg.augment = OmegaConf.merge(schema, preset_cfg, overrides)


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


def _unit_interval(key: str, value: float) -> None:
    _require(0 <= value < 1, f"{key}={value} must be in [0, 1)")


def _validate_optimizer(opt: DictConfig) -> None:
    _require(opt.name in OPTIMIZERS,
             f"unknown optimizer '{opt.name}'; valid choices: {', '.join(OPTIMIZERS)}")
    takes = OPTIMIZER_KEYS[opt.name]
    for key in ("momentum", "nesterov", "b1", "b2", "eps", "rho"):
        value = opt[key]
        if key in takes:
            _require(value is not None,
                     f"optimizer '{opt.name}' needs optimizer.{key}, which is null; select it "
                     f"with optimizer={opt.name} to get its defaults")
        else:
            _require(value is None,
                     f"optimizer.{key}={value} is not used by optimizer '{opt.name}' (it reads "
                     f"{', '.join(takes)}); set optimizer.{key}=null")
    _require(opt.lr > 0, f"optimizer.lr={opt.lr} must be positive")
    for key in ("momentum", "b1", "b2", "rho"):
        if opt[key] is not None:
            _unit_interval(f"optimizer.{key}", opt[key])
    if opt.eps is not None:
        _require(opt.eps > 0, f"optimizer.eps={opt.eps} must be positive")
    if opt.name in SGD_FAMILY:
        # The name is logged with the run, so it must say what ran; `sgd` is torch.optim.SGD
        # and may carry any momentum.
        _require(not opt.nesterov or opt.momentum > 0,
                 f"optimizer.nesterov=true needs optimizer.momentum > 0 (got {opt.momentum})")
        _require(opt.name == "sgd" or opt.momentum > 0,
                 f"optimizer '{opt.name}' needs optimizer.momentum in (0, 1), got "
                 f"{opt.momentum}; optimizer=sgd is plain SGD")
        _require(opt.name == "sgd" or opt.nesterov == (opt.name == "nesterov"),
                 f"optimizer '{opt.name}' with optimizer.nesterov={str(opt.nesterov).lower()} "
                 f"is optimizer={'nesterov' if opt.nesterov else 'momentum'}")
    _require(opt.weight_decay >= 0, f"optimizer.weight_decay={opt.weight_decay} must be >= 0")
    _require(opt.decay in DECAY_MODES,
             f"optimizer.decay='{opt.decay}'; valid choices: {', '.join(DECAY_MODES)}")
    _require(opt.name != "adamw" or opt.decay == "decoupled",
             "optimizer 'adamw' is Adam with decoupled weight decay (optimizer.decay=decoupled); "
             "for Adam with an L2 term use optimizer=adam")
    _require(opt.clip_norm is None or opt.clip_norm > 0,
             f"optimizer.clip_norm={opt.clip_norm} must be positive or null")


def _validate_regularization(reg: DictConfig) -> None:
    for key in ("l1", "l2"):
        _require(reg[key] >= 0, f"regularization.{key}={reg[key]} must be >= 0")
    _require(reg.apply_to in REGULARIZE_TARGETS, f"regularization.apply_to='{reg.apply_to}'; "
             f"valid choices: {', '.join(REGULARIZE_TARGETS)}")
    _unit_interval("regularization.label_smoothing", reg.label_smoothing)


def _validate_selection(cfg: DictConfig) -> None:
    """Reduce-on-plateau and early stopping watch a validation metric at each evaluation."""
    from cnnlab.selection import MONITORED_METRICS

    sched, stopping = cfg.schedule, cfg.early_stopping
    watchers = []
    if sched.name == "plateau":
        watchers.append(("schedule.metric", sched.metric))
        _require(0 < sched.factor < 1, f"schedule.factor={sched.factor} must be in (0, 1)")
        _require(sched.patience >= 0, f"schedule.patience={sched.patience} must be >= 0")
        _require(sched.threshold >= 0, f"schedule.threshold={sched.threshold} must be >= 0")
        _require(sched.max_reductions >= 0,
                 f"schedule.max_reductions={sched.max_reductions} must be >= 0")
    _require(stopping.patience >= 0,
             f"early_stopping.patience={stopping.patience} must be >= 0 (0: off)")
    if stopping.patience > 0 or stopping.keep_best:
        watchers.append(("early_stopping.metric", stopping.metric))
    for key, metric in watchers:
        _require(metric in MONITORED_METRICS, f"{key}='{metric}'; valid choices: "
                 f"{', '.join(MONITORED_METRICS)} (selecting on the test set would leak it)")
    if sched.name == "plateau" or stopping.patience > 0:
        what = "schedule=plateau" if sched.name == "plateau" else "early_stopping.patience > 0"
        _require(cfg.dataset.val_size > 0,
                 f"{what} watches the validation split; set dataset.val_size > 0")
        _require(cfg.train.eval_every > 0,
                 f"{what} acts at evaluations; set train.eval_every > 0")


def cycle_length(total_steps: int, cycles: int) -> int:
    """Steps per cycle of `cyclic_cosine`: ceil(T / M) (Huang et al. 2017, eq. 2)."""
    return -(-total_steps // cycles)


def _validate_cycles(cfg: DictConfig) -> None:
    """Snapshots are saved by the host between compiled chunks, so every cycle must end on one."""
    if cfg.schedule.name != "cyclic_cosine":
        return
    total, cycles, per_call = cfg.train.steps, cfg.schedule.cycles, cfg.train.steps_per_call
    _require(cycles >= 1, f"schedule.cycles={cycles} must be a positive integer")
    length = cycle_length(total, cycles)
    _require(length % per_call == 0,
             f"schedule.cycles={cycles} gives cycles of ceil({total}/{cycles})={length} steps, "
             f"which must be a multiple of train.steps_per_call={per_call}")
    _require((cycles - 1) * length < total,
             f"schedule.cycles={cycles} with cycles of {length} steps leaves the last cycle of "
             f"train.steps={total} empty; choose train.steps divisible by schedule.cycles")


def fixed_square_crop_scale(augment: DictConfig) -> float | None:
    """The area fraction of `resized_crop` when every window is the same square (augment=alexnet:
    224^2 / 256^2), else None; ten_crop then takes windows of that size."""
    if not augment.get("resized_crop", False):
        return None
    scale, ratio = list(augment.crop_scale), list(augment.crop_ratio)
    return scale[0] if scale[0] == scale[1] and ratio == [1.0, 1.0] else None


def validate_eval(ev: DictConfig, augment: DictConfig, image_shape: Any = None) -> None:
    """The `eval` keys; `augment` (the training crops) and the image shape fix ten_crop."""
    _require(ev.ema_decay is None or 0 < ev.ema_decay < 1,
             f"eval.ema_decay={ev.ema_decay} must be in (0, 1) or null")
    _require(ev.tta in TTA_MODES, f"eval.tta='{ev.tta}'; valid choices: {', '.join(TTA_MODES)}")
    _require(ev.crop_size is None or ev.crop_size > 0,
             f"eval.crop_size={ev.crop_size} must be a positive integer or null")
    if ev.tta == "ten_crop":
        _require(ev.crop_size is not None or augment.crop_pad > 0
                 or fixed_square_crop_scale(augment) is not None,
                 "eval.tta=ten_crop needs training crops of one size (augment.crop_pad > 0, or "
                 "augment=alexnet's fixed-scale crops) or a window size eval.crop_size=N")
    if ev.crop_size is not None and image_shape is not None:
        side = min(image_shape[0], image_shape[1])
        _require(ev.crop_size <= side, f"eval.crop_size={ev.crop_size} exceeds the "
                 f"{image_shape[0]}x{image_shape[1]} images")
    _require(ev.weights in EVAL_WEIGHTS,
             f"eval.weights='{ev.weights}'; valid choices: {', '.join(EVAL_WEIGHTS)}")
    _require(ev.format in SUMMARY_FORMATS,
             f"eval.format='{ev.format}'; valid choices: {', '.join(SUMMARY_FORMATS)}")
    _require(ev.batch_size is None or ev.batch_size > 0,
             f"eval.batch_size={ev.batch_size} must be a positive integer or null")


def validate(cfg: DictConfig) -> None:
    """Check values and names; raises ConfigError with a one-line message naming the choices."""
    # Local import: cnnlab.models pulls in JAX, which the CLI's fast error path should not need.
    from cnnlab import augment, models, preprocess
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
    _require(cfg.init.bias in layers.BIAS_INITIALIZERS,
             f"init.bias='{cfg.init.bias}' scales by a weight's fan, which a bias does not have; "
             f"valid choices: {', '.join(layers.BIAS_INITIALIZERS)}")
    augment.validate(cfg.augment)
    preprocess.validate(cfg.preprocess, cfg.dataset.image_shape)

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

    _validate_optimizer(cfg.optimizer)
    _validate_regularization(cfg.regularization)

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

    _validate_selection(cfg)
    _validate_cycles(cfg)
    validate_eval(cfg.eval, cfg.augment, cfg.dataset.image_shape)

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
