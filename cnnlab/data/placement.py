"""`dataset.on_device`: whether a run keeps its training set on the device or streams it
(cnnlab/data/stream.py), and loading a streamed dataset.

auto puts the decoded training split on the device when its uint8 bytes fit the budget
(`dataset.device_budget_gb`, else half the device's memory as `memory_stats()` reports it, else
8 GB: the CPU backend reports none) and its images have one size; otherwise it streams. true
refuses a set that cannot be put there; false always streams.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import numpy as np
from omegaconf import DictConfig

from cnnlab.data import folder as folder_data
from cnnlab.data import tfds_reader
from cnnlab.data.load import channel_mean_std
from cnnlab.data.stream import Decode, StreamOptions, StreamSplit
from cnnlab.data.types import Dataset, DatasetUnavailableError
from cnnlab.errors import ConfigError, require

log = logging.getLogger(__name__)

ON_DEVICE = ("auto", True, False)
# The share of the device's memory a training set may take under auto: the rest is the model's,
# its activations' and the held-out splits'.
_DEVICE_SHARE = 0.5
# Without memory_stats (the CPU backend): host memory is the device's; a fixed budget.
_CPU_BUDGET_BYTES = 8e9
_SAMPLE_SEED = 0


@dataclasses.dataclass(frozen=True)
class DataLocation:
    on_device: bool
    reason: str


def on_device_choice(ds: Any) -> Any:
    """dataset.on_device, a missing key (configs saved before it existed) read as auto."""
    value = ds.on_device
    return "auto" if value is None else value


# The dataset keys that need the whole training set in memory: (key, is it in use?, why).
_NEEDS_MEMORY = (
    ("val_size", lambda ds: ds.val_size > 0, "holds examples out of the decoded train split"),
    ("folds", lambda ds: ds.folds is not None, "cuts the decoded train split"),
    ("classes", lambda ds: ds.classes is not None, "filters the decoded splits"),
    ("per_class", lambda ds: ds.per_class is not None, "draws from the decoded labels"),
)


def validate(cfg: DictConfig) -> None:
    """The streaming keys, checked before any data is read."""
    ds = cfg.dataset
    choice = on_device_choice(ds)
    require(choice in ON_DEVICE, f"dataset.on_device={choice}; valid choices: auto, true, false")
    for key in ("stream_workers", "stream_threads", "stream_prefetch"):
        value = ds.get(key)
        require(value is None or value >= 0, f"dataset.{key}={value} must be >= 0")
    require(ds.stats_sample is None or ds.stats_sample > 0,
            f"dataset.stats_sample={ds.get('stats_sample')} must be positive")
    require(ds.device_budget_gb is None or ds.device_budget_gb > 0,
            f"dataset.device_budget_gb={ds.get('device_budget_gb')} must be positive or null")
    if choice is False:
        check_streamable(cfg)


def check_streamable(cfg: DictConfig) -> None:
    """One-line ConfigError for what the streamed path does not do."""
    ds = cfg.dataset
    require(ds.name != folder_data.NAME, "dataset=folder is decoded into memory: "
            "dataset.on_device=false streams TFDS array_record datasets only")
    for key, used, why in _NEEDS_MEMORY:
        require(not used(ds), f"dataset.{key}={ds.get(key)} {why}, which a streamed training "
                "set does not keep in memory: unset it, or dataset.on_device=true if the set fits")
    require(cfg.diagnostics.every in (None, 0), f"diagnostics.every={cfg.diagnostics.every} "
            "reads the device-resident training set: set it to 0 with a streamed dataset")


def options(ds: Any) -> StreamOptions:
    defaults = StreamOptions()
    pick = {"workers": "stream_workers", "threads": "stream_threads",
            "prefetch_chunks": "stream_prefetch"}
    return dataclasses.replace(defaults, **{field: int(ds[key]) for field, key in pick.items()
                                            if ds.get(key) is not None})


def _device_memory() -> int | None:
    """Bytes the device may allocate, where the backend says (GPU, TPU; not the CPU)."""
    return (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit")


def _device_budget(ds: Any, limit: int | None) -> tuple[float, str]:
    """The training set's budget on a device of `limit` bytes (None: unknown)."""
    if ds.device_budget_gb is not None:
        return ds.device_budget_gb * 1e9, f"dataset.device_budget_gb={ds.device_budget_gb}"
    if limit is not None:
        return _DEVICE_SHARE * limit, f"{_DEVICE_SHARE:.0%} of the device's {limit / 1e9:.1f} GB"
    return _CPU_BUDGET_BYTES, f"{_CPU_BUDGET_BYTES / 1e9:.0f} GB (no device memory statistics)"


def _train_bytes(builder: Any, ds: Any, shape: tuple) -> int | None:
    """Bytes of the decoded uint8 train split, from the prepared files' metadata (else the
    config's train_size); None when unknown."""
    try:
        n = builder.info.splits[ds.train_split].num_examples
    except (KeyError, ValueError, TypeError):
        n = ds.train_size
    if n is None:
        return None
    if ds.max_examples is not None:
        n = min(n, ds.max_examples)
    return int(n) * int(np.prod(shape))


