"""Subsets of a dataset's splits: chosen classes, N images per class, and the validation split
held out of train (a random hold-out or one fold of k), each drawn reproducibly by a seed."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from cnnlab.data.types import ArraySplit, Source

log = logging.getLogger(__name__)


def select_classes(source: Source, classes: Sequence[int] | None) -> Source:
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
    return Source(keep(source.train), keep(source.test), keep(source.val), len(classes),
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


def validation_split(train: ArraySplit, where: str, val_size: int, val_seed: int,
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
