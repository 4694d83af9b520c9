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
* Snapshot ensembles (Huang et al. 2017): the `cyclic_cosine` schedule (cnnlab/optim.py) saves
  the weights at the end of each cycle in <run_dir>/snapshots/<step>; `eval.weights=snapshots`
  makes each of them an ensemble member.
* Averaged weights (`eval.ema_decay`, cnnlab/steps.py): `eval.weights=ema` evaluates the
  bias-corrected moving average kept in the latest checkpoint.

Members are evaluated on the device in jitted batches; only their (N, K) log-probabilities come
back to the host, once per member, where the ensemble is combined.
"""

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cnnlab import steps
from cnnlab.config import Config, fixed_square_crop_scale, resolve_presets, validate_eval
from cnnlab.errors import ConfigError

SNAPSHOT_DIR = "snapshots"
HYDRA_CONFIG = Path(".hydra") / "config.yaml"


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


def make_views(tta: str, augment: DictConfig | None = None, crop_size: int | None = None,
               image_shape: Sequence[int] | None = None) -> steps.Views | None:
    """The views `eval.tta` names, as a function of a raw uint8 batch; None for `none`.
    ten_crop needs the run's `augment` config and image shape (`ten_crop_geometry`)."""
    if tta == "none":
        return None
    if tta == "flip":
        return flip_views
    if tta == "ten_crop":
        if augment is None or image_shape is None:
            raise ValueError("ten_crop needs the augment config and the image shape")
        pad, side = ten_crop_geometry(augment, crop_size, image_shape)
        return lambda images: ten_crop_views(images, pad, side)
    raise ConfigError(f"eval.tta='{tta}'; valid choices: none, flip, ten_crop")


# ---------------------------------------------------------------------------------- ensembles


def ensemble_log_probs(member_log_probs: Sequence[np.ndarray]) -> np.ndarray:
    """log of the mean of the members' probabilities, (N, K) from M arrays of (N, K); computed
    as logsumexp - log M so that a member's near-zero probability does not underflow."""
    stacked = np.stack([np.asarray(m, np.float64) for m in member_log_probs])
    return np.logaddexp.reduce(stacked, axis=0) - math.log(len(member_log_probs))


