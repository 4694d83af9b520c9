"""The config schema: typed structured configs that Hydra merges `conf/` onto.

A wrong type (`train.steps=abc`) or an unknown key (`train.stepz=1`) fails at composition; the
values are checked by the module that uses them (cnnlab/config/load.py calls each in turn).
Each key's one-line description sits beside its field (`described`): `cnnlab train --help`
shows it, and tests/test_help.py fails for a key without one.
"""

import dataclasses
import logging
from typing import Any

from hydra.core.config_store import ConfigStore

from cnnlab.registry import described

log = logging.getLogger(__name__)


# Every field is MISSING: its value comes from conf/ (conf/config.yaml for the sections no group
# chooses, conf/<group>/*.yaml for the others). None marks a key that only some options of a
# group use: null there means "unused by this choice", not a default value.


@dataclasses.dataclass
class DatasetConfig:
    name: str = described("TFDS name of the dataset (or folder: your own images)")
    train_split: str = described("split trained on (the validation hold-out comes from it)")
    test_split: str = described("split the test error is measured on")
    image_key: str = described("feature holding the image")
    label_key: str = described("feature holding the class label")
    # Known without loading the data: used by `cnnlab summary` and the geometry check.
    image_shape: list[int] | None = described("[H,W,C] of the images, known before loading")
    # train.epochs needs it before the data is read.
    train_size: int | None = described("images in the whole train split", None)
    num_classes: int | None = described("number of classes")
    data_dir: str | None = described("TFDS data folder (null: TFDS's default)")
    download: bool = described("let TFDS download and prepare the dataset if missing")
    val_size: int = described("training images held out as the validation split (0: none)")
    val_seed: int = described("seed of the hold-out, the folds and per_class draws")
    # Defaults, not MISSING: configs of runs made before folds existed load without them.
    folds: int | None = described("cross-validation: the train split cut into this many parts",
                                  None)
    fold: int | None = described("the part used as validation split (0..folds-1)", None)
    max_examples: int | None = described("use only the first N training images (null: all)")
    # Not MISSING: configs of runs made before the cache existed (`cnnlab eval`) load without.
    cache_dir: str | None = described("folder of decoded splits (null: no cache)", None)
    cache_max_gb: float | None = described(
        "the cache's size; least recently used entries go", None)
    default_augment: str = described("the augment preset augment=default means for this data")
    # Subsets (cnnlab.data.subsets); defaults, not MISSING, so older runs' configs load.
    classes: list[int] | None = described(
        "only these classes, relabelled 0..len-1 in order (null: all)", None)
    # Drawn by val_seed after the validation hold-out. Any: OmegaConf 2.3's Union nodes break
    # Hydra's merge of conf/dataset; cnnlab.data.subsets.check_per_class checks the type.
    per_class: Any = described(
        "N training images per class, or a fraction of each (null: all)", None)
    # dataset=folder only (cnnlab.data.folder), null for the others.
    path: str | None = described("folder: the image folder", None)
    image_size: list[int] | None = described("folder: [H,W] every image is resized to", None)
    resize: str | None = described("folder: how images are resized: stretch | center_crop",
                                   None)
    channels: int | None = described("folder: channels of the images: 1 | 3", None)
    test_fraction: float | None = described(
        "folder: test fraction held out per class (no train/, test/)", None)
    # Shapes only (ImageNet): `cnnlab summary` uses it, `cnnlab train` refuses it.
    summary_only: bool = described("shapes only: for cnnlab summary, not for training")
    # Any: a bool or "auto". None, as in configs saved before streaming existed, reads as auto.
    on_device: Any = described(
        "training set on the device (true), streamed (false), or auto", None)
    # None: StreamOptions' defaults (cnnlab/data/stream.py).
    stream_workers: int | None = described("streaming: Grain worker processes", None)
    stream_threads: int | None = described("streaming: read threads per worker", None)
    stream_prefetch: int | None = described("streaming: batches prefetched", None)
    stats_sample: int | None = described(
        "streaming: training images the input statistics come from", None)
    device_budget_gb: float | None = described(
        "on_device=auto's budget (null: half the device's memory)", None)


