"""Evaluation techniques and `cnnlab eval`: test-time augmentation, ensembles of runs and of
snapshots, averaged (EMA) weights.

* Test-time augmentation (`eval.tta`) classifies several views of each raw test image and
  averages the softmaxes (Krizhevsky et al. 2012, sec. 4.1: "averaging the predictions made by
  the network's softmax layer on the ten patches"). `flip`: the image and its mirror image.
  `ten_crop`: the four corner windows and the centre window, each also mirrored. The windows'
  geometry follows how the model was trained (`ten_crop_geometry`): with `augment.crop_pad = p`,
  training saw windows of the image's size cut from the image zero-padded by p, so the ten
  windows are the extreme and central ones of those (the centre one is the image itself); with
  augment=alexnet's fixed-scale square crops, or `eval.crop_size = N`, they are windows of that
  side cut from the image itself (AlexNet's 224 of 256), scaled back to the image's size as the
  training crops were. The views are made from the raw uint8 pixels, before preprocessing, as
  the training augmentation is.
* Ensembles average the members' softmaxes (the usual model averaging, e.g. Krizhevsky et al.
  2012 sec. 6, He et al. 2016 sec. 3.4); each member may itself use test-time augmentation.
* Snapshot ensembles (Huang et al. 2017): the `cyclic_cosine` schedule (cnnlab/training/optim.py)
saves
  the weights at the end of each cycle in <run_dir>/snapshots/<step>; `eval.weights=snapshots`
  makes each of them an ensemble member.
* Averaged weights (`eval.ema_decay`, cnnlab/training/steps.py): `eval.weights=ema` evaluates the
  bias-corrected moving average kept in the latest checkpoint.

Members are evaluated on the device in jitted batches; only their (N, K) log-probabilities come
back to the host, once per member, where the ensemble is combined.
"""

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from omegaconf import DictConfig

from cnnlab import progress
from cnnlab.data.device import DeviceSplit
from cnnlab.errors import ConfigError, require
from cnnlab.registry import Registry
from cnnlab.runs.weights import WEIGHTS, ema_variables
from cnnlab.training import steps

log = logging.getLogger(__name__)

# ------------------------------------------------------------------- test-time augmentation


def flip_views(images: jax.Array) -> jax.Array:
    """(B, H, W, C) -> (2, B, H, W, C): the images and their left-right mirror images."""
    return jnp.stack([images, images[:, :, ::-1, :]])


