"""The config schema: typed structured configs that Hydra merges `conf/` onto.

A wrong type (`train.steps=abc`) or an unknown key (`train.stepz=1`) fails at composition; the
values are checked by the module that uses them (cnnlab/config/load.py calls each in turn).
"""

import dataclasses
import logging
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

log = logging.getLogger(__name__)


# Every field is MISSING: its value comes from conf/ (conf/config.yaml for the sections no group
# chooses, conf/<group>/*.yaml for the others). None marks a key that only some options of a
# group use: null there means "unused by this choice", not a default value.


@dataclasses.dataclass
class DatasetConfig:
    name: str = MISSING
    train_split: str = MISSING
    test_split: str = MISSING
    image_key: str = MISSING
    label_key: str = MISSING
    # Known without loading the data: used by `cnnlab summary` and the geometry check.
    image_shape: list[int] | None = MISSING
    # Images in the whole train split (train.epochs needs it before the data is read).
    train_size: int | None = None
    num_classes: int | None = MISSING
    data_dir: str | None = MISSING
    download: bool = MISSING
    val_size: int = MISSING
    val_seed: int = MISSING
    # Cross-validation: the train split cut into `folds` parts (by val_seed), part `fold` the
    # validation split, the others train; null: off. Defaults, not MISSING: configs of runs
    # made before folds existed load without them.
    folds: int | None = None
    fold: int | None = None
    max_examples: int | None = MISSING
    # Folder of decoded splits (cnnlab.data.cache); null: no cache. Not MISSING: configs of runs
    # made before the cache existed (`cnnlab eval` reads them) load without one.
    cache_dir: str | None = None
    cache_max_gb: float | None = None  # the cache's size; least recently used entries go
    default_augment: str = MISSING
    # Subsets of any dataset (cnnlab.data.subsets); defaults, not MISSING, so older runs' configs
    # load.
    # classes: only these classes, relabelled 0..len-1 in this order; null: all.
    classes: list[int] | None = None
    # per_class: N training images per class (int), or that fraction of each (float in (0, 1)),
    # drawn by val_seed after the validation hold-out; null: all. Any: OmegaConf 2.3's Union
    # nodes break Hydra's merge of conf/dataset; cnnlab.data.subsets.check_per_class checks the
    # type.
    per_class: Any = None
    # dataset=folder only (cnnlab.data.folder), null for the others: the folder, the size every
    # image is resized to, how (stretch | center_crop), channels (1 | 3), and the test split
    # held out per class of a folder without train/ and test/ subfolders.
    path: str | None = None
    image_size: list[int] | None = None
    resize: str | None = None
    channels: int | None = None
    test_fraction: float | None = None
    # Shapes only (ImageNet): `cnnlab summary` uses it, `cnnlab train` refuses it.
    summary_only: bool = MISSING
    # Device-resident or streamed training set (cnnlab/data/placement.py): auto | true | false;
    # Any: a bool or "auto". None, as in configs saved before streaming existed, reads as auto.
    on_device: Any = None
    # Streaming through Grain (cnnlab/data/stream.py); None: StreamOptions' defaults.
    stream_workers: int | None = None
    stream_threads: int | None = None
    stream_prefetch: int | None = None
    # Training images a streamed set's preprocessing statistics are computed from.
    stats_sample: int | None = None
    # auto's budget for the decoded train split on the device; None: half the device's memory
    # (8 GB where the backend does not say, e.g. the CPU).
    device_budget_gb: float | None = None


@dataclasses.dataclass
class InitConfig:
    conv: str = MISSING
    dense: str = MISSING
    bias: str = MISSING


@dataclasses.dataclass
class ActivationConfig:
    name: str = MISSING
    # Used by leaky_relu only.
    negative_slope: float | None = None


@dataclasses.dataclass
class NormConfig:
    # Each norm takes some of these keys (null: its default); a key it does not take is refused.
    name: str = MISSING
    momentum: float | None = None
    epsilon: float | None = None
    # batch: the running variance's estimator, `unbiased` (x n/(n-1)) or `biased`.
    running_var: str | None = None
    # lrn: window size n, k, alpha, beta (Krizhevsky et al. 2012, section 3.3).
    size: int | None = None
    k: float | None = None
    alpha: float | None = None
    beta: float | None = None
    # group: number of groups G.
    num_groups: int | None = None