@dataclasses.dataclass
class InitConfig:
    conv: str = described("initializer of conv kernels (e.g. he_normal, glorot_uniform)")
    dense: str = described("initializer of dense kernels")
    bias: str = described("initializer of biases (zeros, ...)")


@dataclasses.dataclass
class ActivationConfig:
    name: str = described("the activation function (relu, tanh, ...)")
    negative_slope: float | None = described("leaky_relu: slope for negative inputs", None)


@dataclasses.dataclass
class NormConfig:
    # Each norm takes some of these keys (null: its default); a key it does not take is refused.
    name: str = described("normalization layer: batch, group, layer, lrn, none")
    momentum: float | None = described("batch: momentum of the running statistics", None)
    epsilon: float | None = described("added to the variance", None)
    running_var: str | None = described(
        "batch: running variance: unbiased (x n/(n-1)) | biased", None)
    # lrn: Krizhevsky et al. 2012, section 3.3.
    size: int | None = described("lrn: window size n (channels)", None)
    k: float | None = described("lrn: additive constant k", None)
    alpha: float | None = described("lrn: scale alpha", None)
    beta: float | None = described("lrn: exponent beta", None)
    num_groups: int | None = described("group: number of groups G", None)


@dataclasses.dataclass
class PreprocessConfig:
    # Statistics come from the training split after the validation hold-out
    # (cnnlab/data/preprocess.py).
    name: str = described("how pixels become inputs: channel, mean_image, zca, none")
    epsilon: float | None = described(
        "zca: eps in U diag(1/sqrt(lambda + eps)) U^T, [0, 1] scale", None)


@dataclasses.dataclass
class AffineConfig:
    # torchvision's RandomAffine, one matrix per image, fill 0 (black). All four at their
    # identity values: off.
    rotate: float = described("angle ~ U[-rotate, rotate] degrees")
    scale: list[float] = described("zoom ~ U[scale]")
    shear: float = described("x-shear ~ U[-shear, shear] degrees")
    translate: float = described("shift ~ U[-translate, translate] x the image's size")


@dataclasses.dataclass
class AugmentConfig:
    # Order and definitions: cnnlab/data/augment/; conf/augment/_base.yaml turns each one off.
    name: str = described("name of the augmentation preset")
    crop_pad: int = described("random crop after zero-padding by this many pixels (0: off)")
    flip: bool = described("random horizontal flip")
    # Szegedy et al. 2015.
    resized_crop: bool = described("RandomResizedCrop, resized back to the image size")
    crop_scale: list[float] = described("resized_crop: area fraction ~ U[crop_scale]")
    crop_ratio: list[float] = described("resized_crop: log aspect ratio ~ U[log crop_ratio]")
    # torchvision ColorJitter: factor ~ U[max(0, 1 - s), 1 + s].
    brightness: float = described("ColorJitter brightness strength s")
    contrast: float = described("ColorJitter contrast strength s")
    saturation: float = described("ColorJitter saturation strength s")
    lighting: float = described("AlexNet's PCA lighting: std of alpha")
    cutout: int = described("Cutout (DeVries & Taylor 2017): side of the zeroed square")
    mixup: float = described("mixup (Zhang et al. 2018): alpha of Beta(alpha, alpha)")
    # VGG's multi-scale training, then a random crop of the images' own size.
    scale_jitter: list[int] | None = described(
        "[S_min,S_max]: shorter side resized to S ~ U{S_min..S_max}")
    affine: AffineConfig = described("random affine transform (RandomAffine)")
    hue: float = described("hue rotation ~ U[-hue, hue] degrees per image (RGB only)")
    color_cast: int = described("colour cast: per-channel offsets ~ U{-c..c} of 255 levels")


