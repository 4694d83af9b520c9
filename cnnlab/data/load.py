"""TFDS image-classification datasets loaded once into host NumPy arrays.

The trainer moves these arrays to the accelerator itself; this module only decides how to read a
dataset that TFDS has prepared (or can prepare) and returns uint8 images, int32 labels and the
per-channel normalisation statistics of the training images. Decoded splits can be kept on
disk between runs (cnnlab.data.cache), which spares later runs the decoding.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import os
import shutil
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cnnlab.data import cache as data_cache
from cnnlab.data import folder as folder_data

if TYPE_CHECKING:
    import tensorflow_datasets as tfds

log = logging.getLogger(__name__)

# Examples per `__getitems__` call: large enough that the per-call overhead of the array_record
# reader vanishes, small enough that a chunk of decoded example dicts stays a few tens of MB even
# for 32x32x3 or larger images.
_READ_CHUNK = 4096
# Images per chunk when computing mean/std, bounding the float64 temporary to ~100 MB at 32x32x3.
_STATS_CHUNK = 4096

# Seconds to wait for each download host to answer before calling it unreachable.
_PROBE_TIMEOUT_S = 5.0

# (builder, split, image_key, label_key, image_shape, max_examples) -> (images, labels)
_Reader = Callable[..., tuple[np.ndarray, np.ndarray]]


class DatasetUnavailableError(RuntimeError):
    """The dataset is neither prepared in data_dir nor downloadable.

    The message is a single line that names the dataset, the folder searched and what to do.
    """


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: `==` on arrays is not a bool
class ArraySplit:
    images: np.ndarray  # (N, H, W, C) uint8
    labels: np.ndarray  # (N,) int32

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(
                f"images must be uint8 (N, H, W, C), got {self.images.dtype} {self.images.shape}"
            )
        if self.labels.dtype != np.int32 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(
                f"labels must be int32 ({len(self.images)},), got "
                f"{self.labels.dtype} {self.labels.shape}"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    name: str
    train: ArraySplit
    test: ArraySplit
    val: ArraySplit | None
    num_classes: int
    image_shape: tuple[int, int, int]  # (H, W, C)
    mean: np.ndarray  # (C,) float32, of the train images (after val hold-out), pixel scale [0, 1]
    std: np.ndarray  # (C,) float32, same
    # The run's preprocessing statistics (cnnlab.data.preprocess.PreprocessStats), set by
    # cnnlab.training.loop.load_data; None: per-channel standardization with mean and std.
    preprocess: Any = None
    # The label feature's class names (TFDS ClassLabel names), index = label; None: unknown.
    class_names: tuple[str, ...] | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class _Source:
    """A dataset's splits as read, before class selection, validation hold-out and per_class."""

    train: ArraySplit
    test: ArraySplit
    val: ArraySplit | None  # the source's own validation split (a folder's val/), or None
    num_classes: int
    image_shape: tuple[int, int, int]
    class_names: tuple[str, ...] | None


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
    if folder is not None:
        source = _folder_source(folder, val_seed, max_examples, cache)
    else:
        source = _tfds_source(name, data_dir, (train_split, test_split), (image_key, label_key),
                              download, max_examples, cache)
    source = select_classes(source, classes)
    train, val = _own_or_held_out_val(source, name, val_size, val_seed, folds, fold)
    train = keep_per_class(train, per_class, val_seed, source.num_classes)
    mean, std = channel_mean_std(train.images)
    log.info(
        "loaded %s in %.1f s%s: train=%d val=%d test=%d images of %s%s%s",
        name,
        time.perf_counter() - start,
        _cache_note(cache),
        len(train),
        0 if val is None else len(val),
        len(source.test),
        "x".join(map(str, source.image_shape)),
        f", classes={list(classes)}" if classes is not None else "",
        # Test errors of a cut test split are not comparable with published ones: say so.
        f" (max_examples={max_examples} cuts every split, test too)" if max_examples else "",
    )
    return Dataset(
        name=name,
        train=train,
        test=source.test,
        val=val,
        num_classes=source.num_classes,
        image_shape=source.image_shape,
        mean=mean,
        std=std,
        class_names=source.class_names,
    )