@dataclasses.dataclass
class PreprocessConfig:
    # How pixels become the network's input (cnnlab/data/preprocess.py): channel, mean_image, zca,
    # none; statistics come from the training split after the validation hold-out.
    name: str = MISSING
    # zca only (null otherwise): eps in W = U diag(1 / sqrt(lambda + eps)) U^T, [0, 1] scale.
    epsilon: float | None = None


@dataclasses.dataclass
class AffineConfig:
    # torchvision's RandomAffine, one matrix per image: angle ~ U[-rotate, rotate] degrees,
    # zoom ~ U[scale], x-shear ~ U[-shear, shear] degrees, shift ~ U[-translate, translate] x
    # the image's size; fill 0 (black). All four at their identity values: off.
    rotate: float = MISSING
    scale: list[float] = MISSING
    shear: float = MISSING
    translate: float = MISSING


@dataclasses.dataclass
class AugmentConfig:
    # Order and definitions: cnnlab/data/augment/; conf/augment/_base.yaml turns each one off.
    name: str = MISSING
    crop_pad: int = MISSING
    flip: bool = MISSING
    # RandomResizedCrop (Szegedy et al. 2015): area fraction ~ U[crop_scale], log aspect ratio
    # ~ U[log crop_ratio], resized back to the image size.
    resized_crop: bool = MISSING
    crop_scale: list[float] = MISSING
    crop_ratio: list[float] = MISSING
    # torchvision ColorJitter strengths s: factor ~ U[max(0, 1 - s), 1 + s].
    brightness: float = MISSING
    contrast: float = MISSING
    saturation: float = MISSING
    # AlexNet's PCA lighting: std of alpha.
    lighting: float = MISSING
    # Cutout (DeVries & Taylor 2017): side of the zeroed square in pixels.
    cutout: int = MISSING
    # mixup (Zhang et al. 2018): alpha of Beta(alpha, alpha).
    mixup: float = MISSING
    # VGG's multi-scale training: shorter side resized to S ~ U{S_min..S_max}, then a random
    # crop of the images' own size; null: off.
    scale_jitter: list[int] | None = MISSING
    affine: AffineConfig = MISSING
    # Hue rotation ~ U[-hue, hue] degrees per image (RGB only).
    hue: float = MISSING
    # Colour casting (Wu et al. 2015): per-channel integer offsets ~ U{-c..c} of 255 levels.
    color_cast: int = MISSING


@dataclasses.dataclass
class OptimizerConfig:
    # Update rules: cnnlab/training/optim.py. Each optimizer reads the keys its OPTIMIZERS entry
    # lists;
    # the others must stay null, so that no value in a run's config is silently unused.
    name: str = MISSING
    lr: float = MISSING
    # sgd, momentum, nesterov: torch.optim.SGD's momentum and nesterov.
    momentum: float | None = None
    nesterov: bool | None = None
    # adam, adamw: Kingma & Ba's beta1, beta2; adam, adamw, adadelta: epsilon.
    b1: float | None = None
    b2: float | None = None
    eps: float | None = None
    # adadelta: Zeiler's decay rate rho.
    rho: float | None = None
    weight_decay: float = MISSING
    # coupled: wd * w added to the gradient (L2); decoupled: lr * wd * w added to the step.
    decay: str = MISSING
    # Global-norm clipping of the gradient, before anything else; null: off.
    clip_norm: float | None = MISSING


@dataclasses.dataclass
class RegularizationConfig:
    # Penalties added to the optimized objective (not to the logged loss):
    # l1 * sum |w| + (l2 / 2) * sum w^2 over the weights `apply_to` selects.
    l1: float = MISSING
    l2: float = MISSING
    # kernels: conv and dense kernels only; all: every parameter.
    apply_to: str = MISSING
    # Szegedy et al. 2016: train against (1 - eps) * one_hot + eps / K.
    label_smoothing: float = MISSING


@dataclasses.dataclass
class LossConfig:
    # The optimized data term (cnnlab/training/losses.py): cross_entropy, mse, sigmoid_bce. Runs
    # saved
    # before the loss group existed load with today's default (cnnlab.config.load.load_run_config).
    name: str = MISSING
    # mse only (null otherwise): the outputs the squared error is taken of: softmax, sigmoid,
    # logits.
    output: str | None = None


