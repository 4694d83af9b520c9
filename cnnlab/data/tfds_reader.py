"""Reading a TFDS dataset: its builder and features, how its prepared files are read (array_record
by random access, or tfrecord through TensorFlow), and the download when it is not prepared,
probed first so that an offline machine is told in seconds; every failure is one line that says
what to do. Named so as not to shadow `tensorflow_datasets as tfds`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cnnlab.data import prepare
from cnnlab.data.types import ArraySplit, DatasetUnavailableError

if TYPE_CHECKING:
    import tensorflow_datasets as tfds

log = logging.getLogger(__name__)

# Examples per `__getitems__` call: large enough that the per-call overhead of the array_record
# reader vanishes, small enough that a chunk of decoded example dicts stays a few tens of MB even
# for 32x32x3 or larger images.
_READ_CHUNK = 4096

# Seconds to wait for each download host to answer before calling it unreachable.
_PROBE_TIMEOUT_S = 5.0

# (builder, split, image_key, label_key, image_shape, max_examples) -> (images, labels)
_Reader = Callable[..., tuple[np.ndarray, np.ndarray]]


def make_builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
    """The TFDS builder of `name` (with config/version) in `data_dir`, or a one-line error."""
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
            f"cannot construct TFDS dataset {name!r}: {one_line(exc)}"
        ) from exc


def feature_spec(
    builder: tfds.core.DatasetBuilder, image_key: str, label_key: str
) -> tuple[tuple[int, int, int], int, tuple[str, ...] | None]:
    """(image_shape, num_classes, class names or None) of the image and label features; a
    ValueError unless they are fixed-size uint8 images and a ClassLabel."""
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


def choose_reader(builder: tfds.core.DatasetBuilder, download: bool) -> _Reader:
    """The function that reads the prepared files' format, after preparing them (download) when
    they are missing and `download` allows it; DatasetUnavailableError says why none can."""
    import tensorflow_datasets as tfds

    name = builder.info.name
    array_record = tfds.core.FileFormat.ARRAY_RECORD
    if builder.is_prepared():
        formats = builder.info.available_file_formats()
        if array_record in formats:
            return _read_data_source
        if tfds.core.FileFormat.TFRECORD in formats:
            if prepare.tensorflow_available():
                return _read_tensorflow
            raise DatasetUnavailableError(
                f"{name} in {builder.data_dir} is prepared as tfrecord, which TFDS can only read "
                f"with TensorFlow: {prepare.INSTALL_HINT}, or point data_dir at an array_record "
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
    _check_preparable(builder, build_hint)
    fetched = prepare.urls_to_fetch(builder)
    unreachable = _unreachable_hosts(fetched)
    if unreachable:
        raise DatasetUnavailableError(
            f"{name} is not prepared in {builder.data_dir} and cannot be downloaded: "
            f"{unreachable} (offline?): {build_hint}"
        )
    log.info("%s not prepared in %s: %s with TFDS's builder", name, builder.data_dir,
             f"downloading {len(fetched)} file(s) and preparing it" if fetched
             else f"preparing it from the files in {Path(builder.data_dir_root) / 'downloads'}")
    try:
        with _removed_on_failure(builder):
            # array_record so the result is readable without TensorFlow, by random access.
            builder.download_and_prepare(file_format=array_record.value)
    except Exception as exc:
        cause = one_line(exc)
        if isinstance(exc, ImportError) and "tensorflow" in cause.lower():
            hint = f"preparing needs TensorFlow: {prepare.INSTALL_HINT}, or {build_hint}"
        else:
            hint = f"rerun where there is internet, or {build_hint}"
        raise DatasetUnavailableError(
            f"{name} is not prepared in {builder.data_dir} and could not be downloaded "
            f"({type(exc).__name__}: {cause}): {hint}"
        ) from exc
    return _read_data_source


def prepared(name: str, data_dir: str | None,
             download: bool) -> tuple[tfds.core.DatasetBuilder, _Reader]:
    """(builder, reader) of `name`, prepared (`choose_reader`) by process 0 of a multi-host job
    while the others wait; they then open the prepared files with builders of their own (one
    made before the files existed would not see them)."""
    from cnnlab import parallel

    def open_prepared() -> tuple[tfds.core.DatasetBuilder, _Reader]:
        builder = make_builder(name, data_dir)
        return builder, choose_reader(builder, download)

    return parallel.primary_first(open_prepared, f"prepare {name}")


def _check_preparable(builder: tfds.core.DatasetBuilder, build_hint: str) -> None:
    """One line naming the missing piece when preparing cannot start: manually placed files
    (ImageNet's tars), or TensorFlow for a builder that reads its raw files with it."""
    step = prepare.manual_step(builder)
    if step:
        raise DatasetUnavailableError(step)
    step = prepare.tensorflow_step(builder)
    if step:
        raise DatasetUnavailableError(f"{step}, or {build_hint}")


def _unreachable_hosts(urls: list[str]) -> str:
    """Why the first host of `urls` cannot be reached, or "" if every one answers.

    TFDS retries each URL ten times with exponential backoff, so an offline machine spends
    minutes in retry warnings before failing; one request per host, without retries, finds out
    in seconds. Any HTTP answer counts as reachable: only the connection itself is tested.
    """
    import requests

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


def _read_data_source(
    builder: tfds.core.DatasetBuilder,
    split: str,
    image_key: str,
    label_key: str,
    image_shape: tuple[int, int, int],
    max_examples: int | None,
    rows: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The split's first `max_examples` examples decoded, or only those at `rows` (indices
    into them: a multi-host process's share, cnnlab/data/share.py)."""
    source = _data_source(builder, split)
    n = len(source) if max_examples is None else min(len(source), max_examples)
    wanted = np.arange(n) if rows is None else np.asarray(rows)
    images = np.empty((len(wanted), *image_shape), np.uint8)
    labels = np.empty((len(wanted),), np.int64)
    try:
        for start in range(0, len(wanted), _READ_CHUNK):
            # One batched read per chunk: array_record serves a list of keys with one call,
            # whereas per-index access pays Python and file-seek overhead for every example.
            examples = source.__getitems__([int(i) for i in wanted[start:start + _READ_CHUNK]])
            for i, example in enumerate(examples, start):
                # reshape: grayscale decoders may drop the trailing channel axis.
                images[i] = np.reshape(example[image_key], image_shape)
                labels[i] = example[label_key]
    except (RuntimeError, OSError) as exc:  # what array_record raises for cut or corrupt shards
        raise DatasetUnavailableError(_damaged_message(builder, split, exc)) from exc
    return images, labels


def read_labels(builder: tfds.core.DatasetBuilder, split: str, image_key: str, label_key: str,
                max_examples: int | None) -> np.ndarray:
    """The labels of the split's first `max_examples` examples, its images left undecoded (the
    plan of a multi-host process's share, cnnlab/data/share.py)."""
    import tensorflow_datasets as tfds

    source = _data_source(builder, split, {image_key: tfds.decode.SkipDecoding()})
    n = len(source) if max_examples is None else min(len(source), max_examples)
    labels = np.empty((n,), np.int64)
    try:
        for start in range(0, n, _READ_CHUNK):
            examples = source.__getitems__(range(start, min(n, start + _READ_CHUNK)))
            labels[start:start + len(examples)] = [e[label_key] for e in examples]
    except (RuntimeError, OSError) as exc:
        raise DatasetUnavailableError(_damaged_message(builder, split, exc)) from exc
    return labels


def _data_source(builder: tfds.core.DatasetBuilder, split: str, decoders: Any = None) -> Any:
    try:
        return builder.as_data_source(split=split, decoders=decoders)
    except ValueError as exc:  # unknown split or bad slice; TFDS's message spans lines
        raise ValueError(f"{builder.info.name}: bad split {split!r}: {one_line(exc)}") from exc


def _damaged_message(builder: tfds.core.DatasetBuilder, split: str, exc: BaseException) -> str:
    """One line naming the split's files (cut or corrupted shards) and how to rebuild them."""
    base = split.split("[")[0]
    files = sorted(Path(builder.data_dir).glob(f"{builder.name}-{base}.*"))
    named = ", ".join(str(f) for f in files[:3]) + (
        f" and {len(files) - 3} more" if len(files) > 3 else ""
    )
    return (
        f"{builder.info.name}/{split}: cannot read {named or builder.data_dir} "
        f"({one_line(exc)}): the prepared files are damaged; delete {builder.data_dir} and "
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
        raise ValueError(f"{builder.info.name}: bad split {split!r}: {one_line(exc)}") from exc
    batch = tfds.as_numpy(dataset)
    images = np.asarray(batch[image_key])[:max_examples]
    labels = np.asarray(batch[label_key])[:max_examples]
    return np.ascontiguousarray(images).reshape((len(images), *image_shape)), labels


def to_array_split(
    images: np.ndarray,
    labels: np.ndarray,
    image_shape: tuple[int, int, int],
    num_classes: int,
    where: str,
) -> ArraySplit:
    """The decoded arrays as an ArraySplit; a ValueError names `where` for labels out of range."""
    check_labels(labels, num_classes, where)
    return ArraySplit(
        images=np.asarray(images, np.uint8).reshape((len(images), *image_shape)),
        labels=labels.astype(np.int32),
    )


def check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
    """A ValueError naming `where` for labels outside [0, num_classes)."""
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"{where} has labels in [{labels.min()}, {labels.max()}], outside [0, {num_classes})"
        )


def one_line(exc: BaseException, limit: int = 200) -> str:
    """The exception's message on one line, cut to `limit` characters (TFDS's span lines)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