def _tfds_source(name: str, data_dir: str | None, splits: tuple[str, str],
                 keys: tuple[str, str], download: bool, max_examples: int | None,
                 cache: data_cache.SplitCache | None) -> _Source:
    """The train and test splits of a TFDS dataset, through the cache."""
    image_key, label_key = keys
    builder = _builder(name, data_dir)
    image_shape, num_classes, class_names = _feature_spec(builder, image_key, label_key)
    read = _choose_reader(builder, download)

    def decode(split: str) -> tuple[np.ndarray, np.ndarray]:
        images, labels = read(builder, split, image_key, label_key, image_shape, max_examples)
        array_split = _to_array_split(images, labels, image_shape, num_classes, f"{name}/{split}")
        return array_split.images, array_split.labels

    def read_split(split: str) -> ArraySplit:
        if cache is not None:
            # Taken after _choose_reader: the key fingerprints the prepared files.
            key = data_cache.split_key(
                builder, split, image_key, label_key, max_examples, image_shape
            )
            if key is not None:
                return ArraySplit(*cache.get(builder.name, key, lambda: decode(split)))
        return ArraySplit(*decode(split))

    train_split, test_split = splits
    train = read_split(train_split)
    if not len(train):
        raise ValueError(f"{name}/{train_split} is empty: no statistics or training possible")
    return _Source(train, read_split(test_split), None, num_classes, image_shape, class_names)


def _folder_source(spec: folder_data.FolderSpec, val_seed: int, max_examples: int | None,
                   cache: data_cache.SplitCache | None) -> _Source:
    splits, class_names = folder_data.read_folder(spec, val_seed, max_examples, cache)
    arrays = {name: ArraySplit(*split) for name, split in splits.items()}
    return _Source(arrays["train"], arrays["test"], arrays.get("val"), len(class_names),
                   spec.image_shape, class_names)


def _own_or_held_out_val(source: _Source, name: str, val_size: int, val_seed: int,
                         folds: int | None, fold: int) -> tuple[ArraySplit, ArraySplit | None]:
    """(train, val): the source's own val split (a folder's val/), or one held out of train."""
    if source.val is None:
        return _validation_split(source.train, f"{name}/train", val_size, val_seed, folds, fold)
    if val_size or folds:
        raise ValueError(f"the folder has its own val split, and dataset.val_size={val_size} "
                         f"dataset.folds={folds} would hold out another: set val_size=0 and "
                         "folds=null, or remove the val folder")
    return source.train, source.val


def select_classes(source: _Source, classes: Sequence[int] | None) -> _Source:
    """Only `classes`, in every split, relabelled 0..len-1 in the listed order (transfer
    studies: task A = classes [0..4], task B = [5..9] of one dataset)."""
    if classes is None:
        return source
    classes = [int(c) for c in classes]
    check_classes(classes, source.num_classes)
    new_label = np.full(source.num_classes, -1, np.int32)
    new_label[classes] = np.arange(len(classes), dtype=np.int32)

    def keep(split: ArraySplit | None) -> ArraySplit | None:
        if split is None:
            return None
        mask = new_label[split.labels] >= 0
        return ArraySplit(images=split.images[mask], labels=new_label[split.labels[mask]])

    names = source.class_names
    return _Source(keep(source.train), keep(source.test), keep(source.val), len(classes),
                   source.image_shape, None if names is None else tuple(names[c] for c in classes))


def check_classes(classes: Sequence[int], num_classes: int | None) -> None:
    """One-line ValueError unless `classes` is a non-empty list of distinct indices of a dataset
    of `num_classes` classes (None: range unknown, not checked)."""
    valid = "class indices" if num_classes is None else f"indices in [0, {num_classes})"
    if not len(classes):
        raise ValueError(f"dataset.classes=[] keeps no class: list {valid}, or null for all")
    duplicates = sorted({c for c in classes if list(classes).count(c) > 1})
    if duplicates:
        raise ValueError(f"dataset.classes={list(classes)} repeats {duplicates}: list distinct "
                         f"{valid}")
    outside = [c for c in classes if c < 0 or (num_classes is not None and c >= num_classes)]
    if outside:
        raise ValueError(f"dataset.classes={list(classes)} has {outside} outside the valid "
                         f"range: {valid}")


def check_per_class(per_class: int | float | None) -> None:
    """One-line ValueError unless per_class is null, an int >= 1 or a float in (0, 1)."""
    ok = (per_class is None
          or (isinstance(per_class, int) and not isinstance(per_class, bool) and per_class >= 1)
          or (isinstance(per_class, float) and 0 < per_class < 1))
    if not ok:
        raise ValueError(f"dataset.per_class={per_class} must be an integer >= 1 (images per "
                         "class), a fraction in (0, 1) of each class, or null (all)")


