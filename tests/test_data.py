"""Tests for cnnlab.data.load (and the tfds_reader and subsets it assembles).

Real data: fashion_mnist prepared by TFDS as array_record (the shared `fashion_dir` fixture:
../shared/data/tfds_array_record from the repo root, or $CNNLAB_SHARED_DATA) and as tfrecord in
its sibling folder `tfds/`. Other datasets: `tfds.testing.mock_data`, and tiny datasets that TFDS
itself prepares offline in tmp_path.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from cnnlab.data import cache as data_cache
from cnnlab.data import load as data
from cnnlab.data import prepare, subsets, tfds_reader
from cnnlab.data.types import ArraySplit, Dataset, DatasetUnavailableError
from tests.helpers import REPO


@pytest.fixture(scope="module")
def tfrecord_dir(fashion_dir: Path) -> str:
    folder = fashion_dir.parent / "tfds"
    if not (folder / "fashion_mnist").is_dir():
        pytest.skip(f"tfrecord fashion_mnist not found in {folder}")
    return str(folder)


def _row_keys(split: ArraySplit) -> np.ndarray:
    """One opaque, sortable key per example (pixels + label), for multiset comparisons."""
    rows = np.concatenate(
        [split.images.reshape(len(split), -1), split.labels.astype(np.uint8)[:, None]], axis=1
    )
    rows = np.ascontiguousarray(rows)
    return np.sort(rows.view(np.dtype((np.void, rows.shape[1]))).ravel())


# --------------------------------------------------------------------------- real fashion_mnist


@pytest.fixture(scope="module")
def fashion(fashion_dir: Path) -> Dataset:
    return data.load_dataset("fashion_mnist", data_dir=str(fashion_dir))


def test_fashion_mnist_shapes_dtypes_and_class_balance(fashion: Dataset) -> None:
    assert fashion.name == "fashion_mnist"
    assert fashion.num_classes == 10
    assert fashion.image_shape == (28, 28, 1)
    assert fashion.val is None
    assert fashion.train.images.shape == (60000, 28, 28, 1)
    assert fashion.test.images.shape == (10000, 28, 28, 1)
    assert len(fashion.train) == 60000 and len(fashion.test) == 10000
    for split in (fashion.train, fashion.test):
        assert split.images.dtype == np.uint8
        assert split.labels.dtype == np.int32
        assert split.labels.shape == (len(split),)
    # The data README: 6,000 per class in train, 1,000 per class in test.
    np.testing.assert_array_equal(np.bincount(fashion.train.labels, minlength=10), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(fashion.test.labels, minlength=10), [1000] * 10)
    # Real pixels, not a zero-filled preallocation: both extremes occur and images differ.
    assert fashion.train.images.min() == 0 and fashion.train.images.max() == 255
    assert not np.array_equal(fashion.train.images[0], fashion.train.images[1])


def test_fashion_mnist_mean_std(fashion: Dataset) -> None:
    assert fashion.mean.dtype == np.float32 and fashion.mean.shape == (1,)
    assert fashion.std.dtype == np.float32 and fashion.std.shape == (1,)
    pixels = fashion.train.images.astype(np.float64) / 255.0
    np.testing.assert_allclose(fashion.mean, pixels.mean(axis=(0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(fashion.std, pixels.std(axis=(0, 1, 2)), rtol=1e-6)
    # Published Fashion-MNIST statistics, as an anchor independent of this code.
    np.testing.assert_allclose(fashion.mean, [0.2860], atol=1e-4)
    np.testing.assert_allclose(fashion.std, [0.3530], atol=1e-4)


def test_fashion_mnist_val_hold_out(fashion: Dataset, fashion_dir: Path) -> None:
    n, val_size = 4000, 1000
    kwargs = dict(data_dir=str(fashion_dir), max_examples=n, val_size=val_size)
    held = data.load_dataset("fashion_mnist", val_seed=7, **kwargs)
    assert held.val is not None
    assert len(held.train) == n - val_size and len(held.val) == val_size
    assert len(held.test) == n  # max_examples truncates every split (test has 10000)

    original = ArraySplit(fashion.train.images[:n], fashion.train.labels[:n])
    # train and val together are exactly the original examples (a permutation of them) ...
    both = ArraySplit(
        np.concatenate([held.train.images, held.val.images]),
        np.concatenate([held.train.labels, held.val.labels]),
    )
    np.testing.assert_array_equal(_row_keys(both), _row_keys(original))
    # ... and val is the documented choice: the first val_size of default_rng(val_seed)'s
    # permutation, removed from train.
    val_idx = np.random.default_rng(7).permutation(n)[:val_size]
    assert sorted(map(bytes, held.val.images)) == sorted(map(bytes, original.images[val_idx]))
    np.testing.assert_array_equal(np.sort(held.val.labels), np.sort(original.labels[val_idx]))

    # Statistics describe the remaining train images only.
    pixels = held.train.images.astype(np.float64) / 255.0
    np.testing.assert_allclose(held.mean, pixels.mean(axis=(0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(held.std, pixels.std(axis=(0, 1, 2)), rtol=1e-6)

    again = data.load_dataset("fashion_mnist", val_seed=7, **kwargs)
    np.testing.assert_array_equal(again.val.images, held.val.images)
    np.testing.assert_array_equal(again.val.labels, held.val.labels)
    np.testing.assert_array_equal(again.train.images, held.train.images)

    other = data.load_dataset("fashion_mnist", val_seed=8, **kwargs)
    assert not np.array_equal(other.val.images, held.val.images)


def test_argument_validation(fashion_dir: Path) -> None:
    data_dir = str(fashion_dir)
    with pytest.raises(ValueError, match="val_size"):
        data.load_dataset("fashion_mnist", data_dir=data_dir, val_size=-1)
    with pytest.raises(ValueError, match="val_size=50 must be smaller than the 50 examples"):
        data.load_dataset("fashion_mnist", data_dir=data_dir, max_examples=50, val_size=50)
    with pytest.raises(ValueError, match="has no feature 'img'"):
        data.load_dataset("fashion_mnist", data_dir=data_dir, image_key="img")
    for split in ("trian", "test[:200%]"):
        with pytest.raises(ValueError, match="bad split") as info:
            data.load_dataset("fashion_mnist", data_dir=data_dir, test_split=split, max_examples=5)
        assert "\n" not in str(info.value)


# ------------------------------------------------------------------------ decoded-split cache

SMALL = 300  # examples per split in the cache tests that need not read a whole split


def _assert_same(got: Dataset, want: Dataset) -> None:
    for name in ("train", "val", "test"):
        a, b = getattr(got, name), getattr(want, name)
        assert (a is None) == (b is None), name
        if a is None:
            continue
        for array, expected in ((a.images, b.images), (a.labels, b.labels)):
            assert array.dtype == expected.dtype, name
            np.testing.assert_array_equal(array, expected, err_msg=name)
    np.testing.assert_array_equal(got.mean, want.mean)
    np.testing.assert_array_equal(got.std, want.std)


@pytest.fixture
def decoded(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The splits decoded from the prepared files (not served by the cache), in order."""
    calls: list[str] = []
    read = tfds_reader._read_data_source

    def counting(builder: tfds.core.DatasetBuilder, split: str, *args: object):
        calls.append(split)
        return read(builder, split, *args)

    monkeypatch.setattr(tfds_reader, "_read_data_source", counting)
    return calls


