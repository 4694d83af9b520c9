"""Decoded dataset splits kept on disk as .npy files, so that a run skips TFDS's image decoding.

Decoding fashion_mnist's 70,000 PNGs takes 12 s or more at every start, and a sweep pays it once per
job; reading the same arrays back from .npy files takes a small fraction of that. An entry is one
split as read (after `max_examples`, before the validation hold-out), in
`<cache_dir>/<dataset>/<sha256 of its key>/`: `images.npy`, `labels.npy`, `key.json` and
`sums.json` (each array file's size and SHA-256, checked at every read: a flipped bit in a cached
image would otherwise train silently on a different dataset).

The key holds everything that determines the arrays, including the names, sizes and mtimes of the
split's prepared files, so re-preparing the data leaves the old entry unused. Entries are written
into a temporary folder and renamed into place, so a reader sees a whole entry or none, and sweep
jobs that fill the same entry at once all succeed (the first rename wins, the others discard
theirs). The cache never fails a run: a damaged entry counts as missing and is rewritten, and a
cache folder that cannot be written only costs the speed-up.

The cache keeps to a size (`dataset.cache_max_gb`): after a store, the least recently used
entries (a read touches `key.json`) are removed until the rest fit; the entry just stored is
never removed. Temporary folders left by a killed writer are removed once they are an hour old.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

Arrays = tuple[np.ndarray, np.ndarray]  # (N, H, W, C) uint8 images, (N,) int32 labels

IMAGES, LABELS, KEY, SUMS = "images.npy", "labels.npy", "key.json", "sums.json"
# Names of folders being written or removed, beside the entries; never read as entries.
TMP_PREFIX = ".tmp-"
# A writer takes seconds; a temporary folder this old was left by a killed one.
STALE_TMP_SECONDS = 3600.0
# Part of every key: bump it when the layout of an entry changes, so old entries go unused.
FORMAT = 2


def split_key(
    builder: Any,
    split: str,
    image_key: str,
    label_key: str,
    max_examples: int | None,
    image_shape: tuple[int, int, int],
) -> dict[str, Any] | None:
    """Everything that determines the arrays `builder` reads for `split`, as JSON values.

    None when the split's prepared files cannot be found (TFDS's mock data, for one): without
    them nothing would tell a stale entry from a valid one, so such a split is not cached.
    """
    try:
        files = _prepared_files(Path(builder.data_dir), builder.name, split)
        fingerprint = [_fingerprint(path) for path in files]
    except OSError:  # a file removed while listed: the split is read (and fails) without cache
        return None
    if not fingerprint:
        return None
    return {
        "format": FORMAT,
        "dataset": builder.info.full_name,  # name/config/version
        "split": split,
        "image_key": image_key,
        "label_key": label_key,
        "max_examples": max_examples,
        "image_shape": list(image_shape),
        "data_dir": os.path.abspath(builder.data_dir),
        "files": fingerprint,
    }


def _fingerprint(path: Path) -> list[Any]:
    stat = path.stat()
    return [path.name, stat.st_size, stat.st_mtime_ns]


def _prepared_files(data_dir: Path, name: str, split: str) -> list[Path]:
    """The record files of the splits that `split` names ("train", "train[:10%]+test"); all the
    dataset's record files for a split name without files of its own (TFDS's "all")."""
    bases = {part.split("[")[0].strip() for part in split.split("+")}
    files = [f for base in sorted(bases) for f in sorted(data_dir.glob(f"{name}-{base}.*"))]
    return files or sorted(data_dir.glob(f"{name}-*"))


class SplitCache:
    """The entries under one cache folder.

    After a failed write (a folder that cannot be created, a full disk) it warns once and stops
    writing, so loading a dataset's splits costs one warning, not one per split.
    """

    def __init__(self, cache_dir: str | os.PathLike[str], max_bytes: int | None = None) -> None:
        self.root = Path(cache_dir).expanduser()
        self.max_bytes = max_bytes  # None: no limit
        self.writable = True
        # Splits read back from an entry / decoded for lack of one (the loading line says so).
        self.hits = self.misses = 0

    def get(self, dataset: str, key: dict[str, Any], read: Callable[[], Arrays]) -> Arrays:
        """The entry of `key` if it is whole and matches, else `read()`, stored for next time."""
        entry = self.root / dataset / _digest(key)
        arrays, damaged = self._load(entry, key)
        if arrays is not None:
            self.hits += 1
            _touch(entry / KEY)
            log.debug("%s/%s from the data cache %s", dataset, key["split"], entry)
            return arrays
        self.misses += 1
        arrays = read()
        if self.writable:
            self._store(entry, key, arrays, damaged)
        return arrays

    def _load(self, entry: Path, key: dict[str, Any]) -> tuple[Arrays | None, bool]:
        """(arrays, False) for a valid entry, (None, False) for none, (None, True) if damaged."""
        if not os.path.exists(entry):  # False too when the cache folder cannot be searched
            return None, False
        try:
            return _read_entry(entry, key), False
        except Exception as exc:  # anything wrong with an entry only makes it a miss
            log.warning(
                "ignoring damaged data cache entry %s (%s): decoding the split again "
                "and rewriting it",
                entry,
                _one_line(exc),
            )
            return None, True

    def _store(self, entry: Path, key: dict[str, Any], arrays: Arrays, damaged: bool) -> None:
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            _remove_stale_tmp(entry.parent)
            tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=entry.parent))
        except OSError as exc:
            self._stop_writing(exc)
            return
        try:
            _write_entry(tmp, key, arrays)
            if damaged:
                _remove(entry)
            if _publish(tmp, entry):
                log.info("stored %s/%s in the data cache %s", key["dataset"], key["split"], entry)
        except OSError as exc:
            self._stop_writing(exc)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # already gone once renamed
        if self.max_bytes is not None:
            self.evict(keep=entry)

    def entries(self) -> list[tuple[Path, int, float]]:
        """Every whole entry as (folder, bytes, last use), least recently used first."""
        found = []
        for entry in self.root.glob("*/*"):
            if entry.name.startswith(TMP_PREFIX) or not entry.is_dir():
                continue
            try:
                size = sum(f.stat().st_size for f in entry.iterdir())
                found.append((entry, size, (entry / KEY).stat().st_mtime))
            except OSError:  # removed meanwhile, or no key: another job's business
                continue
        return sorted(found, key=lambda item: item[2])

    def evict(self, keep: Path) -> None:
        """Removes the least recently used entries, `keep` excepted, until the cache fits."""
        entries = self.entries()
        total = sum(size for _, size, _ in entries)
        for entry, size, _ in entries:
            if self.max_bytes is None or total <= self.max_bytes:
                break
            if entry == keep:
                continue
            _remove(entry)
            total -= size
            log.info("removed %s from the data cache (least recently used; the cache is kept "
                     "under %.3g GB: dataset.cache_max_gb)", entry, self.max_bytes / 1e9)

    def _stop_writing(self, exc: OSError) -> None:
        self.writable = False
        log.warning(
            "cannot write the data cache %s (%s): loading without it (dataset.cache_dir)",
            self.root,
            _one_line(exc),
        )


def _key_text(key: dict[str, Any]) -> str:
    return json.dumps(key, sort_keys=True, indent=1)


def _digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(_key_text(key).encode()).hexdigest()


def _read_entry(entry: Path, key: dict[str, Any]) -> Arrays:
    stored = json.loads((entry / KEY).read_text())
    if stored != json.loads(_key_text(key)):
        raise ValueError(f"{KEY} holds another key")
    sums = json.loads((entry / SUMS).read_text())
    for name in (IMAGES, LABELS):
        if _file_sum(entry / name) != sums[name]:
            raise ValueError(f"{name} does not match its size and SHA-256 in {SUMS}")
    images = np.load(entry / IMAGES, allow_pickle=False)
    labels = np.load(entry / LABELS, allow_pickle=False)
    shape = tuple(key["image_shape"])
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != shape:
        raise ValueError(f"{IMAGES} is {images.dtype} {images.shape}, not uint8 (N, *{shape})")
    if labels.dtype != np.int32 or labels.shape != images.shape[:1]:
        raise ValueError(f"{LABELS} is {labels.dtype} {labels.shape}, not int32 ({len(images)},)")
    return images, labels


def _write_entry(folder: Path, key: dict[str, Any], arrays: Arrays) -> None:
    """The entry's files in `folder`, on disk (fsync) before the folder is renamed into place:
    after a crash the renamed folder must not hold files that were never written out."""
    images, labels = arrays
    for name, array in ((IMAGES, images), (LABELS, labels)):
        with open(folder / name, "wb") as f:
            np.save(f, array, allow_pickle=False)
            _sync(f)
    sums = {name: _file_sum(folder / name) for name in (IMAGES, LABELS)}
    for name, text in ((SUMS, json.dumps(sums)), (KEY, _key_text(key))):
        with open(folder / name, "w") as f:
            f.write(text)
            _sync(f)
    folder.chmod(0o755)  # mkdtemp's 0o700 would hide a shared cache from other users
    _sync_dir(folder)


def _publish(tmp: Path, entry: Path) -> bool:
    """Renames `tmp` to `entry`; False if another job's entry got there first (it is kept)."""
    try:
        os.rename(tmp, entry)
    except OSError as exc:
        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
        return False
    _sync_dir(entry.parent)
    return True