# Distinguishes per_class's draw from the validation hold-out's, which also uses val_seed.
_PER_CLASS_STREAM = 1


def keep_per_class(train: ArraySplit, per_class: int | float | None, seed: int,
                   num_classes: int) -> ArraySplit:
    """N training images of each class (or that fraction of each, at least one), drawn by `seed`.

    One permutation of the split, whatever N: each class keeps its first N images in it, so a
    smaller N's images are among a larger N's (learning curves over N share their images).
    A class with fewer than N keeps all of them, and the log says so.
    """
    if per_class is None:
        return train
    order = np.random.default_rng([seed, _PER_CLASS_STREAM]).permutation(len(train))
    ordered_labels = train.labels[order]
    kept, short = [], []
    for label in range(num_classes):
        members = order[ordered_labels == label]
        # Rounded half up (Python's round() would round 2.5 to 2).
        wanted = (per_class if isinstance(per_class, int)
                  else max(1, int(np.floor(per_class * len(members) + 0.5))))
        if len(members) < wanted:
            short.append(f"{label}: {len(members)}")
        kept.append(members[:wanted])
    if short:
        log.warning("dataset.per_class=%s: these classes have fewer training images and keep "
                    "all of them (class: images): %s", per_class, ", ".join(short))
    idx = np.sort(np.concatenate(kept))
    return ArraySplit(images=train.images[idx], labels=train.labels[idx])


def _cache_note(cache: data_cache.SplitCache | None) -> str:
    """Where the splits came from, when the data cache is on: a miss costs the decoding."""
    if cache is None or not cache.hits + cache.misses:
        return ""
    if not cache.misses:
        return " from the data cache"
    return " (decoded: not in the data cache yet)" if not cache.hits else " (partly decoded)"


