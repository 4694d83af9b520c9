"""The config checks of the `dataset` section that need no data, and what the config can know
before any image is read (`resolve`: a folder's shapes and sizes, the classes' num_classes)."""

from __future__ import annotations

from typing import Any

from cnnlab.data import folder as folder_data
from cnnlab.data.subsets import check_classes, check_per_class
from cnnlab.errors import ConfigError, require


def validate(ds: Any) -> None:
    """The `dataset` keys that can be checked before any data is read."""
    require(ds.val_size >= 0, f"dataset.val_size={ds.val_size} must be >= 0")
    _validate_folds(ds)
    require(
        ds.max_examples is None or ds.max_examples > 0,
        f"dataset.max_examples={ds.max_examples} must be positive or null",
    )
    require(
        ds.cache_max_gb is None or ds.cache_max_gb > 0,
        f"dataset.cache_max_gb={ds.get('cache_max_gb')} must be positive or null (no limit)",
    )
    shape = ds.image_shape
    require(
        shape is None or (len(shape) == 3 and min(shape) > 0),
        f"dataset.image_shape={shape} must be [height, width, channels] or null",
    )
    _validate_subsets(ds)
    _validate_folder(ds)


def _validate_folds(ds: Any) -> None:
    folds, fold = ds.folds, ds.fold or 0
    if folds is None:
        require(fold == 0, f"dataset.fold={fold} needs dataset.folds=K (cross-validation)")
        return
    require(folds >= 2, f"dataset.folds={folds} must be >= 2 or null (no cross-validation)")
    require(0 <= fold < folds, f"dataset.fold={fold} must be in [0, {folds}) "
            f"(dataset.folds={folds})")
    require(ds.val_size == 0, f"dataset.folds={folds} and dataset.val_size={ds.val_size} both "
            "choose the validation split: set dataset.val_size=0 with folds")


def _validate_subsets(ds: Any) -> None:
    """per_class and classes; the classes' range is checked by resolve (against the declared
    num_classes) and again on the data."""
    try:
        check_per_class(ds.per_class)
        if ds.classes is not None:
            check_classes(list(ds.classes), None)
    except ValueError as e:
        raise ConfigError(str(e)) from None


# The keys only dataset=folder reads: null for every other dataset (a value would be unused).
FOLDER_KEYS = ("path", "image_size", "resize", "channels", "test_fraction")


def _validate_folder(ds: Any) -> None:
    if ds.name != folder_data.NAME:
        for key in FOLDER_KEYS:
            require(ds.get(key) is None, f"dataset.{key}={ds.get(key)} is read by dataset=folder "
                    f"only; dataset {ds.name} needs it null")
        return
    require(ds.path is not None, "dataset=folder needs dataset.path=DIR: a folder of "
            "DIR/<class>/<image> or DIR/train/<class>/<image> + DIR/test/<class>/<image>")
    size = ds.image_size
    require(size is not None and len(size) == 2 and min(size) > 0,
            f"dataset.image_size={size} must be [height, width] (positive): dataset=folder "
            "resizes every image to it")
    require(ds.resize in folder_data.RESIZES,
            f"dataset.resize={ds.resize}; valid choices: {', '.join(folder_data.RESIZES)}")
    require(ds.channels in folder_data.CHANNELS,
            f"dataset.channels={ds.channels} must be 1 (greyscale) or 3 (RGB)")
    require(ds.test_fraction is not None and 0 < ds.test_fraction < 1,
            f"dataset.test_fraction={ds.test_fraction} must be in (0, 1)")


def folder_spec(ds: Any) -> folder_data.FolderSpec | None:
    """The folder `ds` (a dataset config) describes, or None for a TFDS dataset."""
    if ds.name != folder_data.NAME:
        return None
    return folder_data.FolderSpec(
        path=str(ds.path), image_size=(int(ds.image_size[0]), int(ds.image_size[1])),
        resize=ds.resize, channels=int(ds.channels), test_fraction=float(ds.test_fraction),
        train_split=ds.train_split, test_split=ds.test_split)


def resolve(ds: Any) -> None:
    """Fill in what the config can know before reading any image, so that `cnnlab summary`, the
    geometry check and train.epochs work: a folder's image_shape (image_size x channels),
    num_classes (its class folders) and train_size (its train images) where null; with
    dataset.classes, num_classes becomes len(classes), the classes the model tells apart.

    Idempotent (a saved run's config is resolved again when loaded): num_classes ==
    len(classes) counts as resolved.
    """
    if ds.name == folder_data.NAME and ds.path is not None and ds.image_size is not None:
        _validate_folder(ds)
        shape, num_classes, train_size = folder_data.describe(folder_spec(ds))
        for key, value in (("image_shape", shape), ("num_classes", num_classes),
                           ("train_size", train_size)):
            if ds[key] is None:
                ds[key] = value
    classes = ds.classes
    if classes is None or ds.num_classes == len(classes):
        return
    try:
        check_classes(list(classes), ds.num_classes)
    except ValueError as e:
        raise ConfigError(f"{e} (dataset {ds.name})") from None
    ds.num_classes = len(classes)
