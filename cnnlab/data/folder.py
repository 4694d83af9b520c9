"""The user's own images: a folder of class subfolders, decoded with Pillow into uint8 arrays.

Two layouts (the first is TFDS ImageFolder's):

* ``DIR/<split>/<class>/<image>``: splits ``train`` and ``test`` (``dataset.train_split`` and
  ``dataset.test_split``), optionally ``val`` (then the validation split).
* ``DIR/<class>/<image>``: the test split is ``round(test_fraction x n)`` images of each class of
  ``n`` (at most ``n - 1``), drawn by ``val_seed``; the rest is train.

Class names are the sorted subfolder names of the train split (the plain layout: of DIR), the
same index in every split; a class may be missing from test or val, but a test/val class that
train does not have is an error. Hidden entries (``.ipynb_checkpoints``) are ignored.

TFDS's own ImageFolder is not used: it lists folders through ``tf.io.gfile`` and reads through
``tf.data``, so it needs TensorFlow, which cnnlab does not depend on. Pillow (already a dependency)
decodes every format ImageFolder reads and more, and resizes with antialiased filters.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from cnnlab.errors import ConfigError

log = logging.getLogger(__name__)

NAME = "folder"
EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
VAL_SPLIT = "val"
RESIZES = ("stretch", "center_crop")
CHANNELS = {1: "L", 3: "RGB"}
# Part of every cache key: bump it when decoding changes, so entries of the old decoder go unused.
DECODER_VERSION = 1
# Unreadable files named in the warning; the count covers the rest.
_NAMED_SKIPS = 3
# The fixed order of a split's files (so max_examples keeps a mix of classes, not the first
# class): a permutation by this seed, not by any run's seed, so that it never changes a cache key.
_ORDER_SEED = 0


@dataclasses.dataclass(frozen=True)
class FolderSpec:
    """How to read a folder: where, and the images' size and channels after decoding."""

    path: str
    image_size: tuple[int, int]  # (H, W)
    resize: str = "stretch"
    channels: int = 3
    test_fraction: float = 0.2
    train_split: str = "train"
    test_split: str = "test"

    @property
    def root(self) -> Path:
        return Path(self.path).expanduser()

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (*self.image_size, self.channels)


# (path, label) of one image file.
Files = list[tuple[Path, int]]


@dataclasses.dataclass(frozen=True)
class Listing:
    """The folder's images, found without decoding any: by split (`train`, `test`, maybe `val`),
    or, in the plain layout, all of them as `all` (the test split is drawn after decoding, so
    that one cache entry serves every val_seed and test_fraction)."""

    class_names: tuple[str, ...]
    files: dict[str, Files]

    @property
    def plain(self) -> bool:
        return "all" in self.files


def _layout_hint(root: Path) -> str:
    return (f"expected {root}/<class>/<image> or {root}/train/<class>/<image> (+ test/, "
            f"optionally val/), images {'/'.join(e[1:] for e in EXTENSIONS)}")


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.suffix.lower() in EXTENSIONS and not p.name.startswith(".") and p.is_file())


def _class_files(folder: Path) -> dict[str, list[Path]]:
    """{class name: its image files} of the class subfolders of `folder`."""
    return {sub.name: _images(sub) for sub in _subfolders(folder)}


def _labelled(by_class: dict[str, list[Path]], index: dict[str, int], where: Path) -> Files:
    unknown = sorted(set(by_class) - set(index))
    if unknown:
        raise ConfigError(f"{where} has class folder(s) {unknown} that the train split does not "
                          f"have (train's classes: {sorted(index)}); rename or remove them")
    return [(f, index[name]) for name, files in by_class.items() for f in files]