def data_location(cfg: DictConfig) -> DataLocation:
    """Where the run's training set goes, and why (logged)."""
    ds, choice = cfg.dataset, on_device_choice(cfg.dataset)
    if ds.name == folder_data.NAME:
        return DataLocation(True, "dataset=folder is decoded into memory")
    if choice is False:
        return DataLocation(False, "dataset.on_device=false")
    builder = tfds_reader.make_builder(ds.name, ds.data_dir)
    shape = tuple(builder.info.features[ds.image_key].shape)
    if None in shape:
        require(choice is not True, f"dataset.on_device=true but {ds.name}'s images have "
                "variable sizes, resized on the host as they stream: set dataset.on_device=auto "
                "or false")
        return DataLocation(False, f"{ds.name}'s images have variable sizes {shape}: resized to "
                         f"{ds.image_shape} while streaming")
    size = _train_bytes(builder, ds, shape)
    if choice is True:
        limit = _device_memory()
        require(size is None or limit is None or size <= limit,
                f"dataset.on_device=true but the decoded {ds.train_split} split takes "
                f"{(size or 0) / 1e9:.1f} GB, over the device's {(limit or 0) / 1e9:.1f} GB: set "
                "dataset.on_device=auto or false")
        return DataLocation(True, "dataset.on_device=true")
    return _auto_location(ds, size, _device_memory())


def _auto_location(ds: Any, size: int | None, limit: int | None) -> DataLocation:
    """dataset.on_device=auto for a training set of `size` bytes on a device of `limit`."""
    budget, why = _device_budget(ds, limit)
    if size is not None and size > budget:
        return DataLocation(False, f"the decoded {ds.train_split} split takes {size / 1e9:.2f} GB, "
                         f"over the budget of {why}")
    held = "unknown size" if size is None else f"{size / 1e9:.2f} GB"
    return DataLocation(True,
                        f"the decoded {ds.train_split} split ({held}) fits the budget of {why}")


def target_location(cfg: DictConfig, limit: int) -> DataLocation:
    """`data_location` for a device of `limit` bytes that this host does not have (`cnnlab
    compile`), from the config alone: dataset.train_size, image_shape, on_device."""
    ds, choice = cfg.dataset, on_device_choice(cfg.dataset)
    if choice is not True and ds.name != folder_data.NAME:
        if choice is False:
            return DataLocation(False, "dataset.on_device=false")
        n = ds.train_size if ds.max_examples is None else min(ds.train_size, ds.max_examples)
        size = None if n is None else int(n) * int(np.prod(ds.image_shape))
        return _auto_location(ds, size, limit)
    return DataLocation(True, "dataset.on_device=true")


def _image_spec(builder: Any, ds: Any) -> tuple[tuple[int, int, int], int, tuple | None]:
    """(target image shape, classes, class names): variable-size images go to image_shape."""
    import tensorflow_datasets as tfds

    features = builder.info.features
    for key in (ds.image_key, ds.label_key):
        if key not in features:
            raise ConfigError(f"{ds.name} has no feature {key!r}; it has "
                              f"{sorted(features.keys())}")
    stored = tuple(features[ds.image_key].shape)
    declared = None if ds.image_shape is None else tuple(ds.image_shape)
    if None in stored:
        require(declared is not None and declared[-1] == stored[-1],
                f"dataset.image_shape={ds.image_shape}: {ds.name}'s {stored} images need "
                f"[height, width, {stored[-1]}] to be resized to")
        shape = declared
    else:
        shape = stored
    label = features[ds.label_key]
    require(isinstance(label, tfds.features.ClassLabel),
            f"{ds.name}/{ds.label_key} must be a ClassLabel, got {type(label).__name__}")
    names = tuple(map(str, label.names)) if label.names else None
    return tuple(int(d) for d in shape), int(label.num_classes), names


def _split(builder: Any, ds: Any, split: str, decode: Decode) -> StreamSplit:
    import tensorflow_datasets as tfds

    try:
        source = builder.as_data_source(
            split=split, decoders={ds.image_key: tfds.decode.SkipDecoding()})
    except ValueError as exc:
        raise ConfigError(f"{ds.name}: bad split {split!r}: {tfds_reader.one_line(exc)}") from None
    size = len(source) if ds.max_examples is None else min(len(source), ds.max_examples)
    return StreamSplit(f"{ds.name}/{split}", source, decode, size)


def load_streamed(cfg: DictConfig) -> Dataset:
    """The dataset with its train and test splits left in their files (`StreamSplit`s); mean,
    std and the train split's `sample` from a bounded sample of the training images."""
    check_streamable(cfg)
    ds = cfg.dataset
    # Prepared (process 0 prepares it for a multi-host job), or says why not.
    builder, _ = tfds_reader.prepared(ds.name, ds.data_dir, ds.download)
    import tensorflow_datasets as tfds

    if tfds.core.FileFormat.ARRAY_RECORD not in builder.info.available_file_formats():
        raise DatasetUnavailableError(
            f"{ds.name} in {builder.data_dir} is not prepared as array_record, which streaming "
            f"reads by random access: `tfds build {ds.name} --file_format=array_record`")
    shape, num_classes, names = _image_spec(builder, ds)
    decode = Decode(ds.image_key, ds.label_key, shape)
    train = _split(builder, ds, ds.train_split, decode)
    test = _split(builder, ds, ds.test_split, decode)
    opts = options(ds)
    wanted = min(len(train), int(ds.stats_sample or 10_000))
    picked = np.sort(np.random.default_rng(_SAMPLE_SEED).choice(len(train), wanted,
                                                                replace=False))
    train.sample = train.read(picked, opts)
    mean, std = channel_mean_std(train.sample.images)
    log.info("streaming %s: train=%d test=%d images, %s on the host; preprocessing statistics "
             "from a sample of %d training images", ds.name, len(train), len(test),
             "x".join(map(str, shape)), wanted)
    return Dataset(name=ds.name, train=train, test=test, val=None,
                            num_classes=num_classes, image_shape=shape, mean=mean, std=std,
                            class_names=names)