def _entries(cache: Path) -> list[Path]:
    return sorted(p for p in (cache / "fashion_mnist").iterdir())


def test_cache_serves_a_whole_split_identical_without_decoding_again(
    fashion_dir: Path, tmp_path: Path, decoded: list[str]
) -> None:
    cache = tmp_path / "cache"
    fresh = data.load_dataset("fashion_mnist", data_dir=str(fashion_dir), cache_dir=str(cache))
    assert decoded == ["train", "test"] and len(_entries(cache)) == 2
    # How much faster the cache is: benchmarks/data_cache.py (a timing, not a test).
    cached = data.load_dataset("fashion_mnist", data_dir=str(fashion_dir), cache_dir=str(cache))
    assert decoded == ["train", "test"]  # nothing decoded again
    assert len(cached.train) == 60000 and len(cached.test) == 10000
    _assert_same(cached, fresh)
    # The hold-out is drawn from the cached split as from a decoded one.
    held = data.load_dataset(
        "fashion_mnist", data_dir=str(fashion_dir), cache_dir=str(cache), val_size=1000
    )
    train, val = subsets._hold_out(fresh.train, 1000, 0)
    for got, want in ((held.train, train), (held.val, val)):
        np.testing.assert_array_equal(got.images, want.images)
        np.testing.assert_array_equal(got.labels, want.labels)
    assert decoded == ["train", "test"] and len(_entries(cache)) == 2