def list_folder(spec: FolderSpec) -> Listing:
    """The images of `spec.path`; ConfigError (one line, naming the path and the layout
    expected) for a missing folder, no class folders, no images or an unknown test class."""
    root = spec.root
    if not root.is_dir():
        raise ConfigError(f"dataset.path={spec.path}: no such folder; {_layout_hint(root)}")
    train_dir = root / spec.train_split
    plain = not train_dir.is_dir()
    by_class = _class_files(root if plain else train_dir)
    if not any(by_class.values()):
        what = "no class subfolders" if not by_class else "no images in its class subfolders"
        raise ConfigError(f"dataset.path={spec.path}: {what} in {root if plain else train_dir}; "
                          f"{_layout_hint(root)}")
    class_names = tuple(by_class)
    index = {name: i for i, name in enumerate(class_names)}
    if plain:
        return Listing(class_names, {"all": _fixed_order(_labelled(by_class, index, root))})
    files = {"train": _labelled(by_class, index, train_dir)}
    test_dir = root / spec.test_split
    if not test_dir.is_dir():
        raise ConfigError(f"dataset.path={spec.path} has {train_dir} but no {test_dir}; "
                          f"{_layout_hint(root)}")
    files["test"] = _labelled(_class_files(test_dir), index, test_dir)
    if (root / VAL_SPLIT).is_dir():
        files["val"] = _labelled(_class_files(root / VAL_SPLIT), index, root / VAL_SPLIT)
    for name in ("test", "val"):
        if name in files and not files[name]:
            raise ConfigError(f"dataset.path={spec.path}: the {name} split has no images; "
                              f"{_layout_hint(root)}")
    return Listing(class_names, {k: _fixed_order(v) for k, v in files.items()})


def held_out_count(n: int, fraction: float) -> int:
    """Test images of a class of `n` in the plain layout: round(fraction x n), at most n - 1
    (every class keeps a training image)."""
    return max(0, min(n - 1, int(np.floor(fraction * n + 0.5))))


def stratified_split(labels: Sequence[int], fraction: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices): held_out_count of each class's indices, drawn by `seed`."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    test = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        test.append(rng.permutation(members)[: held_out_count(len(members), fraction)])
    test_idx = np.sort(np.concatenate(test)) if test else np.zeros(0, np.int64)
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    return train_idx, test_idx


def _fixed_order(files: Files) -> Files:
    order = np.random.default_rng(_ORDER_SEED).permutation(len(files))
    return [files[i] for i in order]


def describe(spec: FolderSpec) -> tuple[list[int], int, int]:
    """(image_shape, num_classes, train images) known from the listing alone, for the config
    (`cnnlab summary`, the geometry check and train.epochs come before any decoding)."""
    listing = list_folder(spec)
    if not listing.plain:
        return list(spec.image_shape), len(listing.class_names), len(listing.files["train"])
    counts = np.bincount([label for _, label in listing.files["all"]])
    train = sum(int(n) - held_out_count(int(n), spec.test_fraction) for n in counts)
    return list(spec.image_shape), len(listing.class_names), train


