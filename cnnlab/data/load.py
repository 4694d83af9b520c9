"""A dataset loaded once into host NumPy arrays: its splits read (TFDS, cnnlab.data.tfds_reader,
or a folder of images, cnnlab.data.folder), the subsets and validation split taken
(cnnlab.data.subsets), and the per-channel statistics of the training images.

The trainer moves these arrays to the accelerator itself (cnnlab.data.device). Decoded splits
can be kept on disk between runs (cnnlab.data.cache), which spares later runs the decoding.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import numpy as np

from cnnlab.data import cache as data_cache
from cnnlab.data import folder as folder_data
from cnnlab.data import share as shares
from cnnlab.data import tfds_reader
from cnnlab.data.subsets import check_per_class, keep_per_class, select_classes, validation_split
from cnnlab.data.types import ArraySplit, Dataset, Source

log = logging.getLogger(__name__)

# Images per chunk when computing mean/std, bounding the float64 temporary to ~100 MB at 32x32x3.
_STATS_CHUNK = 4096
# Source row ids -> their decoded images (a multi-host process's share, cnnlab.data.share).
Decode = Callable[[np.ndarray], np.ndarray]
# The splits `load_dataset` reads unless told otherwise.
SPLITS = ("train", "test")


def load_dataset(
    name: str,
    *,
    data_dir: str | None = None,
    train_split: str = "train",
    test_split: str = "test",
    image_key: str = "image",
    label_key: str = "label",
    val_size: int = 0,
    val_seed: int = 0,
    download: bool = True,
    max_examples: int | None = None,
    cache_dir: str | None = None,
    cache_max_bytes: int | None = None,
    folds: int | None = None,
    fold: int = 0,
    classes: Sequence[int] | None = None,
    per_class: int | float | None = None,
    folder: folder_data.FolderSpec | None = None,
    splits: Sequence[str] = SPLITS,
    share: shares.Share | None = None,
) -> Dataset:
    """Loads a TFDS classification dataset, or a folder of images, into memory as NumPy arrays.

    Args:
      name: TFDS name, optionally with config/version (``"cifar10"``, ``"mnist:3.0.1"``).
      data_dir: TFDS data dir; ``None`` uses TFDS's default, which honours ``TFDS_DATA_DIR``.
      train_split, test_split: TFDS split names or slices (``"train[:50%]"``).
      image_key, label_key: feature names of the image and of its ``ClassLabel``.
      val_size: number of train examples held out (and removed from train) as validation.
      val_seed: seed of the hold-out permutation; independent of any training seed so the
        validation set stays the same across training runs.
      folds, fold: cross-validation (instead of ``val_size``): the train split in ``folds``
        parts of sizes differing by at most one, drawn by ``val_seed``; part ``fold`` becomes
        the validation split and is removed from train.
      download: whether a dataset missing from ``data_dir`` may be downloaded and prepared.
      max_examples: keep only the first ``max_examples`` of each split (quick runs and tests).
        The hold-out is drawn after truncation, so it depends on this value.
      cache_dir: folder of decoded splits (cnnlab.data.cache): a split read once is read back
        from ``.npy`` files instead of decoded again. ``None``: no cache.
      cache_max_bytes: the cache's size limit (least recently used entries go); ``None``: none.
      classes: keep only these classes, in every split, relabelled 0..len-1 in this order
        (before the validation hold-out). ``None``: all.
      per_class: keep N training images of each class (int), or that fraction of each (float
        in (0, 1), at least one image), after the validation hold-out, drawn by ``val_seed``;
        a smaller N keeps a subset of a larger N's images. ``None``: all.
      folder: read this folder of images (cnnlab.data.folder) instead of a TFDS dataset; then
        ``name`` only names the dataset in messages.
      splits: the splits read, of ``"train"`` and ``"test"`` (``cnnlab eval`` reads the test
        split alone); one left out is empty, and without the train split there is no
        validation split and ``mean``/``std`` are None (the caller has them from the run). A
        folder is read whole: its test images are drawn over all of its files.
      share: a multi-host process's share of the training split (cnnlab.data.share): the train
        split is then a ``LocalRows`` of this process's rows only, and of an array_record TFDS
        dataset only those rows are decoded (bypassing the data cache, which holds whole
        splits); the statistics are summed over the processes. ``None``: the whole split.

    Raises:
      DatasetUnavailableError: the dataset cannot be read from ``data_dir`` nor prepared.
      ValueError: inconsistent arguments (``val_size``, ``max_examples``, feature keys,
        ``classes``, ``per_class``); cnnlab.errors.ConfigError (a ValueError) for a folder
        that is missing, empty or not laid out as cnnlab.data.folder expects.
    """
    if val_size < 0:
        raise ValueError(f"val_size must be >= 0, got {val_size}")
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples must be >= 1 or None, got {max_examples}")
    check_per_class(per_class)

    start = time.perf_counter()
    log.info("loading %s", name if folder is None else f"{name} {folder.path}")
    cache = None if cache_dir is None else data_cache.SplitCache(cache_dir, cache_max_bytes)
    decode = None  # source row ids -> decoded images, when the train split is planned
    if folder is not None:
        source = _folder_source(folder, val_seed, max_examples, cache)
    else:
        source, decode = _tfds_source(
            name, data_dir, {"train": train_split, "test": test_split}, (image_key, label_key),
            download, max_examples, cache, splits, planned=share is not None)
    source = select_classes(source, classes)
    test = source.test if "test" in splits else empty_split(source.image_shape)
    if "train" in splits:
        train, val = _own_or_held_out_val(source, name, val_size, val_seed, folds, fold)
        train = keep_per_class(train, per_class, val_seed, source.num_classes)
        if decode is not None and val is not None:  # held out: every process holds all of it
            val = ArraySplit(decode(shares.ids_of(val)), val.labels)
        if share is not None:
            train = shares.local_rows(train, share, decode)
        mean, std = channel_mean_std(train.images, shares.total_of(train))
    else:
        train, val, mean, std = empty_split(source.image_shape), None, None, None
    log.info(
        "loaded %s in %.1f s%s: train=%d val=%d test=%d images of %s%s%s",
        name,
        time.perf_counter() - start,
        _cache_note(cache),
        len(train),
        0 if val is None else len(val),
        len(test),
        "x".join(map(str, source.image_shape)),
        f", classes={list(classes)}" if classes is not None else "",
        # Test errors of a cut test split are not comparable with published ones: say so.
        f" (max_examples={max_examples} cuts every split, test too)" if max_examples else "",
    )
    return Dataset(
        name=name,
        train=train,
        test=test,
        val=val,
        num_classes=source.num_classes,
        image_shape=source.image_shape,
        mean=mean,
        std=std,
        class_names=source.class_names,
    )


def empty_split(image_shape: Sequence[int]) -> ArraySplit:
    """A split with no images (one `load_dataset` was not asked to read)."""
    return ArraySplit(np.zeros((0, *image_shape), np.uint8), np.zeros((0,), np.int32))


def _tfds_source(name: str, data_dir: str | None, names: dict[str, str],
                 keys: tuple[str, str], download: bool, max_examples: int | None,
                 cache: data_cache.SplitCache | None, splits: Sequence[str],
                 planned: bool = False) -> tuple[Source, Decode | None]:
    """The train and test splits of a TFDS dataset (`names`: role -> TFDS split) through the
    cache; those not in `splits` are empty. `planned` (a multi-host process's share): the train
    split of an array_record dataset as row ids (cnnlab.data.share.row_ids), with the function
    that decodes the rows it names; else (source, None)."""
    image_key, label_key = keys
    # The features are checked before anything is downloaded.
    tfds_reader.feature_spec(tfds_reader.make_builder(name, data_dir), image_key, label_key)
    builder, read = tfds_reader.prepared(name, data_dir, download)
    image_shape, num_classes, class_names = tfds_reader.feature_spec(builder, image_key, label_key)

    def decode(split: str) -> tuple[np.ndarray, np.ndarray]:
        images, labels = read(builder, split, image_key, label_key, image_shape, max_examples)
        array_split = tfds_reader.to_array_split(images, labels, image_shape, num_classes,
                                                 f"{name}/{split}")
        return array_split.images, array_split.labels

    def read_split(split: str) -> ArraySplit:
        if cache is not None:
            # Taken after choose_reader: the key fingerprints the prepared files.
            key = data_cache.split_key(
                builder, split, image_key, label_key, max_examples, image_shape
            )
            if key is not None:
                return ArraySplit(*cache.get(builder.name, key, lambda: decode(split)))
        return ArraySplit(*decode(split))

    # Planned: only the labels are read now; the share's rows are decoded later (`rows`).
    plan = (planned and "train" in splits and read is tfds_reader._read_data_source)
    arrays = {role: read_split(split) if role in splits and not (plan and role == "train")
              else empty_split(image_shape) for role, split in names.items()}
    rows = None
    if plan:
        labels = tfds_reader.read_labels(builder, names["train"], image_key, label_key,
                                         max_examples)
        tfds_reader.check_labels(labels, num_classes, f"{name}/{names['train']}")
        arrays["train"] = shares.row_ids(labels)

        def rows(ids: np.ndarray) -> np.ndarray:
            images, _ = read(builder, names["train"], image_key, label_key, image_shape,
                             max_examples, rows=ids)
            return images

    if "train" in splits and not len(arrays["train"]):
        raise ValueError(f"{name}/{names['train']} is empty: no statistics or training possible")
    return (Source(arrays["train"], arrays["test"], None, num_classes, image_shape, class_names),
            rows)


def _folder_source(spec: folder_data.FolderSpec, val_seed: int, max_examples: int | None,
                   cache: data_cache.SplitCache | None) -> Source:
    splits, class_names = folder_data.read_folder(spec, val_seed, max_examples, cache)
    arrays = {name: ArraySplit(*split) for name, split in splits.items()}
    return Source(arrays["train"], arrays["test"], arrays.get("val"), len(class_names),
                  spec.image_shape, class_names)


def _own_or_held_out_val(source: Source, name: str, val_size: int, val_seed: int,
                         folds: int | None, fold: int) -> tuple[ArraySplit, ArraySplit | None]:
    """(train, val): the source's own val split (a folder's val/), or one held out of train."""
    if source.val is None:
        return validation_split(source.train, f"{name}/train", val_size, val_seed, folds, fold)
    if val_size or folds:
        raise ValueError(f"the folder has its own val split, and dataset.val_size={val_size} "
                         f"dataset.folds={folds} would hold out another: set val_size=0 and "
                         "folds=null, or remove the val folder")
    return source.train, source.val


def _cache_note(cache: data_cache.SplitCache | None) -> str:
    """Where the splits came from, when the data cache is on: a miss costs the decoding."""
    if cache is None or not cache.hits + cache.misses:
        return ""
    if not cache.misses:
        return " from the data cache"
    return " (decoded: not in the data cache yet)" if not cache.hits else " (partly decoded)"


def channel_mean_std(images: np.ndarray,
                     total: shares.Total = shares.unchanged) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and (population) std of uint8 NHWC images, on the [0, 1] pixel scale;
    `total`: the sums over the processes' images when `images` is one process's share."""
    num_channels = images.shape[-1]
    count = total(np.float64(images.size // num_channels))
    # Two passes over uint8 chunks: a float64 copy of the whole train set would be 8x its size,
    # and E[x^2] - E[x]^2 in one pass loses precision that the second pass keeps.
    sums = np.zeros(num_channels, np.float64)
    for chunk in _chunks(images, _STATS_CHUNK):
        sums += chunk.sum(axis=(0, 1, 2), dtype=np.float64)
    mean = total(sums) / count
    sq_dev = np.zeros(num_channels, np.float64)
    for chunk in _chunks(images, _STATS_CHUNK):
        sq_dev += np.square(chunk - mean).sum(axis=(0, 1, 2))
    std = np.sqrt(total(sq_dev) / count)
    return (mean / 255.0).astype(np.float32), (std / 255.0).astype(np.float32)


def _chunks(array: np.ndarray, size: int) -> Sequence[np.ndarray]:
    return [array[i : i + size] for i in range(0, len(array), size)]