@pytest.mark.parametrize("val_size", [0, 50])
def test_cache_with_max_examples_matches_a_fresh_decode(
    fashion_dir: Path, tmp_path: Path, val_size: int
) -> None:
    kwargs = dict(data_dir=str(fashion_dir), max_examples=SMALL, val_size=val_size, val_seed=3)
    fresh = data.load_dataset("fashion_mnist", **kwargs)
    cold = data.load_dataset("fashion_mnist", cache_dir=str(tmp_path), **kwargs)
    warm = data.load_dataset("fashion_mnist", cache_dir=str(tmp_path), **kwargs)
    assert len(warm.train) == SMALL - val_size and len(warm.test) == SMALL
    _assert_same(cold, fresh)
    _assert_same(warm, fresh)


def test_cache_key_covers_reading_settings_and_prepared_files(
    fashion_dir: Path, tmp_path: Path, decoded: list[str]
) -> None:
    copy = tmp_path / "tfds"
    shutil.copytree(fashion_dir, copy)  # copy2: mtimes kept
    cache = tmp_path / "cache"
    kwargs = dict(data_dir=str(copy), cache_dir=str(cache))
    first = data.load_dataset("fashion_mnist", max_examples=SMALL, **kwargs)
    data.load_dataset("fashion_mnist", max_examples=SMALL, **kwargs)
    assert decoded == ["train", "test"] and len(_entries(cache)) == 2
    other = data.load_dataset("fashion_mnist", max_examples=SMALL // 2, **kwargs)
    assert decoded == ["train", "test"] * 2 and len(_entries(cache)) == 4
    assert len(other.train) == SMALL // 2
    keys = [json.loads((entry / "key.json").read_text()) for entry in _entries(cache)]
    assert sorted(k["max_examples"] for k in keys) == [SMALL // 2] * 2 + [SMALL] * 2

    # Re-preparing the data (here: a newer mtime on the train file) invalidates train only.
    shard = next((copy / "fashion_mnist").glob("*/fashion_mnist-train.array_record-*"))
    stat = shard.stat()
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    again = data.load_dataset("fashion_mnist", max_examples=SMALL, **kwargs)
    assert decoded[4:] == ["train"] and len(_entries(cache)) == 5
    _assert_same(again, first)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_pixel(path: Path) -> None:
    """One bit of the last pixel: still a valid uint8 array of the right shape, so only the
    checksum can tell."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage",
    [
        lambda entry: _truncate(entry / "images.npy"),
        lambda entry: (entry / "labels.npy").unlink(),
        lambda entry: np.save(entry / "labels.npy", np.load(entry / "labels.npy").astype(np.int64)),
        lambda entry: (entry / "key.json").write_text("{not json"),
        lambda entry: _flip_a_pixel(entry / "images.npy"),
        lambda entry: (entry / "sums.json").unlink(),
    ],
    ids=["truncated-images", "missing-labels", "int64-labels", "garbled-key", "flipped-bit",
         "missing-sums"],
)
def test_damaged_cache_entry_is_decoded_again_and_rewritten(
    fashion_dir: Path,
    tmp_path: Path,
    decoded: list[str],
    caplog: pytest.LogCaptureFixture,
    damage: Callable[[Path], None],
) -> None:
    cache = tmp_path / "cache"
    kwargs = dict(data_dir=str(fashion_dir), cache_dir=str(cache), max_examples=SMALL)
    fresh = data.load_dataset("fashion_mnist", **kwargs)
    entry = next(e for e in _entries(cache) if '"split": "train"' in (e / "key.json").read_text())
    damage(entry)
    with caplog.at_level(logging.WARNING, logger="cnnlab"):
        again = data.load_dataset("fashion_mnist", **kwargs)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and f"damaged data cache entry {entry}" in warnings[0]
    assert decoded == ["train", "test", "train"]
    _assert_same(again, fresh)
    third = data.load_dataset("fashion_mnist", **kwargs)  # the rewritten entry serves it
    assert decoded == ["train", "test", "train"]
    _assert_same(third, fresh)
    assert len(_entries(cache)) == 2  # no temporary folders left


def test_concurrent_jobs_fill_one_cache_entry(fashion_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    code = (
        "import sys; from cnnlab.data import load as data; "
        "ds = data.load_dataset('fashion_mnist', data_dir=sys.argv[1], cache_dir=sys.argv[2], "
        f"max_examples={SMALL * 10}); print(len(ds.train), int(ds.train.images.sum()))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    jobs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(fashion_dir), str(cache)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=env,
        )
        for _ in range(2)
    ]
    results = [job.communicate(timeout=120) for job in jobs]
    for job, (_, err) in zip(jobs, results, strict=True):
        assert job.returncode == 0, err[-2000:]
    kwargs = dict(data_dir=str(fashion_dir), max_examples=SMALL * 10)
    fresh = data.load_dataset("fashion_mnist", **kwargs)
    assert {out for out, _ in results} == {f"{SMALL * 10} {int(fresh.train.images.sum())}\n"}
    assert [p.name.startswith(data_cache.TMP_PREFIX) for p in _entries(cache)] == [False] * 2
    _assert_same(data.load_dataset("fashion_mnist", cache_dir=str(cache), **kwargs), fresh)


def test_a_job_that_loses_the_race_keeps_the_winners_entry(
    fashion_dir: Path, tmp_path: Path
) -> None:
    """Another job stores the entry while this one decodes: this one's rename then fails on the
    existing folder, and it discards its own copy."""
    cache = data_cache.SplitCache(tmp_path)
    builder = tfds.builder("fashion_mnist", data_dir=str(fashion_dir))
    key = data_cache.split_key(builder, "test", "image", "label", 5, (28, 28, 1))
    theirs = (np.zeros((5, 28, 28, 1), np.uint8), np.zeros((5,), np.int32))
    ours = (np.ones((5, 28, 28, 1), np.uint8), np.ones((5,), np.int32))

    def read_while_another_job_stores() -> tuple[np.ndarray, np.ndarray]:
        data_cache.SplitCache(tmp_path).get("fashion_mnist", key, lambda: theirs)
        return ours

    assert cache.get("fashion_mnist", key, read_while_another_job_stores) is ours
    served = cache.get("fashion_mnist", key, lambda: pytest.fail("decoded again"))
    np.testing.assert_array_equal(served[0], theirs[0])
    assert len(list((tmp_path / "fashion_mnist").iterdir())) == 1


def _entry_arrays(n: int, value: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((n, 28, 28, 1), value, np.uint8), np.full((n,), value, np.int32)


def test_cache_keeps_to_its_size_by_removing_the_least_recently_used(
    fashion_dir: Path, tmp_path: Path
) -> None:
    builder = tfds.builder("fashion_mnist", data_dir=str(fashion_dir))
    keys = [data_cache.split_key(builder, "test", "image", "label", n, (28, 28, 1))
            for n in (100, 101, 102)]
    entry_bytes = 100 * 784 + 400 + 1000  # images, labels, headers and the two JSON files
    cache = data_cache.SplitCache(tmp_path, max_bytes=int(2.5 * entry_bytes))
    for i, key in enumerate(keys[:2]):
        cache.get("fashion_mnist", key, lambda i=i: _entry_arrays(100, i))
    first, second = (e for e, _, _ in cache.entries())
    os.utime(first / "key.json", (1, 1))  # long unused...
    os.utime(second / "key.json", (2, 2))
    cache.get("fashion_mnist", keys[0], lambda: pytest.fail("decoded again"))  # ...used again now
    cache.get("fashion_mnist", keys[2], lambda: _entry_arrays(100, 2))
    # Three entries do not fit: the least recently used one (the second stored) went.
    kept = [json.loads((e / "key.json").read_text())["max_examples"] for e, _, _ in
            cache.entries()]
    assert sorted(kept) == [100, 102]
    assert sum(size for _, size, _ in cache.entries()) <= cache.max_bytes
    # The entry just stored stays even when it alone is over the limit.
    tiny = data_cache.SplitCache(tmp_path, max_bytes=1)
    tiny.get("fashion_mnist", keys[1], lambda: _entry_arrays(100, 1))
    assert [json.loads((e / "key.json").read_text())["max_examples"]
            for e, _, _ in tiny.entries()] == [101]


def test_a_killed_writers_temporary_folder_is_removed_once_stale(
    fashion_dir: Path, tmp_path: Path
) -> None:
    builder = tfds.builder("fashion_mnist", data_dir=str(fashion_dir))
    key = data_cache.split_key(builder, "test", "image", "label", 5, (28, 28, 1))
    folder = tmp_path / "fashion_mnist"
    stale, recent = (folder / f"{data_cache.TMP_PREFIX}{name}" for name in ("killed", "busy"))
    for tmp in (stale, recent):
        tmp.mkdir(parents=True)
        (tmp / "images.npy").write_bytes(b"half")
    old = time.time() - data_cache.STALE_TMP_SECONDS - 60
    os.utime(stale, (old, old))
    data_cache.SplitCache(tmp_path).get("fashion_mnist", key, lambda: _entry_arrays(5, 0))
    assert not stale.exists() and recent.exists()  # another job may still be writing that one
    assert len([e for e in folder.iterdir() if not e.name.startswith(data_cache.TMP_PREFIX)]) == 1


def test_unwritable_cache_dir_loads_without_cache(
    fashion_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")  # root ignores permissions; a file under a path does not
    kwargs = dict(data_dir=str(fashion_dir), max_examples=SMALL, val_size=10)
    with caplog.at_level(logging.WARNING, logger="cnnlab"):
        ds = data.load_dataset("fashion_mnist", cache_dir=str(blocker / "cache"), **kwargs)
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno >= logging.WARNING and r.name.startswith("cnnlab")]
    assert len(warnings) == 1 and f"cannot write the data cache {blocker / 'cache'}" in warnings[0]
    _assert_same(ds, data.load_dataset("fashion_mnist", **kwargs))
    assert blocker.read_text() == "not a folder"


# ------------------------------------------------------------------------------ error messages


def test_tfrecord_folder_without_tensorflow_is_a_clear_error(
        tfrecord_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    data_dir = tfrecord_dir
    # Where TensorFlow is installed the folder is readable; the message is for where it is not.
    monkeypatch.setattr(prepare, "tensorflow_available", lambda: False)
    with pytest.raises(DatasetUnavailableError) as info:
        data.load_dataset("fashion_mnist", data_dir=data_dir)
    message = str(info.value)
    assert "\n" not in message
    assert "tfrecord" in message and "pip install 'cnnlab[prepare]'" in message
    assert "array_record" in message and data_dir in message


def test_not_prepared_and_download_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def offline(self: tfds.core.DatasetBuilder, *args: object, **kwargs: object) -> None:
        calls.append(kwargs)
        # What requests raises when DNS fails (requests.ConnectionError is an OSError).
        raise OSError("[Errno -2] Name or service not known\nwhile fetching https://example")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", offline)
    monkeypatch.setattr(tfds_reader, "_unreachable_hosts", lambda urls: "")  # the hosts answered
    monkeypatch.setattr(prepare, "tensorflow_available", lambda: True)  # the download fails first
    with pytest.raises(DatasetUnavailableError) as info:
        data.load_dataset("mnist", data_dir=str(tmp_path))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("mnist ") and str(tmp_path) in message
    assert "tfds build mnist --file_format=array_record" in message and "TFDS_DATA_DIR" in message
    assert isinstance(info.value.__cause__, OSError)
    assert calls == [{"file_format": "array_record"}]


@pytest.mark.parametrize("name", ["cifar10", "mnist"])
def test_offline_download_fails_in_seconds_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    # A proxy on a closed local port: no connection can succeed, whatever the machine's network.
    for variable in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(variable, "http://127.0.0.1:9")
    for variable in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(variable, raising=False)
    # Whether TensorFlow is installed or not, the network is what this test takes away.
    monkeypatch.setattr(prepare, "tensorflow_available", lambda: True)
    data_dir = tmp_path / "tfds"
    data_dir.mkdir()
    (data_dir / "other_dataset").mkdir()
    start = time.perf_counter()
    with pytest.raises(DatasetUnavailableError, match="unreachable") as info:
        data.load_dataset(name, data_dir=str(data_dir))
    assert time.perf_counter() - start < 10
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{name} is not prepared in {data_dir}")
    assert f"tfds build {name}" in message
    assert sorted(p.name for p in data_dir.rglob("*")) == ["other_dataset"]


def test_failed_download_removes_only_what_it_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kept = [tmp_path / "cifar100" / "3.0.2" / "dataset_info.json", tmp_path / "downloads" / "a.zip"]
    for path in kept:
        path.parent.mkdir(parents=True)
        path.write_text("earlier")

    def half_download(self: tfds.core.DatasetBuilder, *args: object, **kwargs: object) -> None:
        # What TFDS leaves when a download dies: an incomplete version, temp archives, extracted/.
        (tmp_path / "mnist" / "incomplete.X1_3.0.1").mkdir(parents=True)
        (tmp_path / "downloads" / "mnist").mkdir()
        (tmp_path / "downloads" / "mnist" / "train.gz.tmp.1").write_text("partial")
        (tmp_path / "downloads" / "extracted").mkdir()
        raise OSError("Connection reset by peer")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", half_download)
    monkeypatch.setattr(tfds_reader, "_unreachable_hosts", lambda urls: "")
    monkeypatch.setattr(prepare, "tensorflow_available", lambda: True)
    with pytest.raises(DatasetUnavailableError, match="Connection reset by peer"):
        data.load_dataset("mnist", data_dir=str(tmp_path))
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert left == [
        "cifar100",
        "cifar100/3.0.2",
        "cifar100/3.0.2/dataset_info.json",
        "downloads",
        "downloads/a.zip",
    ]


@pytest.mark.parametrize("size", [0, 1_000_000])
def test_damaged_shard_is_one_line_naming_the_file(
    fashion_dir: Path, tmp_path: Path, size: int
) -> None:
    copy = tmp_path / "tfds"
    shutil.copytree(fashion_dir, copy)
    shard = next((copy / "fashion_mnist").glob("*/fashion_mnist-test.array_record-*"))
    shard.chmod(0o644)
    with open(shard, "r+b") as f:
        f.truncate(size)
    with pytest.raises(DatasetUnavailableError) as info:
        data.load_dataset("fashion_mnist", data_dir=str(copy))
    message = str(info.value)
    assert "\n" not in message and message.startswith("fashion_mnist/test: cannot read")
    assert str(shard) in message and "damaged" in message


def test_not_prepared_and_download_disabled(tmp_path: Path) -> None:
    with pytest.raises(DatasetUnavailableError, match="download=False") as info:
        data.load_dataset("mnist", data_dir=str(tmp_path), download=False)
    assert "\n" not in str(info.value) and str(tmp_path) in str(info.value)


def test_unknown_dataset_name(tmp_path: Path) -> None:
    with pytest.raises(DatasetUnavailableError, match="no_such_dataset_xyz") as info:
        data.load_dataset("no_such_dataset_xyz", data_dir=str(tmp_path))
    assert "\n" not in str(info.value)


def test_tfrecord_folder_with_tensorflow_reads_whole_split(
    monkeypatch: pytest.MonkeyPatch, tfrecord_dir: str
) -> None:
    """Routing and conversion of the TensorFlow reader; TensorFlow itself is faked here."""
    data_dir = tfrecord_dir
    requests = []

    def as_dataset(self: tfds.core.DatasetBuilder, split: str, **kwargs: object) -> dict:
        requests.append((split, kwargs["batch_size"]))
        rng = np.random.default_rng(len(requests))
        n = 12 if split == "train" else 9
        # Grayscale without the channel axis and int64 labels, to exercise the conversion.
        return {"image": rng.integers(0, 256, (n, 28, 28), np.uint8), "label": np.arange(n) % 10}

    monkeypatch.setattr(prepare, "tensorflow_available", lambda: True)
    monkeypatch.setattr(tfds.core.DatasetBuilder, "as_dataset", as_dataset)
    monkeypatch.setattr(tfds, "as_numpy", lambda tree: tree)
    ds = data.load_dataset("fashion_mnist", data_dir=data_dir, max_examples=10)
    assert requests == [("train", -1), ("test", -1)]
    assert ds.train.images.shape == (10, 28, 28, 1) and ds.test.images.shape == (9, 28, 28, 1)
    assert ds.train.labels.dtype == np.int32
    np.testing.assert_array_equal(ds.train.labels, np.arange(10) % 10)


# ---------------------------------------------------------------------- mocked TFDS datasets


def test_tfds_mock_batched_reads_are_broken_without_the_shim() -> None:
    """Documents why `mock_tfds` patches TFDS: drop the shim once this starts failing."""
    with tfds.testing.mock_data(num_examples=2, policy=tfds.testing.MockPolicy.USE_CODE):
        source = tfds.data_source("mnist", split="train")
        assert source[0]["image"].shape == (28, 28, 1)  # single reads work
        with pytest.raises(TypeError, match="record_keys"):
            source.__getitems__([0, 1])


@pytest.mark.parametrize(
    ("name", "label_key", "image_shape", "num_classes"),
    [
        ("cifar10", "label", (32, 32, 3), 10),
        ("cifar100", "label", (32, 32, 3), 100),
        ("cifar100", "coarse_label", (32, 32, 3), 20),
        ("mnist", "label", (28, 28, 1), 10),
        ("svhn_cropped", "label", (32, 32, 3), 10),
    ],
)
def test_mocked_datasets(
    mock_tfds, tmp_path: Path, name: str, label_key: str, image_shape: tuple, num_classes: int
) -> None:
    with mock_tfds(num_examples=48):
        ds = data.load_dataset(name, data_dir=str(tmp_path), label_key=label_key, val_size=8)
    assert ds.image_shape == image_shape and ds.num_classes == num_classes
    assert ds.train.images.shape == (40, *image_shape)
    assert ds.val.images.shape == (8, *image_shape)
    assert ds.test.images.shape == (48, *image_shape)
    for split in (ds.train, ds.val, ds.test):
        assert split.images.dtype == np.uint8 and split.labels.dtype == np.int32
        assert 0 <= split.labels.min() and split.labels.max() < num_classes
    assert len(np.unique(ds.train.labels)) > 1
    # Mock pixels are uniform on [0, 255): per channel mean ~0.5 and std ~0.29 in [0, 1] units.
    channels = image_shape[-1]
    assert ds.mean.shape == ds.std.shape == (channels,)
    np.testing.assert_allclose(ds.mean, 0.5, atol=0.05)
    np.testing.assert_allclose(ds.std, 0.29, atol=0.03)


def test_mocked_max_examples(mock_tfds, tmp_path: Path) -> None:
    with mock_tfds(num_examples=30):
        ds = data.load_dataset("cifar10", data_dir=str(tmp_path), max_examples=11)
    assert len(ds.train) == 11 and len(ds.test) == 11


def test_mocked_data_is_not_cached(mock_tfds, tmp_path: Path) -> None:
    """No prepared files, nothing that would tell a stale entry: the cache stays out of it."""
    with mock_tfds(num_examples=30):
        ds = data.load_dataset("cifar10", data_dir=str(tmp_path), cache_dir=str(tmp_path / "c"))
    assert len(ds.train) == 30 and not (tmp_path / "c").exists()


# ------------------------------------------- tiny datasets really prepared by TFDS, offline


def _tiny_image(index: int, shape: tuple[int, int, int]) -> np.ndarray:
    # Unique per index (first pixel == index) and non-trivial elsewhere.
    values = (np.arange(np.prod(shape)) * 7 + index * 13) % 256
    values[0] = index
    return values.reshape(shape).astype(np.uint8)


class _TinyBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Prepared through TFDS's real download_and_prepare; images arrive as PNG bytes."""

    VERSION = tfds.core.Version("1.0.0")
    SHAPE: tuple[int, int, int] = (4, 5, 3)
    SIZES = {"train": 40, "test": 7}

    def _info(self) -> tfds.core.DatasetInfo:
        features = tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(shape=self.SHAPE),
                "label": tfds.features.ClassLabel(num_classes=3),
            }
        )
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager: object) -> dict:
        return {
            "train": self._generate_examples(0, self.SIZES["train"]),
            "test": self._generate_examples(100, self.SIZES["test"]),
        }

    def _generate_examples(self, start: int, count: int):
        # PNG bytes made with PIL: TFDS only needs TensorFlow to encode numpy images itself.
        for index in range(start, start + count):
            image = _tiny_image(index, self.SHAPE)
            buffer = io.BytesIO()
            Image.fromarray(image[..., 0] if self.SHAPE[-1] == 1 else image).save(buffer, "PNG")
            yield index, {"image": buffer.getvalue(), "label": index % 3}