@dataclasses.dataclass
class OptimizerConfig:
    # Update rules: cnnlab/training/optim.py. Each optimizer reads the keys its OPTIMIZERS entry
    # lists; the others must stay null, so that no value in a run's config is silently unused.
    name: str = described("update rule: sgd, momentum, nesterov, adam, adamw, adadelta")
    lr: float = described("base learning rate (the schedule multiplies it)")
    momentum: float | None = described("sgd, momentum, nesterov: momentum", None)
    nesterov: bool | None = described("sgd, momentum, nesterov: Nesterov momentum", None)
    b1: float | None = described("adam, adamw: beta1", None)
    b2: float | None = described("adam, adamw: beta2", None)
    eps: float | None = described("adam, adamw, adadelta: epsilon", None)
    rho: float | None = described("adadelta: decay rate rho", None)
    weight_decay: float = described("weight decay wd (0: none)")
    decay: str = described("coupled: wd * w added to the gradient; decoupled: to the step")
    clip_norm: float | None = described("clip the gradient's global norm to this (null: off)")


@dataclasses.dataclass
class RegularizationConfig:
    # Penalties added to the optimized objective (not to the logged loss).
    l1: float = described("adds l1 * sum |w| to the objective")
    l2: float = described("adds (l2 / 2) * sum w^2 to the objective")
    apply_to: str = described("weights penalized: kernels (conv, dense) | all")
    # Szegedy et al. 2016.
    label_smoothing: float = described("train against (1 - eps) * one_hot + eps / K")


@dataclasses.dataclass
class LossConfig:
    # Runs saved before the loss group existed load with today's default
    # (cnnlab.config.load.load_run_config).
    name: str = described("data term: cross_entropy, mse, sigmoid_bce")
    output: str | None = described("mse: outputs compared: softmax, sigmoid, logits", None)


@dataclasses.dataclass
class TransferConfig:
    # cnnlab/transfer.
    mode: str = described("scratch, linear_probe, finetune_top, finetune_all, two_phase")
    source: str | None = described(
        "a cnnlab run directory or a .pth/.pt/.safetensors file", None)
    weights: str = described("from a run directory: final, best or ema")
    load_through: str | None = described("last layer copied from the source (null: all)", None)
    freeze_through: str | None = described("last layer frozen (null: none)", None)
    layer_map: dict[str, str] = described("{layer here: layer of the source}: load exactly these")
    reset_head: bool | None = described(
        "a new classifier: true, false, null (if class counts differ)", None)
    backbone_lr_mult: float = described("learning rate multiplier of the copied layers")
    probe_steps: int = described("two_phase: steps of the linear probe before fine-tuning")
    bn: str = described("batch norm in frozen layers: frozen | train")
    preprocess: str = described("normalize inputs with the source's statistics | own")
    adapt_input: str = described(
        "other channel counts: strict refuses, timm adapts conv1")


@dataclasses.dataclass
class LrFindConfig:
    # `cnnlab lr_find` (cnnlab/training/lr_find.py): lr_i = start * (end / start)^(i / (steps - 1)).
    start: float = described("first learning rate")
    end: float = described("last learning rate")
    steps: int = described("steps from start to end (lr grows exponentially)")
    diverge: float = described("stop once the smoothed loss exceeds this x its minimum")
    smoothing: float = described("decay of the loss's moving average (0: no smoothing)")
    output: str = described("folder of lr_find.png and lr_find.json")


@dataclasses.dataclass
class ScheduleConfig:
    name: str = described("lr schedule: constant, step, cosine, cyclic_cosine, plateau")
    warmup_steps: int = described("steps of linear warm-up to optimizer.lr")
    milestones: list[float] | None = described("step: milestones as fractions of train.steps",
                                               None)
    factor: float = described("step: lr multiplier at each milestone; plateau: at each cut")
    final_factor: float = described("cosine: the final lr as a fraction of optimizer.lr")
    # Snapshot ensembles, Huang et al. 2017.
    cycles: int = described("cyclic_cosine: number of cosine cycles")
    # plateau: reduce when `metric` has not improved by more than `threshold` (absolute) for
    # `patience` evaluations, at most `max_reductions` times.
    metric: str = described("plateau: metric watched (e.g. val/error)")
    patience: int = described("plateau: evaluations without improvement before a cut")
    threshold: float = described("plateau: smallest change counted as improvement")
    max_reductions: int = described("plateau: at most this many cuts")