@dataclasses.dataclass
class TransferConfig:
    # cnnlab/transfer: scratch, linear_probe, finetune_top, finetune_all, two_phase.
    mode: str = MISSING
    # A cnnlab run directory, or a torchvision .pth/.pt or .safetensors file; null: none.
    source: str | None = None
    # From a run directory: final, best or ema.
    weights: str = MISSING
    # The last layer copied from the source (null: all) and the last one frozen.
    load_through: str | None = None
    freeze_through: str | None = None
    # {layer here: layer of the source}: load exactly these layers, each from its named one.
    layer_map: dict[str, str] = MISSING
    # A new classifier: true, false, or null (when the class counts differ).
    reset_head: bool | None = None
    backbone_lr_mult: float = MISSING
    probe_steps: int = MISSING
    # frozen or train: batch norm in frozen layers.
    bn: str = MISSING
    # source: normalize inputs with the source's statistics; own: with this run's data's.
    preprocess: str = MISSING


@dataclasses.dataclass
class LrFindConfig:
    # `cnnlab lr_find` (cnnlab/training/lr_find.py): lr_i = start * (end / start)^(i / (steps - 1)).
    start: float = MISSING
    end: float = MISSING
    steps: int = MISSING
    # Stop once the smoothed loss exceeds `diverge` x its lowest value so far.
    diverge: float = MISSING
    # Decay of the loss's bias-corrected exponential moving average (0: no smoothing).
    smoothing: float = MISSING
    # Folder of lr_find.png and lr_find.json.
    output: str = MISSING


@dataclasses.dataclass
class ScheduleConfig:
    name: str = MISSING
    warmup_steps: int = MISSING
    # step only: fractions of train.steps.
    milestones: list[float] | None = None
    # step: lr multiplier at each milestone; plateau: at each reduction.
    factor: float = MISSING
    # cosine: the final lr as a fraction of optimizer.lr.
    final_factor: float = MISSING
    # cyclic_cosine (snapshot ensembles, Huang et al. 2017): number of cosine cycles.
    cycles: int = MISSING
    # plateau: reduce when `metric` has not improved by more than `threshold` (absolute) for
    # `patience` evaluations, at most `max_reductions` times.
    metric: str = MISSING
    patience: int = MISSING
    threshold: float = MISSING
    max_reductions: int = MISSING


@dataclasses.dataclass
class EarlyStoppingConfig:
    # Stop when `metric` has not improved for `patience` evaluations (0: never stop early).
    patience: int = MISSING
    metric: str = MISSING
    # Keep the checkpoint of the best evaluation of `metric` in <run_dir>/best.
    keep_best: bool = MISSING


@dataclasses.dataclass
class EvalConfig:
    # Evaluation-time options (cnnlab/training/evaluate.py): averaged weights, test-time
    # augmentation.
    # Exponential moving average of the weights and BN statistics, updated every step and
    # evaluated as `test_ema/...` (Polyak & Juditsky 1992; Kingma & Ba 2015 sec. 7.2, with
    # its bias correction); null: off.
    ema_decay: float | None = MISSING
    # Test-time augmentation: none, flip (image + mirror image), ten_crop (4 corners + centre,
    # each also mirrored; Krizhevsky et al. 2012 sec. 4.1); the softmaxes are averaged.
    # During training a value other than none adds `test_tta/...` to each evaluation.
    tta: str = MISSING
    # ten_crop windows: null = windows of the image's size cut from the image zero-padded by
    # augment.crop_pad (the training crops' extremes); N = NxN windows of the image itself,
    # scaled back to the image's size.
    crop_size: int | None = MISSING
    # Multi-scale evaluation (VGG sec. 3.2): the test image resized to each shorter side Q in
    # the list, the softmaxes averaged over the scales (with eval.tta's views at each); null:
    # off. scale_mode: dense (the whole resized image; models ending in global average pooling)
    # or crop (its centre of the training size; every Q >= the images' shorter side).
    scales: list[int] | None = MISSING
    scale_mode: str = MISSING
    # `cnnlab eval` only: which weights each run contributes: final (latest checkpoint), best
    # (<run_dir>/best), ema (the averaged weights of the latest checkpoint) or snapshots (every
    # <run_dir>/snapshots/<step>, one ensemble member each).
    weights: str = MISSING
    # `cnnlab eval` only: table (aligned text) or json; output: also write the JSON report to
    # this file (null: do not); batch_size: null = each run's train.eval_batch_size.
    format: str = MISSING
    output: str | None = MISSING
    batch_size: int | None = MISSING
    # Top-k error beside the (top-1) error, where the dataset has more than top_k classes;
    # ties rank towards the lower class index, as argmax does. null: top-1 only.
    top_k: int | None = MISSING
    # `cnnlab eval` only: folder for confusion_test.csv/.png and per_class_test.csv.
    confusion_dir: str | None = MISSING


