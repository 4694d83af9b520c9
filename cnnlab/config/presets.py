"""Keys a composed config derives from others before validation: the dataset's derived shapes,
`train.steps` from `train.epochs`, the chunk size fitted to the loop's boundaries, and
`augment: default` replaced by the preset the dataset names."""

import logging
import math

from omegaconf import DictConfig, OmegaConf, open_dict

from cnnlab.config.groups import AUGMENT_BASE, group_options, option_values
from cnnlab.config.schema import AugmentConfig
from cnnlab.errors import ConfigError

log = logging.getLogger(__name__)


def steps_from_epochs(cfg: DictConfig) -> None:
    """`train.epochs=E` sets `train.steps` to ceil(E x images / batch): the images are the train
    split's, after `dataset.max_examples` and less the `dataset.val_size` held out, as the
    trainer will see them. Refused where the split's size is not known from the config."""
    epochs, ds = cfg.train.epochs, cfg.dataset
    if epochs is None:
        return
    if not (isinstance(epochs, int | float) and math.isfinite(epochs) and epochs > 0):
        raise ConfigError(f"train.epochs={epochs} must be a positive number or null")
    subsets = [f"dataset.{key}={ds.get(key)}" for key in ("classes", "per_class")
               if ds.get(key) is not None]
    if subsets:
        # What they keep depends on each class's count, which no config declares: refusing
        # beats a schedule sized for the whole split (the loading line logs the kept count).
        raise ConfigError(f"train.epochs counts dataset.train_size, which {' and '.join(subsets)} "
                          "shrink by an amount known only once the data is read: set "
                          "train.steps instead (the loading line logs the train images)")
    if ds.train_size is None or ds.train_split != "train":
        raise ConfigError(
            f"train.epochs needs the size of dataset.train_split={ds.train_split!r} before the "
            f"data is read, and dataset {ds.name} declares dataset.train_size only for 'train'"
            if ds.train_size is not None else
            f"train.epochs needs dataset.train_size, which dataset {ds.name} does not declare: "
            "set dataset.train_size=N, or train.steps instead")
    images = min(ds.train_size, ds.max_examples or ds.train_size)
    folds = ds.folds
    # A fold holds n // k images, one more for the first n % k folds
    # (cnnlab.data.subsets.fold_split).
    images -= ds.val_size if not folds else images // folds + ((ds.fold or 0) < images % folds)
    if images < 1:
        return  # validation of dataset.val_size reports it
    steps = math.ceil(epochs * images / cfg.train.batch_size)
    log.info("train.epochs=%s: train.steps=%d (%d images, batch %d)", epochs, steps, images,
             cfg.train.batch_size)
    cfg.train.steps = steps


def fit_steps_per_call(cfg: DictConfig) -> None:
    """Lower `train.steps_per_call` to the largest chunk that ends on every step the host must
    act at (logging, evaluation, checkpoints, diagnostics, the end of a snapshot cycle), so that any
    `train.log_every` works: the chunk size is a speed setting, not one users must plan around.
    Same steps, same numbers: only how many of them one compiled call runs changes."""
    train = cfg.train
    if not all(isinstance(v, int) and v > 0 for v in (train.steps_per_call, train.log_every)):
        return  # validation reports it
    boundaries = [train.log_every, train.eval_every, cfg.checkpoint.every,
                  OmegaConf.select(cfg, "diagnostics.every")]
    if cfg.schedule.name == "cyclic_cosine" and cfg.schedule.cycles >= 1:
        boundaries.append(-(-train.steps // cfg.schedule.cycles))  # ceil: one cycle's steps
    fitted = train.steps_per_call
    for every in boundaries:
        if isinstance(every, int) and every > 0:
            fitted = math.gcd(fitted, every)
    if fitted != train.steps_per_call:
        log.info("train.steps_per_call %d -> %d: chunks of steps must end at every %s",
                 train.steps_per_call, fitted,
                 ", ".join(str(b) for b in boundaries if isinstance(b, int) and b > 0))
        train.steps_per_call = fitted


def resolve_presets(cfg: DictConfig) -> None:
    """Fill in the dataset's derived keys (cnnlab.data.validate.resolve), set `train.steps` from
    `train.epochs` (steps_from_epochs), fit `train.steps_per_call` (fit_steps_per_call), and
    replace `augment: default` by the preset the dataset names, so
    logs show what ran.

    Keys set on the command line (`augment.cutout=16`) stay on top of the preset: they are the
    ones that differ from conf/augment/_base.yaml, which is all that `default.yaml` holds. (So
    `augment.flip=false`, the base's value, cannot undo a preset's flip: name the preset.)
    """
    from cnnlab.data.validate import resolve

    resolve(cfg.dataset)  # a folder's shapes and sizes, classes' num_classes: used below
    steps_from_epochs(cfg)
    fit_steps_per_call(cfg)
    if cfg.augment.name != "default":
        return
    preset = cfg.dataset.default_augment
    if preset not in group_options("augment") or preset == "default":
        raise ConfigError(
            f"dataset.default_augment='{preset}'; valid choices: "
            + ", ".join(o for o in group_options("augment") if o != "default")
        )
    with open_dict(cfg):
        base = option_values("augment", AUGMENT_BASE)
        overrides = {key: value for key, value in cfg.augment.items()
                     if key != "name" and value != base[key]}
        cfg.augment = OmegaConf.merge(OmegaConf.structured(AugmentConfig),
                                      option_values("augment", preset), overrides)