def channel_mean_std(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and (population) std of uint8 NHWC images, on the [0, 1] pixel scale."""
    num_channels = images.shape[-1]
    count = images.size // num_channels
    # Two passes over uint8 chunks: a float64 copy of the whole train set would be 8x its size,
    # and E[x^2] - E[x]^2 in one pass loses precision that the second pass keeps.
    total = np.zeros(num_channels, np.float64)
    for chunk in _chunks(images, _STATS_CHUNK):
        total += chunk.sum(axis=(0, 1, 2), dtype=np.float64)
    mean = total / count
    sq_dev = np.zeros(num_channels, np.float64)
    for chunk in _chunks(images, _STATS_CHUNK):
        sq_dev += np.square(chunk - mean).sum(axis=(0, 1, 2))
    std = np.sqrt(sq_dev / count)
    return (mean / 255.0).astype(np.float32), (std / 255.0).astype(np.float32)


def _chunks(array: np.ndarray, size: int) -> Sequence[np.ndarray]:
    return [array[i : i + size] for i in range(0, len(array), size)]


def _builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
    # Imported here so that importing cnnlab (e.g. for --help) does not pay for TFDS.
    import tensorflow_datasets as tfds

    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as exc:
        raise DatasetUnavailableError(
            f"unknown TFDS dataset {name!r} (tensorflow-datasets {tfds.__version__} has no builder "
            "of that name): check the spelling, e.g. 'cifar10', 'cifar100', 'mnist', "
            "'fashion_mnist', 'svhn_cropped'"
        ) from exc
    except Exception as exc:  # bad version/config: TFDS raises assorted types with long messages
        raise DatasetUnavailableError(
            f"cannot construct TFDS dataset {name!r}: {_one_line(exc)}"
        ) from exc


def _feature_spec(
    builder: tfds.core.DatasetBuilder, image_key: str, label_key: str
) -> tuple[tuple[int, int, int], int, tuple[str, ...] | None]:
    import tensorflow_datasets as tfds

    features = builder.info.features
    name = builder.info.name
    for key in (image_key, label_key):
        if key not in features:
            raise ValueError(f"{name} has no feature {key!r}; it has {sorted(features.keys())}")
    image = features[image_key]
    shape = tuple(image.shape)
    if len(shape) != 3 or None in shape or np.dtype(image.np_dtype) != np.uint8:
        raise ValueError(
            f"{name}/{image_key} must be fixed-size uint8 (H, W, C) images, got "
            f"{image.np_dtype} {shape}"
        )
    label = features[label_key]
    if not isinstance(label, tfds.features.ClassLabel):
        raise ValueError(f"{name}/{label_key} must be a ClassLabel, got {type(label).__name__}")
    names = tuple(map(str, label.names)) if label.names else None
    return (int(shape[0]), int(shape[1]), int(shape[2])), int(label.num_classes), names


def _choose_reader(builder: tfds.core.DatasetBuilder, download: bool) -> _Reader:
    import tensorflow_datasets as tfds

    name = builder.info.name
    array_record = tfds.core.FileFormat.ARRAY_RECORD
    if builder.is_prepared():
        formats = builder.info.available_file_formats()
        if array_record in formats:
            return _read_data_source
        if tfds.core.FileFormat.TFRECORD in formats:
            if _tensorflow_available():
                return _read_tensorflow
            raise DatasetUnavailableError(
                f"{name} in {builder.data_dir} is prepared as tfrecord, which TFDS can only read "
                "with TensorFlow: `pip install tensorflow`, or point data_dir at an array_record "
                f"copy (`tfds build {name} --file_format=array_record --data_dir DIR`)"
            )
        raise DatasetUnavailableError(
            f"{name} in {builder.data_dir} is prepared as {sorted(f.value for f in formats)}, "
            "which this loader cannot read: re-prepare it with --file_format=array_record"
        )

    build_hint = (
        f"build it where there is internet with `tfds build {name} --file_format=array_record "
        "--data_dir DIR` and pass dataset.data_dir=DIR (or set TFDS_DATA_DIR=DIR)"
    )
    if not download:
        raise DatasetUnavailableError(
            f"{name} is not prepared in {builder.data_dir} and download=False: allow the download "
            f"(dataset.download=true), or {build_hint}"
        )
    unreachable = _unreachable_hosts(builder)
    if unreachable:
        raise DatasetUnavailableError(
            f"{name} is not prepared in {builder.data_dir} and cannot be downloaded: "
            f"{unreachable} (offline?): {build_hint}"
        )
    log.info("%s not prepared in %s: downloading and preparing it", name, builder.data_dir)
    try:
        with _removed_on_failure(builder):
            # array_record so the result is readable without TensorFlow, by random access.
            builder.download_and_prepare(file_format=array_record.value)
    except Exception as exc:
        cause = _one_line(exc)
        if isinstance(exc, ImportError) and "tensorflow" in cause.lower():
            hint = f"preparing needs TensorFlow: `pip install tensorflow`, or {build_hint}"
        else:
            hint = f"rerun where there is internet, or {build_hint}"
        raise DatasetUnavailableError(
            f"{name} is not prepared in {builder.data_dir} and could not be downloaded "
            f"({type(exc).__name__}: {cause}): {hint}"
        ) from exc
    return _read_data_source


def _unreachable_hosts(builder: tfds.core.DatasetBuilder) -> str:
    """Why the first host the download needs cannot be reached, or "" if every one answers.

    TFDS retries each URL ten times with exponential backoff, so an offline machine spends
    minutes in retry warnings before failing; one request per host, without retries, finds out
    in seconds. Any HTTP answer counts as reachable: only the connection itself is tested.
    """
    import requests

    urls = list(builder.url_infos or {})  # the URLs of TFDS's registered checksums
    hosts = {urllib.parse.urlsplit(url)[:2]: url for url in urls}
    for (scheme, host), url in hosts.items():
        try:
            # `requests` honours HTTP(S)_PROXY as TFDS's downloader does.
            requests.head(url, timeout=_PROBE_TIMEOUT_S, allow_redirects=False).close()
        except requests.RequestException as exc:
            reason = type(exc).__name__
            if "NameResolution" in str(exc) or "Name or service not known" in str(exc):
                reason = "name resolution failed"
            return f"{scheme}://{host} is unreachable ({reason})"
    return ""


@contextlib.contextmanager
def _removed_on_failure(builder: tfds.core.DatasetBuilder) -> Iterator[None]:
    """Removes what a failed download creates in the data dir: it leaves the folder as it was.

    TFDS writes into `<data_dir>/<name>/` (an `incomplete.*` version folder) and
    `<data_dir>/downloads/` (temporary archives, `extracted/`); only entries that did not exist
    before are removed, so other datasets and earlier downloads are never touched.
    """
    root = Path(builder.data_dir_root)
    watched = [root, root / builder.name, root / "downloads", root / "downloads" / builder.name]
    existed = {folder: set(os.listdir(folder)) if folder.is_dir() else None for folder in watched}
    try:
        yield
    except BaseException:
        for folder in reversed(watched):  # deepest first
            before = existed[folder]
            if before is None:
                shutil.rmtree(folder, ignore_errors=True)
            elif folder.is_dir():
                for entry in set(os.listdir(folder)) - before:
                    path = folder / entry
                    if path.is_dir() and not path.is_symlink():
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        path.unlink(missing_ok=True)
        raise


def _tensorflow_available() -> bool:
    return importlib.util.find_spec("tensorflow") is not None


def _read_data_source(
    builder: tfds.core.DatasetBuilder,
    split: str,
    image_key: str,
    label_key: str,
    image_shape: tuple[int, int, int],
    max_examples: int | None,
) -> tuple[np.ndarray, np.ndarray]:
    try:
        source = builder.as_data_source(split=split)
    except ValueError as exc:  # unknown split or bad slice; TFDS's message spans lines
        raise ValueError(f"{builder.info.name}: bad split {split!r}: {_one_line(exc)}") from exc
    n = len(source) if max_examples is None else min(len(source), max_examples)
    images = np.empty((n, *image_shape), np.uint8)
    labels = np.empty((n,), np.int64)
    try:
        for start in range(0, n, _READ_CHUNK):
            stop = min(n, start + _READ_CHUNK)
            # One batched read per chunk: array_record serves a list of keys with one call,
            # whereas per-index access pays Python and file-seek overhead for every example.
            examples = source.__getitems__(range(start, stop))
            for i, example in enumerate(examples, start):
                # reshape: grayscale decoders may drop the trailing channel axis.
                images[i] = np.reshape(example[image_key], image_shape)
                labels[i] = example[label_key]
    except (RuntimeError, OSError) as exc:  # what array_record raises for cut or corrupt shards
        raise DatasetUnavailableError(_damaged_message(builder, split, exc)) from exc
    return images, labels


def _damaged_message(builder: tfds.core.DatasetBuilder, split: str, exc: BaseException) -> str:
    """One line naming the split's files (cut or corrupted shards) and how to rebuild them."""
    base = split.split("[")[0]
    files = sorted(Path(builder.data_dir).glob(f"{builder.name}-{base}.*"))
    named = ", ".join(str(f) for f in files[:3]) + (
        f" and {len(files) - 3} more" if len(files) > 3 else ""
    )
    return (
        f"{builder.info.name}/{split}: cannot read {named or builder.data_dir} "
        f"({_one_line(exc)}): the prepared files are damaged; delete {builder.data_dir} and "
        f"prepare it again (`tfds build {builder.info.name} --file_format=array_record`)"
    )


def _read_tensorflow(
    builder: tfds.core.DatasetBuilder,
    split: str,
    image_key: str,
    label_key: str,
    image_shape: tuple[int, int, int],
    max_examples: int | None,
) -> tuple[np.ndarray, np.ndarray]:
    import tensorflow_datasets as tfds

    # batch_size=-1 materialises the split as one tensor per feature; truncating afterwards
    # keeps user split strings such as "train[:10%]" valid (no second slice appended).
    try:
        dataset = builder.as_dataset(split=split, batch_size=-1, shuffle_files=False)
    except ValueError as exc:
        raise ValueError(f"{builder.info.name}: bad split {split!r}: {_one_line(exc)}") from exc
    batch = tfds.as_numpy(dataset)
    images = np.asarray(batch[image_key])[:max_examples]
    labels = np.asarray(batch[label_key])[:max_examples]
    return np.ascontiguousarray(images).reshape((len(images), *image_shape)), labels


def _to_array_split(
    images: np.ndarray,
    labels: np.ndarray,
    image_shape: tuple[int, int, int],
    num_classes: int,
    where: str,
) -> ArraySplit:
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"{where} has labels in [{labels.min()}, {labels.max()}], outside [0, {num_classes})"
        )
    return ArraySplit(
        images=np.asarray(images, np.uint8).reshape((len(images), *image_shape)),
        labels=labels.astype(np.int32),
    )