@dataclasses.dataclass
class LoggerConfig:
    mode: str = MISSING
    project: str = MISSING
    entity: str | None = MISSING
    group: str | None = MISSING
    tags: list[str] = MISSING
    name: str | None = MISSING
    job_type: str = MISSING
    artifacts: bool = MISSING
    console: str = MISSING
    system_metrics: bool = MISSING


@dataclasses.dataclass
class TrainConfig:
    steps: int = MISSING
    # Set: train.steps becomes ceil(epochs x train images / batch_size) (steps_from_epochs).
    epochs: float | None = None
    batch_size: int = MISSING
    steps_per_call: int = MISSING
    log_every: int = MISSING
    eval_every: int = MISSING
    eval_batch_size: int = MISSING
    stop_on_nan: bool = MISSING
    # With stop_on_nan, a mean training loss above this also counts as diverged (null: only
    # NaN/inf).
    divergence_threshold: float | None = MISSING
    # Data parallel over this many devices (null: all); None also lets configs saved before
    # the key existed load.
    devices: int | None = None
    # auto | true | false (cnnlab/parallel.py); None: auto.
    distributed: str | None = None
    # "START:STOP": a profiler trace of those steps (cnnlab/training/actions.py Profile); null: off.
    profile: str | None = None
    # fp32 or bf16 (cnnlab.models.layers.PRECISIONS); grad_accum: microbatches per step
    # (cnnlab.training.steps). Their default None (not MISSING) lets configs saved before these keys
    # load: fp32 and 1, as those runs trained.
    precision: str | None = None
    grad_accum: int | None = None
    # highest | high | default (cnnlab/training/numerics.py); deterministic: XLA's
    # deterministic GPU ops. None (configs saved before them): highest and true.
    matmul_precision: str | None = None
    deterministic: bool | None = None


@dataclasses.dataclass
class CheckpointConfig:
    enabled: bool = MISSING
    every: int = MISSING
    keep: int = MISSING


@dataclasses.dataclass
class ResumeConfig:
    # Resuming with settings that differ from the first start's: refused unless true; then
    # each change is recorded in <run_dir>/changes.jsonl with the step it applies from.
    allow_changes: bool = MISSING


@dataclasses.dataclass
class DiagnosticsConfig:
    # Every N steps (and at the last): per-layer gradient norms, update/weight ratios,
    # activation statistics and dead ReLUs (cnnlab/training/diagnostics.py); null or 0: off. The
    # default
    # None (not MISSING) lets configs saved before this section load.
    every: int | None = None


@dataclasses.dataclass
class SummaryConfig:
    # table: aligned text; json: the same rows and totals for programs.
    format: str = MISSING
    # Nesting depth of the rows: 1 lists the top-level layers and blocks, 2 their parts, ...
    depth: int = MISSING


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
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    transfer: TransferConfig = dataclasses.field(default_factory=TransferConfig)
    schedule: ScheduleConfig = MISSING
    logger: LoggerConfig = MISSING
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    resume: ResumeConfig = dataclasses.field(default_factory=ResumeConfig)
    early_stopping: EarlyStoppingConfig = dataclasses.field(default_factory=EarlyStoppingConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    summary: SummaryConfig = dataclasses.field(default_factory=SummaryConfig)
    lr_find: LrFindConfig = dataclasses.field(default_factory=LrFindConfig)
    diagnostics: DiagnosticsConfig = dataclasses.field(default_factory=DiagnosticsConfig)
    seed: int = MISSING
    progress: bool = MISSING
    compile_cache_dir: str | None = MISSING


ConfigStore.instance().store(name="config_schema", node=Config)