def prob_metrics(log_probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Error (percent, argmax of the probabilities) and mean negative log-likelihood."""
    log_probs, labels = np.asarray(log_probs), np.asarray(labels)
    picked = np.take_along_axis(log_probs, labels[:, None].astype(np.int64), axis=1)[:, 0]
    return {"error": 100.0 * float(np.mean(np.argmax(log_probs, axis=1) != labels)),
            "loss": float(-np.mean(picked))}


# ------------------------------------------------------------------------------- cnnlab eval


def load_run_config(run_dir: Path) -> DictConfig:
    """The config a run was trained with: what Hydra saved in <run_dir>/.hydra/config.yaml,
    typed by the current schema (keys added since then take their defaults)."""
    path = Path(run_dir) / HYDRA_CONFIG
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a cnnlab run directory: no {HYDRA_CONFIG}")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(path))
        resolve_presets(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path}: {str(e).splitlines()[0]}") from None
    return cfg


@dataclasses.dataclass
class Member:
    """One ensemble member: a run's weights at one step, and its test log-probabilities."""

    run_dir: Path
    weights: str
    step: int
    log_probs: np.ndarray  # (N, K)


def _checkpoint_steps(directory: Path, what: str, run_dir: Path) -> list[int]:
    from cnnlab.checkpoint import Checkpointer

    if not directory.is_dir():
        raise ConfigError(f"{run_dir} has no {what} ({directory.name}/ is missing)")
    checkpointer = Checkpointer(directory, keep=None)
    found = checkpointer.all_steps()
    checkpointer.close()
    if not found:
        raise ConfigError(f"{run_dir} has no {what} (nothing saved in {directory.name}/)")
    return sorted(found)


def _weights_to_restore(run_dir: Path, cfg: DictConfig, weights: str) -> tuple[Path, list[int]]:
    """The checkpoint folder and steps `eval.weights` selects for one run."""
    from cnnlab.train import BEST_DIR, CHECKPOINT_DIR

    if weights == "snapshots":
        return run_dir / SNAPSHOT_DIR, _checkpoint_steps(run_dir / SNAPSHOT_DIR,
                                                         "snapshots (schedule=cyclic_cosine)",
                                                         run_dir)
    if weights == "best":
        what = ("best checkpoint (kept with dataset.val_size > 0 and "
                "early_stopping.keep_best=true)")
        return run_dir / BEST_DIR, _checkpoint_steps(run_dir / BEST_DIR, what, run_dir)[-1:]
    if weights == "ema" and cfg.eval.ema_decay is None:
        raise ConfigError(f"{run_dir} was trained without eval.ema_decay: it has no averaged "
                          "weights")
    return run_dir / CHECKPOINT_DIR, _checkpoint_steps(run_dir / CHECKPOINT_DIR, "checkpoint",
                                                       run_dir)[-1:]


def _predict(predict_batch: Any, params: Any, batch_stats: Any, split: steps.DeviceSplit,
             batch_size: int, count: int) -> np.ndarray:
    batches = [predict_batch(params, batch_stats, split, index)
               for index in range(split.labels.shape[0] // batch_size)]
    # One transfer per member: the batches are joined on the device first.
    return np.asarray(jax.device_get(jnp.concatenate(batches)[:count]))


def evaluate_runs(run_dirs: Sequence[Path], ev: DictConfig) -> dict[str, Any]:
    """Evaluate each run's `ev.weights` with `ev.tta` on its dataset's test split; with more
    than one member, also their ensemble. Returns the report `format_report` prints."""
    from cnnlab.checkpoint import Checkpointer
    from cnnlab.models import build_model
    from cnnlab.optim import make_optimizer, make_schedule
    from cnnlab.train import check_declared_shapes, init_state, load_data, to_device

    run_dirs = [Path(d) for d in run_dirs]
    if not run_dirs:
        raise ConfigError("cnnlab eval needs at least one run directory")
    # Every run's config is checked before any data is read or anything compiles.
    configs = [load_run_config(d) for d in run_dirs]
    for run_dir, cfg in zip(run_dirs, configs, strict=True):
        try:
            validate_eval(ev, cfg.augment, cfg.dataset.image_shape)
        except ConfigError as e:
            raise ConfigError(f"{run_dir}: {e}") from None
        _weights_to_restore(run_dir, cfg, ev.weights)

    datasets: dict[str, Any] = {}
    members: list[Member] = []
    reference: tuple[Path, Any] | None = None
    for run_dir, cfg in zip(run_dirs, configs, strict=True):
        key = OmegaConf.to_yaml(cfg.dataset)
        if key not in datasets:
            datasets[key] = load_data(cfg)
            check_declared_shapes(cfg, datasets[key])
        dataset = datasets[key]
        if reference is None:
            reference = (run_dir, dataset)
        elif not _same_test_set(reference[1], dataset):
            first_dir, first = reference
            raise ConfigError(
                f"{run_dir} ({dataset.name}, {dataset.num_classes} classes, "
                f"{len(dataset.test)} test examples) and {first_dir} ({first.name}, "
                f"{first.num_classes} classes, {len(first.test)} test examples) do not share a "
                "test set; an ensemble needs the same examples and classes")

        batch_size = ev.batch_size or cfg.train.eval_batch_size
        model = build_model(cfg, dataset.num_classes)
        tx = make_optimizer(cfg.optimizer, make_schedule(cfg.schedule, cfg.optimizer.lr,
                                                         cfg.train.steps))
        like = init_state(cfg, model, tx, dataset.image_shape)
        views = make_views(ev.tta, cfg.augment, ev.crop_size, dataset.image_shape)
        predict_batch = steps.make_predict_batch(model, batch_size, views)
        split = to_device(dataset.test, dataset, batch_size)
        directory, restore_steps = _weights_to_restore(run_dir, cfg, ev.weights)
        checkpointer = Checkpointer(directory, keep=None)
        try:
            for step in restore_steps:
                state, _ = checkpointer.restore(step, like)
                params, batch_stats = state.params, state.batch_stats
                if ev.weights == "ema":
                    params, batch_stats = steps.ema_variables(state.ema, cfg.eval.ema_decay)
                log_probs = _predict(predict_batch, params, batch_stats, split, batch_size,
                                     len(dataset.test))
                members.append(Member(run_dir, ev.weights, step, log_probs))
        finally:
            checkpointer.close()

    assert reference is not None
    labels = reference[1].test.labels
    report: dict[str, Any] = {
        "dataset": reference[1].name, "split": configs[0].dataset.test_split,
        "examples": int(len(labels)), "tta": ev.tta, "weights": ev.weights,
        "members": [{"run_dir": str(m.run_dir), "weights": m.weights, "step": m.step,
                     **prob_metrics(m.log_probs, labels)} for m in members],
        "ensemble": None,
    }
    if len(members) > 1:
        combined = ensemble_log_probs([m.log_probs for m in members])
        report["ensemble"] = {"members": len(members), **prob_metrics(combined, labels)}
    return report


def _same_test_set(a: Any, b: Any) -> bool:
    return (a.name == b.name and a.num_classes == b.num_classes
            and np.array_equal(a.test.labels, b.test.labels))


def format_report(report: dict[str, Any], fmt: str = "table") -> str:
    """`fmt` json: the report as JSON; table: a row per member, then the ensemble."""
    if fmt == "json":
        return json.dumps(report, indent=2)
    rows = [(m["run_dir"], m["weights"], str(m["step"]), f"{m['error']:.2f}",
             f"{m['loss']:.4f}") for m in report["members"]]
    if report["ensemble"] is not None:
        ens = report["ensemble"]
        rows.append((f"ensemble of {ens['members']}", "", "", f"{ens['error']:.2f}",
                     f"{ens['loss']:.4f}"))
    header = ("member", "weights", "step", "error %", "loss")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1]),
                 *(cell.rjust(width) for cell, width in zip(row[2:], widths[2:], strict=True))]
        return "  ".join(cells).rstrip()

    title = (f"{report['dataset']} {report['split']} split, {report['examples']} examples, "
             f"tta={report['tta']}")
    return "\n".join([title, line(header), *(line(r) for r in rows)])