class CnnlabTinyRgb(_TinyBuilder):
    SHAPE = (4, 5, 3)


class CnnlabTinyGray(_TinyBuilder):
    SHAPE = (4, 5, 1)


@pytest.mark.parametrize("builder_cls", [CnnlabTinyRgb, CnnlabTinyGray])
def test_download_and_prepare_then_read(tmp_path: Path, builder_cls: type[_TinyBuilder]) -> None:
    name = builder_cls.name
    ds = data.load_dataset(name, data_dir=str(tmp_path), val_size=5)
    prepared = tfds.builder(name, data_dir=str(tmp_path))
    assert prepared.is_prepared()
    assert prepared.info.file_format == tfds.core.FileFormat.ARRAY_RECORD
    assert ds.image_shape == builder_cls.SHAPE and ds.num_classes == 3
    assert len(ds.train) == 35 and len(ds.val) == 5 and len(ds.test) == 7

    # Every image decodes to exactly what the generator wrote, with its own label.
    for split in (ds.train, ds.val, ds.test):
        assert split.images.shape[1:] == builder_cls.SHAPE
        for image, label in zip(split.images, split.labels, strict=True):
            index = int(image.flat[0])
            np.testing.assert_array_equal(image, _tiny_image(index, builder_cls.SHAPE))
            assert label == index % 3
    train_ids = {int(i.flat[0]) for i in ds.train.images}
    val_ids = {int(i.flat[0]) for i in ds.val.images}
    assert train_ids.isdisjoint(val_ids) and train_ids | val_ids == set(range(40))
    assert {int(i.flat[0]) for i in ds.test.images} == set(range(100, 107))

    # A second call reads the prepared files (no preparation) and gives the same arrays.
    again = data.load_dataset(name, data_dir=str(tmp_path), val_size=5, download=False)
    np.testing.assert_array_equal(again.train.images, ds.train.images)
    np.testing.assert_array_equal(again.val.labels, ds.val.labels)


def test_channel_mean_std_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (data._STATS_CHUNK * 2 + 3, 3, 2, 3), dtype=np.uint8)
    images[..., 2] //= 4  # channels must not share statistics
    mean, std = data.channel_mean_std(images)
    pixels = images.astype(np.float64) / 255.0
    np.testing.assert_allclose(mean, pixels.mean(axis=(0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(std, pixels.std(axis=(0, 1, 2)), rtol=1e-6)
    assert mean.dtype == std.dtype == np.float32


def test_a_cut_test_split_is_said(fashion_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    with caplog.at_level(logging.INFO, logger="cnnlab"):
        ds = data.load_dataset("fashion_mnist", data_dir=str(fashion_dir), max_examples=64)
    assert len(ds.test) == 64
    loaded = [r.getMessage() for r in caplog.records if r.getMessage().startswith("loaded ")]
    assert len(loaded) == 1 and "max_examples=64 cuts every split, test too" in loaded[0]