def ten_crop_offsets(height: int, width: int, crop_height: int,
                     crop_width: int) -> list[tuple[int, int]]:
    """Top-left corners (row, column) of the five windows: top-left, top-right, bottom-left,
    bottom-right, centre (rounded towards the top-left when the margin is odd)."""
    dy, dx = height - crop_height, width - crop_width
    return [(0, 0), (0, dx), (dy, 0), (dy, dx), (dy // 2, dx // 2)]


def _resize_uint8(images: jax.Array, height: int, width: int) -> jax.Array:
    # Bilinear; rounded back to uint8 so that preprocessing sees pixels of the usual type.
    shape = (*images.shape[:-3], height, width, images.shape[-1])
    resized = jax.image.resize(images.astype(jnp.float32), shape, "bilinear")
    return jnp.clip(jnp.round(resized), 0, 255).astype(jnp.uint8)


def ten_crop_views(images: jax.Array, crop_pad: int, crop_size: int | None) -> jax.Array:
    """(B, H, W, C) -> (10, B, H, W, C): five windows (`ten_crop_offsets` order), then the same
    five mirrored. `crop_size` None: HxW windows of the images zero-padded by `crop_pad`;
    otherwise crop_size x crop_size windows of the images, resized to HxW."""
    _, height, width, _ = images.shape
    if crop_size is None:
        pad = ((0, 0), (crop_pad, crop_pad), (crop_pad, crop_pad), (0, 0))
        source, (crop_h, crop_w) = jnp.pad(images, pad), (height, width)
    else:
        source, crop_h, crop_w = images, crop_size, crop_size
    crops = jnp.stack([source[:, y:y + crop_h, x:x + crop_w, :] for y, x in
                       ten_crop_offsets(source.shape[1], source.shape[2], crop_h, crop_w)])
    if (crop_h, crop_w) != (height, width):
        crops = _resize_uint8(crops, height, width)
    return jnp.concatenate([crops, crops[:, :, :, ::-1, :]])


def ten_crop_geometry(augment: DictConfig, crop_size: int | None,
                      image_shape: Sequence[int]) -> tuple[int, int | None]:
    """(padding, window side) of ten_crop for a model trained with `augment`, in this order:
    eval.crop_size N: NxN windows of the image (no padding); augment.crop_pad p: windows of the
    image's size on the image padded by p (side None); augment=alexnet's fixed-scale square
    crops: windows of that side, sqrt(scale) * the image's side (224 for 256)."""
    if crop_size is not None:
        return 0, crop_size
    if augment.crop_pad > 0:
        return augment.crop_pad, None
    scale = fixed_square_crop_scale(augment)
    if scale is None:
        raise ConfigError("eval.tta=ten_crop needs augment.crop_pad > 0, fixed-scale square "
                          "crops (augment=alexnet) or eval.crop_size")
    return 0, max(1, round(math.sqrt(scale) * min(image_shape[0], image_shape[1])))


ViewMaker = Callable[[DictConfig, int | None, Sequence[int]], steps.Views | None]
# eval.tta: each mode's views as a function of the run's augment config, eval.crop_size and the
# image shape (ten_crop follows the training crops: `ten_crop_geometry`).
TTA_MODES: Registry[ViewMaker] = Registry("eval.tta")
TTA_MODES.register("none", lambda augment, crop_size, image_shape: None)
TTA_MODES.register("flip", lambda augment, crop_size, image_shape: flip_views)


@TTA_MODES.register("ten_crop")
def _ten_crop(augment: DictConfig, crop_size: int | None,
              image_shape: Sequence[int]) -> steps.Views:
    pad, side = ten_crop_geometry(augment, crop_size, image_shape)
    return lambda images: ten_crop_views(images, pad, side)


def make_views(tta: str, augment: DictConfig, crop_size: int | None,
               image_shape: Sequence[int]) -> steps.Views | None:
    """The views `eval.tta` names, as a function of a raw uint8 batch; None for `none`."""
    return TTA_MODES.get(tta)(augment, crop_size, image_shape)


def fixed_square_crop_scale(augment: DictConfig) -> float | None:
    """The area fraction of `resized_crop` when every window is the same square (augment=alexnet:
    224^2 / 256^2), else None; ten_crop then takes windows of that size."""
    if not augment.resized_crop:
        return None
    scale, ratio = list(augment.crop_scale), list(augment.crop_ratio)
    return scale[0] if scale[0] == scale[1] and ratio == [1.0, 1.0] else None


# ---------------------------------------------------------------------------------- ensembles


def ensemble_log_probs(member_log_probs: Sequence[np.ndarray]) -> np.ndarray:
    """log of the mean of the members' probabilities, (N, K) from M arrays of (N, K); computed
    as logsumexp - log M so that a member's near-zero probability does not underflow."""
    stacked = np.stack([np.asarray(m, np.float64) for m in member_log_probs])
    return np.logaddexp.reduce(stacked, axis=0) - math.log(len(member_log_probs))


def label_rank(log_probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """NumPy's `steps.label_rank`: the label's place in each row, ties towards lower indices."""
    labels = np.asarray(labels).astype(np.int64)
    picked = np.take_along_axis(log_probs, labels[:, None], axis=1)
    lower = np.arange(log_probs.shape[1]) < labels[:, None]
    return np.sum((log_probs > picked) | ((log_probs == picked) & lower), axis=1)


def top_k_error_key(top_k: int | None, num_classes: int) -> str | None:
    """`top<k>_error` where it is reported (eval.top_k set and below the class count)."""
    return f"top{top_k}_error" if top_k is not None and num_classes > top_k else None


def prob_metrics(log_probs: np.ndarray, labels: np.ndarray,
                 top_k: int | None = None) -> dict[str, float]:
    """Error (percent, argmax of the probabilities), mean negative log-likelihood and, with
    `top_k` below the class count, the top-k error (`label_rank`, as on the device)."""
    log_probs, labels = np.asarray(log_probs), np.asarray(labels)
    picked = np.take_along_axis(log_probs, labels[:, None].astype(np.int64), axis=1)[:, 0]
    metrics = {"error": 100.0 * float(np.mean(np.argmax(log_probs, axis=1) != labels)),
               "loss": float(-np.mean(picked))}
    if key := top_k_error_key(top_k, log_probs.shape[1]):
        metrics[key] = 100.0 * float(np.mean(label_rank(log_probs, labels) >= top_k))
    return metrics


def confusion_matrix(log_probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(K, K) int64 counts, row = true label, column = argmax prediction."""
    k = np.shape(log_probs)[1]
    cells = np.asarray(labels).astype(np.int64) * k + np.argmax(log_probs, axis=1)
    return np.bincount(cells, minlength=k * k).reshape(k, k)


# ---------------------------------------------------------------------- evaluation in training


class Evaluator:
    """Evaluates a train state on the held-out splits; one compiled function for all of them.

    Keys are `<split>/loss`, `<split>/error` (and `<split>/top<k>_error` with `top_k` below
    the class count); with `ema_decay` also `<split>_ema/...` (the averaged weights), with
    `views` (eval.tta) also `<split>_tta/...` (the raw weights). Each call's (K, K) confusion
    counts stay on the device in `confusions` (`<split><variant>` -> array) until asked for.
    Each call logs its start and, with the time per split, its end; the first also compiles
    (once per split shape and variant), which is timed and logged apart.
    """

    def __init__(self, model: Any, splits: dict[str, DeviceSplit], batch_size: int,
                 ema_decay: float | None = None, views: steps.Views | None = None,
                 top_k: int | None = None, clock: progress.Clock = time.perf_counter,
                 batch_sharding: Any = None, compiler_options: dict | None = None) -> None:
        self.batch_size = batch_size
        self.splits = splits
        # The real examples (the splits are padded to whole batches), for the log lines.
        self.sizes = {name: len(split) if hasattr(split, "device_batches")
                      else int(np.sum(jax.device_get(split.mask)))
                      for name, split in splits.items()}
        self._eval_batch = steps.make_eval_batch(model, batch_size, top_k=top_k,
                                                 batch_sharding=batch_sharding,
                                                 compiler_options=compiler_options)
        self._tta_batch = (steps.make_eval_batch(model, batch_size, views, top_k, batch_sharding,
                                                 compiler_options) if views else None)
        # The latest call's confusion counts by `<split><variant>`: fetched only when written.
        self.confusions: dict[str, jax.Array] = {}
        self._ema_decay = ema_decay
        self.clock = clock
        self.compiles = progress.CompileTimer(clock)

    def _sums(self, variant: str, eval_batch: Any, params: Any, batch_stats: Any,
              name: str) -> dict[str, float]:
        sums = None
        for split, index in _batches(self.splits[name], self.batch_size):
            # Each split's shape and each variant compile on their first batch.
            batch, _ = self.compiles.call((variant, name), eval_batch, params, batch_stats,
                                          split, index)
            sums = batch if sums is None else jax.tree.map(jnp.add, sums, batch)
        # The scalars come to the host (one transfer); the counts stay until a run writes them.
        self.confusions[f"{name}{variant}"] = sums.pop("confusion")
        return steps.summarize(jax.device_get(sums))

    def __call__(self, state: steps.TrainState, label: str = "") -> dict[str, float]:
        """The metrics of `state`; `label` (`step 1,000`) begins its log lines."""
        variants = [("", self._eval_batch, state.params, state.batch_stats)]
        if self._ema_decay is not None:
            variants.append(("_ema", self._eval_batch,
                             *ema_variables(state.ema, self._ema_decay)))
        if self._tta_batch is not None:
            variants.append(("_tta", self._tta_batch, state.params, state.batch_stats))
        prefix = f"{label}: " if label else ""
        what = ", ".join(f"{name} ({self.sizes[name]:,} images)" for name in self.splits)
        compiling = self.compiles.is_new(("", next(iter(self.splits), "")))
        log.info("%s%s %s", prefix, "compiling the evaluation, then evaluating" if compiling
                 else "evaluating", what)
        compiled, results, took = self.compiles.seconds, {}, []
        for name in self.splits:
            start, before = self.clock(), self.compiles.seconds
            for suffix, eval_batch, params, batch_stats in variants:
                for key, value in self._sums(suffix, eval_batch, params, batch_stats,
                                             name).items():
                    results[f"{name}{suffix}/{key}"] = value
            spent = self.clock() - start - (self.compiles.seconds - before)
            took.append(f"{name} in {progress.duration(spent)}")
        if self.compiles.seconds > compiled:
            log.info("compiled the evaluation in %s",
                     progress.duration(self.compiles.seconds - compiled))
        log.info("%sevaluated %s", prefix, ", ".join(took))
        return results


def _batches(split: Any, batch_size: int) -> Any:
    """(split, index) of each eval batch: a device-resident split's slices, or a streamed one's
    (cnnlab.data.stream.EvalStream) batches, each a one-batch split, through the same function."""
    if hasattr(split, "device_batches"):
        return split.device_batches(batch_size)
    return ((split, index) for index in range(split.labels.shape[0] // batch_size))


REPORT_FORMATS = ("table", "json")



def validate(ev: DictConfig, augment: DictConfig, image_shape: Any = None) -> None:
    """The `eval` keys; `augment` (the training crops) and the image shape fix ten_crop."""
    require(ev.ema_decay is None or 0 < ev.ema_decay < 1,
            f"eval.ema_decay={ev.ema_decay} must be in (0, 1) or null")
    TTA_MODES.get(ev.tta)
    require(ev.crop_size is None or ev.crop_size > 0,
            f"eval.crop_size={ev.crop_size} must be a positive integer or null")
    if ev.tta == "ten_crop":
        require(ev.crop_size is not None or augment.crop_pad > 0
                or fixed_square_crop_scale(augment) is not None,
                "eval.tta=ten_crop needs training crops of one size (augment.crop_pad > 0, or "
                "augment=alexnet's fixed-scale crops) or a window size eval.crop_size=N")
    if ev.crop_size is not None and image_shape is not None:
        side = min(image_shape[0], image_shape[1])
        require(ev.crop_size <= side, f"eval.crop_size={ev.crop_size} exceeds the "
                f"{image_shape[0]}x{image_shape[1]} images")
    WEIGHTS.get(ev.weights)
    require(ev.format in REPORT_FORMATS,
            f"eval.format='{ev.format}'; valid choices: {', '.join(REPORT_FORMATS)}")
    require(ev.batch_size is None or ev.batch_size > 0,
            f"eval.batch_size={ev.batch_size} must be a positive integer or null")
    require(ev.top_k is None or ev.top_k >= 2,
            f"eval.top_k={ev.top_k} must be an integer >= 2 or null (top-1 is the error)")


# --------------------------------------------------------------------- multi-scale evaluation
#
# `eval.scales=[Q1, Q2, ...]` (Simonyan & Zisserman 2015 sec. 3.2 and 4.2; He et al. 2016
# sec. 3.4): each raw test image is resized so that its shorter side is Q (bilinear, rounded
# back to uint8 as the ten_crop windows are), for every Q; `eval.scale_mode` says how the resized
# image is classified, and the softmaxes are averaged over the scales. `eval.tta` composes: its
# views are made of each scale's image, averaged within the scale, then over the scales.


def scaled_size(side: int, height: int, width: int) -> tuple[int, int]:
    """(height, width) of an image whose shorter side is resized to `side` (torchvision's
    Resize: the longer side int(side * long / short))."""
    other = side * max(height, width) // min(height, width)
    return (side, other) if height <= width else (other, side)


def resize_shorter_side(images: jax.Array, side: int) -> jax.Array:
    """(B, H, W, C) uint8 -> the images with their shorter side `side`; the images themselves
    when that is their size."""
    height, width = scaled_size(side, images.shape[-3], images.shape[-2])
    if (height, width) == images.shape[-3:-1]:
        return images
    return _resize_uint8(images, height, width)


def centre_crop(images: jax.Array, height: int, width: int) -> jax.Array:
    """The central height x width window (rounded towards the top-left when the margin is odd,
    as `ten_crop_offsets`' centre window)."""
    top, left = (images.shape[-3] - height) // 2, (images.shape[-2] - width) // 2
    return images[..., top:top + height, left:left + width, :]


@dataclasses.dataclass(frozen=True)
class ScaleMode:
    """How an image resized to shorter side Q is classified: `view(images, Q, image_shape)`,
    and `check(scales, cfg)`, which raises ConfigError for a model or scale it cannot serve."""

    view: Callable[[jax.Array, int, Sequence[int]], jax.Array]
    check: Callable[[Sequence[int], DictConfig], None]


def _check_crop_scales(scales: Sequence[int], cfg: DictConfig) -> None:
    shape = cfg.dataset.image_shape
    side = min(shape[0], shape[1])
    require(min(scales) >= side, f"eval.scales={list(scales)} with eval.scale_mode=crop: a "
            f"{shape[0]}x{shape[1]} centre crop needs every scale >= {side} (the images' shorter "
            "side); smaller scales need eval.scale_mode=dense")


def _param_shapes(cfg: DictConfig, image_shape: tuple[int, ...]) -> Any:
    from cnnlab.models import abstract_variables, build_model

    model = build_model(cfg, cfg.dataset.num_classes or 10)
    return jax.tree.map(lambda leaf: leaf.shape, abstract_variables(model, image_shape))


def _check_dense_scales(scales: Sequence[int], cfg: DictConfig) -> None:
    """Dense evaluation feeds the whole resized image to the network, which only a model whose
    weights do not depend on the input size can take (global average pooling before the
    classifier; Simonyan & Zisserman's fully-convolutional test net)."""
    name = cfg.model.get("name", "the model")
    require(cfg.model.get("input_size") is None,
            f"eval.scale_mode=dense: model {name} brings every input to model.input_size="
            f"{cfg.model.get('input_size')} (model.input_fit={cfg.model.get('input_fit')}), so "
            "it sees no other scale; use eval.scale_mode=crop")
    require(cfg.preprocess.name in ("channel", "none"),
            f"eval.scale_mode=dense: preprocess={cfg.preprocess.name} holds statistics of "
            "train-size images, pixel by pixel; use preprocess=channel or eval.scale_mode=crop")
    shape = tuple(cfg.dataset.image_shape)
    native = _param_shapes(cfg, shape)
    for scale in scales:
        size = (*scaled_size(scale, shape[0], shape[1]), shape[2])
        try:
            same = _param_shapes(cfg, size) == native
        except ConfigError as e:
            raise ConfigError(f"eval.scales: at scale {scale} ({size[0]}x{size[1]}) {e}") from None
        require(same, f"eval.scale_mode=dense: model {name}'s head needs {shape[0]}x{shape[1]} "
                f"inputs (its weights change at scale {scale}: a flattened fc layer, no global "
                "average pooling); use eval.scale_mode=crop")


# eval.scale_mode: dense (the whole resized image) or crop (its centre, of the training size).
SCALE_MODES: Registry[ScaleMode] = Registry("eval.scale_mode")
SCALE_MODES.register("dense", ScaleMode(
    lambda images, scale, shape: resize_shorter_side(images, scale), _check_dense_scales))
SCALE_MODES.register("crop", ScaleMode(
    lambda images, scale, shape: centre_crop(resize_shorter_side(images, scale), shape[0],
                                             shape[1]), _check_crop_scales))


def multi_scale_views(views: steps.Views | None, scales: Sequence[int], mode: str,
                      image_shape: Sequence[int]) -> steps.Views:
    """A raw batch -> one stack of views per scale (steps.make_log_probs averages the
    softmaxes within each stack, then over the stacks): `views` (eval.tta) of each scale's image,
    or the image alone."""
    view = SCALE_MODES.get(mode).view

    def make(images: jax.Array) -> tuple[jax.Array, ...]:
        scaled = [view(images, scale, image_shape) for scale in scales]
        return tuple(views(x) if views is not None else x[None] for x in scaled)

    return make


def make_eval_views(ev: DictConfig, augment: DictConfig,
                    image_shape: Sequence[int]) -> steps.Views | None:
    """The views `eval.tta` names, at each of `eval.scales` when set; None when neither is."""
    views = make_views(ev.tta, augment, ev.crop_size, image_shape)
    if ev.scales is None:
        return views
    return multi_scale_views(views, list(ev.scales), ev.scale_mode, image_shape)


def validate_scales(ev: DictConfig, cfg: DictConfig) -> None:
    """`eval.scales` and `eval.scale_mode` for the run `cfg` (its model, data, preprocessing)."""
    if ev.scales is None:
        return
    scales = list(ev.scales)
    require(bool(scales) and all(isinstance(s, int) and s > 0 for s in scales),
            f"eval.scales={scales} must be a list of positive integers (shorter sides in "
            "pixels), or null")
    mode = SCALE_MODES.get(ev.scale_mode)
    if cfg.dataset.image_shape is not None:
        mode.check(scales, cfg)