def _validation_split(train: ArraySplit, where: str, val_size: int, val_seed: int,
                      folds: int | None, fold: int) -> tuple[ArraySplit, ArraySplit | None]:
    """(train, val): val_size examples held out, or fold `fold` of `folds`, or no val."""
    if val_size:
        if val_size >= len(train):
            raise ValueError(
                f"val_size={val_size} must be smaller than the {len(train)} examples of {where}"
            )
        return _hold_out(train, val_size, val_seed)
    if folds:
        if folds > len(train):
            raise ValueError(f"folds={folds} exceeds the {len(train)} examples of {where}")
        return fold_split(train, folds, fold, val_seed)
    return train, None


def _hold_out(train: ArraySplit, val_size: int, val_seed: int) -> tuple[ArraySplit, ArraySplit]:
    perm = np.random.default_rng(val_seed).permutation(len(train))
    # Sorted indices keep both parts in the original file order, so the result does not depend
    # on permutation order beyond set membership and memory access stays sequential.
    val_idx = np.sort(perm[:val_size])
    train_idx = np.sort(perm[val_size:])
    return (
        ArraySplit(images=train.images[train_idx], labels=train.labels[train_idx]),
        ArraySplit(images=train.images[val_idx], labels=train.labels[val_idx]),
    )


def fold_split(train: ArraySplit, folds: int, fold: int,
               val_seed: int) -> tuple[ArraySplit, ArraySplit]:
    """(train without fold `fold`, fold `fold`) of `folds` parts of one permutation by val_seed:
    every example is in exactly one fold, and fold sizes differ by at most one."""
    perm = np.random.default_rng(val_seed).permutation(len(train))
    parts = np.array_split(perm, folds)
    val_idx = np.sort(parts[fold])
    train_idx = np.sort(np.concatenate([p for i, p in enumerate(parts) if i != fold]))
    return (
        ArraySplit(images=train.images[train_idx], labels=train.labels[train_idx]),
        ArraySplit(images=train.images[val_idx], labels=train.labels[val_idx]),
    )