@dataclasses.dataclass
class EarlyStoppingConfig:
    patience: int = described("stop after this many evaluations without improvement (0: off)")
    metric: str = described("metric watched (e.g. val/error)")
    keep_best: bool = described("keep the checkpoint of the best evaluation in <run_dir>/best")


@dataclasses.dataclass
class EvalConfig:
    # Evaluation-time options (cnnlab/training/evaluate.py); docs/evaluation.md.
    # Polyak & Juditsky 1992; Kingma & Ba 2015 sec. 7.2, with its bias correction.
    ema_decay: float | None = described(
        "EMA decay of the weights, evaluated as test_ema/ (null: off)")
    # The softmaxes are averaged; in training a value other than none adds `test_tta/...`.
    tta: str = described("test-time augmentation: none, flip, ten_crop")
    # null: windows of the image's size cut from the image zero-padded by augment.crop_pad.
    crop_size: int | None = described("ten_crop: NxN windows (null: the padded image's crops)")
    # VGG sec. 3.2: the softmaxes are averaged over the scales (with eval.tta's views at each).
    scales: list[int] | None = described("multi-scale: shorter sides Q to test at (null: off)")
    # dense: models ending in global average pooling; crop: every Q >= the shorter side.
    scale_mode: str = described("scales: dense (whole image) | crop (centre of training size)")
    weights: str = described("cnnlab eval: final, best, ema, or snapshots (one member each)")
    format: str = described("cnnlab eval: table (aligned text) | json")
    output: str | None = described("cnnlab eval: also write the JSON report here (null: no)")
    batch_size: int | None = described("cnnlab eval: batch (null: each run's eval_batch_size)")
    # Ties rank towards the lower class index, as argmax does.
    top_k: int | None = described("also the top-k error where there are more classes (null)")
    confusion_dir: str | None = described("cnnlab eval: folder for confusion and per-class "
                                           "errors")


@dataclasses.dataclass
class LoggerConfig:
    mode: str = described("W&B: offline, online or disabled")
    project: str = described("W&B project")
    entity: str | None = described("W&B entity (user or team; null: the default)")
    group: str | None = described("W&B group (null: a sweep's runs share one named after it)")
    tags: list[str] = described("W&B tags")
    name: str | None = described("W&B run name (null: from the overrides)")
    job_type: str = described("W&B job type")
    artifacts: bool = described("log the config and final checkpoint as W&B artifacts")
    console: str = described("W&B console capture: wrap | off")
    system_metrics: bool = described("log W&B system metrics (CPU, memory, GPU)")
    # None (not MISSING) lets configs saved before the key existed load: those runs wrote none.
    tensorboard: bool | None = described("TensorBoard event files in the run directory", None)