def read_folder(spec: FolderSpec, val_seed: int, max_examples: int | None,
                cache: Any = None) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]],
                                            tuple[str, ...]]:
    """({split: (images, labels)}, class names): train, test and, where the folder has one, val.

    Decoded groups go through `cache` (a cnnlab.data.cache.SplitCache, or None). The split
    layout decodes only the first max_examples of each split; the plain layout decodes the whole
    folder once (one entry for every val_seed and test_fraction) and cuts after the hold-out.
    """
    listing = list_folder(spec)

    def decoded(group: str, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
        files = listing.files[group][:limit]
        where = f"{spec.path} ({group})"
        if cache is None:
            return decode_files(files, spec, where)
        key = cache_key(spec, group, files, listing.class_names, limit)
        return cache.get(NAME, key, lambda: decode_files(files, spec, where))

    if not listing.plain:
        return {group: decoded(group, max_examples) for group in listing.files}, \
            listing.class_names
    images, labels = decoded("all", None)
    train_idx, test_idx = stratified_split(labels, spec.test_fraction, val_seed)
    if not len(test_idx):
        raise ConfigError(f"dataset.path={spec.path}: dataset.test_fraction={spec.test_fraction} "
                          "holds out no test image (too few images per class): raise it, or "
                          f"use the layout {spec.root}/train/<class> + {spec.root}/test/<class>")
    splits = {name: (images[idx[:max_examples]], labels[idx[:max_examples]])
              for name, idx in (("train", train_idx), ("test", test_idx))}
    return splits, listing.class_names


def cache_key(spec: FolderSpec, split: str, files: Files, class_names: Sequence[str],
              max_examples: int | None) -> dict[str, Any]:
    """Everything that determines a split's decoded arrays: every file's path (relative to the
    folder), size, mtime and label, the class names and the decoding settings."""
    root = spec.root.resolve()
    return {
        "format": DECODER_VERSION,
        "dataset": NAME,
        "split": split,
        "path": str(root),
        "image_shape": list(spec.image_shape),
        "resize": spec.resize,
        "class_names": list(class_names),
        "max_examples": max_examples,
        "files": [_fingerprint(path, root) + [label] for path, label in files],
    }


def _fingerprint(path: Path, root: Path) -> list[Any]:
    stat = path.stat()
    return [os.path.relpath(path.resolve(), root), stat.st_size, stat.st_mtime_ns]


def decode_image(path: Path, spec: FolderSpec) -> np.ndarray:
    """One image file as (H, W, channels) uint8: EXIF orientation applied, converted as
    torchvision's loader does (alpha dropped), resized (bilinear, antialiased) to image_size."""
    from PIL import Image, ImageOps

    height, width = spec.image_size
    with Image.open(path) as img:
        if img.format == "JPEG":
            # Decodes big photos at a reduced DCT scale, no smaller than twice the target, so
            # that the antialiased resize below still sets the result: 10x faster on 12 MP.
            img.draft(CHANNELS[spec.channels], (2 * width, 2 * height))
        img = _eight_bit(ImageOps.exif_transpose(img))
        if img.mode == "P" or "transparency" in img.info:
            img = img.convert("RGBA")  # palette transparency, which a direct convert warns on
        img = img.convert(CHANNELS[spec.channels])
        img = _RESIZERS[spec.resize](img, (width, height))
        array = np.asarray(img, np.uint8)
    return array.reshape(spec.image_shape)


def _eight_bit(img: Any) -> Any:
    """16- and 32-bit greyscale (scientific and medical PNGs) as 8-bit by their high byte:
    Pillow's own convert to L clips every value above 255 to white."""
    from PIL import Image

    if img.mode not in ("I", "I;16", "I;16B", "I;16L"):
        return img
    values = np.asarray(img).astype(np.int64)
    shift = 8 if img.mode.startswith("I;16") else 24
    return Image.fromarray((np.clip(values, 0, None) >> shift).astype(np.uint8), "L")


def _stretch(img: Any, size: tuple[int, int]) -> Any:
    from PIL import Image

    return img.resize(size, Image.Resampling.BILINEAR)


def _center_crop(img: Any, size: tuple[int, int]) -> Any:
    """The shorter side (relative to the target's aspect) resized to fit, the centre cut out."""
    from PIL import Image, ImageOps

    return ImageOps.fit(img, size, Image.Resampling.BILINEAR, centering=(0.5, 0.5))


_RESIZERS = {"stretch": _stretch, "center_crop": _center_crop}


def _try_decode(path: Path, spec: FolderSpec) -> np.ndarray | str:
    """The image, or why it cannot be read (a truncated or corrupt file, not an image)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's per-file warnings (EXIF, ICC): noise
            return decode_image(path, spec)
    except (OSError, ValueError, SyntaxError) as exc:  # what Pillow raises for bad files
        return f"{type(exc).__name__}: {exc}".splitlines()[0]


def decode_files(files: Files, spec: FolderSpec, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Every readable file as (images, labels); unreadable files are skipped with one warning
    (their count and the first few names), a split with none readable is an error."""
    # Threads: Pillow releases the GIL while decoding and resizing.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        results = list(pool.map(lambda item: _try_decode(item[0], spec), files))
    kept = [i for i, r in enumerate(results) if isinstance(r, np.ndarray)]
    skipped = [(files[i][0], r) for i, r in enumerate(results) if isinstance(r, str)]
    if skipped:
        named = "; ".join(f"{path} ({why})" for path, why in skipped[:_NAMED_SKIPS])
        more = f" and {len(skipped) - _NAMED_SKIPS} more" if len(skipped) > _NAMED_SKIPS else ""
        log.warning("%s: skipped %d unreadable image file(s) of %d: %s%s", where, len(skipped),
                    len(files), named, more)
    if not kept:
        raise ConfigError(f"{where}: none of its {len(files)} image files is readable "
                          f"(first: {skipped[0][0]}: {skipped[0][1]})")
    images = np.stack([results[i] for i in kept]).astype(np.uint8, copy=False)
    labels = np.array([files[i][1] for i in kept], np.int32)
    return images, labels