def _validate_folds(ds: Any) -> None:
    from cnnlab.errors import require

    folds, fold = ds.get("folds"), ds.get("fold") or 0
    if folds is None:
        require(fold == 0, f"dataset.fold={fold} needs dataset.folds=K (cross-validation)")
        return
    require(folds >= 2, f"dataset.folds={folds} must be >= 2 or null (no cross-validation)")
    require(0 <= fold < folds, f"dataset.fold={fold} must be in [0, {folds}) "
            f"(dataset.folds={folds})")
    require(ds.val_size == 0, f"dataset.folds={folds} and dataset.val_size={ds.val_size} both "
            "choose the validation split: set dataset.val_size=0 with folds")


def _one_line(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def validate(ds: Any) -> None:
    """The `dataset` keys that can be checked before any data is read."""
    from cnnlab.errors import require

    require(ds.val_size >= 0, f"dataset.val_size={ds.val_size} must be >= 0")
    _validate_folds(ds)
    require(
        ds.max_examples is None or ds.max_examples > 0,
        f"dataset.max_examples={ds.max_examples} must be positive or null",
    )
    require(
        ds.get("cache_max_gb") is None or ds.cache_max_gb > 0,
        f"dataset.cache_max_gb={ds.get('cache_max_gb')} must be positive or null (no limit)",
    )
    shape = ds.image_shape
    require(
        shape is None or (len(shape) == 3 and min(shape) > 0),
        f"dataset.image_shape={shape} must be [height, width, channels] or null",
    )
    _validate_subsets(ds)
    _validate_folder(ds)


def _validate_subsets(ds: Any) -> None:
    """per_class and classes; the classes' range is checked by resolve (against the declared
    num_classes) and again on the data."""
    from cnnlab.errors import ConfigError

    try:
        check_per_class(ds.get("per_class"))
        if ds.get("classes") is not None:
            check_classes(list(ds.classes), None)
    except ValueError as e:
        raise ConfigError(str(e)) from None


# The keys only dataset=folder reads: null for every other dataset (a value would be unused).
FOLDER_KEYS = ("path", "image_size", "resize", "channels", "test_fraction")


def _validate_folder(ds: Any) -> None:
    from cnnlab.errors import require

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
    from cnnlab.errors import ConfigError

    if ds.name == folder_data.NAME and ds.get("path") is not None and ds.image_size is not None:
        _validate_folder(ds)
        shape, num_classes, train_size = folder_data.describe(folder_spec(ds))
        for key, value in (("image_shape", shape), ("num_classes", num_classes),
                           ("train_size", train_size)):
            if ds[key] is None:
                ds[key] = value
    classes = ds.get("classes")
    if classes is None or ds.num_classes == len(classes):
        return
    try:
        check_classes(list(classes), ds.num_classes)
    except ValueError as e:
        raise ConfigError(f"{e} (dataset {ds.name})") from None
    ds.num_classes = len(classes)