def _remove(entry: Path) -> None:
    """Moves a damaged entry aside in one rename (readers see it whole or gone), then deletes
    it; another job may have removed it already."""
    trash = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=entry.parent))
    try:
        os.rename(entry, trash / "old")
    except FileNotFoundError:
        pass
    finally:
        shutil.rmtree(trash, ignore_errors=True)


def _file_sum(path: Path) -> list[Any]:
    """[size, SHA-256 hex] of a file, read in 16 MB pieces (0.05 s for fashion_mnist's 55 MB)."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while piece := f.read(1 << 24):
            digest.update(piece)
            size += len(piece)
    return [size, digest.hexdigest()]


def _touch(path: Path) -> None:
    """Marks an entry used now, for least-recently-used eviction; a read-only cache still
    serves its entries."""
    try:
        os.utime(path)
    except OSError:
        pass


def _remove_stale_tmp(folder: Path, now: float | None = None) -> None:
    """Removes the temporary folders in `folder` older than STALE_TMP_SECONDS (a killed writer's);
    younger ones may be another job's write in progress."""
    now = time.time() if now is None else now
    for tmp in folder.glob(f"{TMP_PREFIX}*"):
        try:
            if now - tmp.stat().st_mtime > STALE_TMP_SECONDS:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            continue


def _sync(f: Any) -> None:
    f.flush()
    os.fsync(f.fileno())


def _sync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _one_line(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