@dataclasses.dataclass
class TrainConfig:
    steps: int = described("training steps (set from train.epochs when that is set)")
    # steps_from_epochs: ceil(epochs x train images / batch_size).
    epochs: float | None = described("set: decides train.steps from the training images", None)
    batch_size: int = described("images per step")
    steps_per_call: int = described("at most this many steps compiled into one call")
    log_every: int = described("steps between training logs")
    eval_every: int = described("steps between evaluations (0: only at the end)")
    eval_batch_size: int = described("batch size of evaluation")
    stop_on_nan: bool = described("stop a run whose loss is NaN/inf (recorded as diverged)")
    divergence_threshold: float | None = described(
        "stop_on_nan: a mean loss above this also diverged (null: off)")
    # None also lets configs saved before the key existed load.
    devices: int | None = described("data parallel over this many devices (null: all)", None)
    distributed: str | None = described(
        "multi-host jax.distributed start: auto | true | false", None)
    profile: str | None = described("START:STOP: a profiler trace of those steps (null: off)",
                                     None)
    # Their default None (not MISSING) lets configs saved before these keys load: fp32 and 1,
    # as those runs trained.
    precision: str | None = described("fp32 | bf16 (bfloat16 compute, float32 weights)", None)
    grad_accum: int | None = described("microbatches per step (gradient accumulation)", None)
    # None (configs saved before them): highest and true (cnnlab/training/numerics.py).
    matmul_precision: str | None = described(
        "fp32 matmuls/convs: highest (no TF32) | high | default", None)
    deterministic: bool | None = described("XLA's deterministic GPU ops (bit-exact reruns)", None)
    # None (configs saved before it): xla, as they were trained.
    conv_impl: str | None = described(
        "CPU convs: xla | im2col | winograd2 | winograd4 | auto", None)
    # None (configs saved before it): ynnpack, XLA's default they trained with.
    cpu_kernels: str | None = described(
        "CPU training/eval convolutions in: eigen | ynnpack", None)


@dataclasses.dataclass
class CheckpointConfig:
    enabled: bool = described("write checkpoints")
    every: int = described("steps between checkpoints")
    keep: int = described("checkpoints kept")


@dataclasses.dataclass
class ResumeConfig:
    # Each change is recorded in <run_dir>/changes.jsonl with the step it applies from.
    allow_changes: bool = described("resume with settings that differ from the first start's")


@dataclasses.dataclass
class DiagnosticsConfig:
    # cnnlab/training/diagnostics.py. The default None (not MISSING) lets configs saved before
    # this section load.
    every: int | None = described(
        "per-layer gradient/activation statistics every N steps", None)


@dataclasses.dataclass
class SummaryConfig:
    format: str = described("table (aligned text) | json (the same rows for programs)")
    depth: int = described("nesting depth of the rows: 1 top-level layers, 2 their parts")


@dataclasses.dataclass
class Config:
    # A model family's own keys are typed by that family's schema (cnnlab.models).
    model: dict[str, Any] = described("the network; its keys are its family's")
    dataset: DatasetConfig = described("the data")
    init: InitConfig = described("weight initialization")
    activation: ActivationConfig = described("the activation function")
    norm: NormConfig = described("the normalization layer")
    preprocess: PreprocessConfig = described("input preprocessing")
    augment: AugmentConfig = described("training-time augmentation")
    optimizer: OptimizerConfig = described("the update rule")
    regularization: RegularizationConfig = described("penalties on the objective",
                                                     factory=RegularizationConfig)
    loss: LossConfig = described("the loss", factory=LossConfig)
    transfer: TransferConfig = described("transfer learning", factory=TransferConfig)
    schedule: ScheduleConfig = described("the learning-rate schedule")
    logger: LoggerConfig = described("Weights & Biases logging")
    train: TrainConfig = described("the training loop", factory=TrainConfig)
    checkpoint: CheckpointConfig = described("checkpoints", factory=CheckpointConfig)
    resume: ResumeConfig = described("resuming a run directory", factory=ResumeConfig)
    early_stopping: EarlyStoppingConfig = described("early stopping",
                                                    factory=EarlyStoppingConfig)
    eval: EvalConfig = described("evaluation (and cnnlab eval)", factory=EvalConfig)
    summary: SummaryConfig = described("cnnlab summary's output", factory=SummaryConfig)
    lr_find: LrFindConfig = described("cnnlab lr_find's range test", factory=LrFindConfig)
    diagnostics: DiagnosticsConfig = described("training diagnostics",
                                               factory=DiagnosticsConfig)
    seed: int = described("seed of initialization, data order and augmentation")
    progress: bool = described("a progress bar (or progress lines when not a terminal)")
    compile_cache_dir: str | None = described(
        "XLA's persistent compilation cache folder (null: off)")


ConfigStore.instance().store(name="config_schema", node=Config)
