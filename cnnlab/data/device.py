"""The dataset on the device, and how a training step's batch is drawn from it.

A split lives on the accelerator as a `DeviceSplit` (the whole decoded split, zero-padded for
whole eval batches) from which each step gathers its batch by `batch_indices`; streamed data
(cnnlab/data/stream.py) hands the step its batches instead (`GivenBatch`, `StreamedChunk`), in
the same order. The compiled steps (cnnlab/training/steps.py) take either through
`select_batch`.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from cnnlab.data.preprocess import PreprocessStats


class DeviceSplit(struct.PyTreeNode):
    """A split as device arrays; `mask` marks real examples in the padded tail of eval splits."""

    images: jax.Array
    labels: jax.Array
    mask: jax.Array
    # The training set's preprocessing statistics (the same buffers in every split): data, not
    # constants of the compiled functions, since a ZCA matrix is 3072x3072 for CIFAR.
    stats: PreprocessStats
    # The real examples a training step draws from (None: all rows): a training split padded
    # to split evenly over the devices (cnnlab/parallel.py's put_rows) keeps its batch order.
    examples: int | None = struct.field(pytree_node=False, default=None)


def host_split(split: Any, stats: PreprocessStats, pad_to: int = 1) -> DeviceSplit:
    """A host split (cnnlab.data.types.ArraySplit) as a `DeviceSplit` of host arrays, zero-padded
    to a multiple of `pad_to` examples (whole eval batches, or rows split over the devices);
    `mask` marks the real ones."""
    n = len(split)
    padded = -(-n // pad_to) * pad_to
    images = np.zeros((padded, *split.images.shape[1:]), np.uint8)
    images[:n] = split.images
    labels = np.zeros((padded,), np.int32)
    labels[:n] = split.labels
    return DeviceSplit(images=images, labels=labels, mask=np.arange(padded) < n, stats=stats)


def local_split(rows: Any, stats: PreprocessStats) -> DeviceSplit:
    """A process's share of a training split (cnnlab.data.share.LocalRows) as its part of the
    `host_split` padded to `rows.padded` examples: rows rows.start..rows.stop, zero past the
    real ones. `examples` is the whole split's real count."""
    count = rows.stop - rows.start
    images = np.zeros((count, *rows.images.shape[1:]), np.uint8)
    images[:len(rows.labels)] = rows.images
    labels = np.zeros((count,), np.int32)
    labels[:len(rows.labels)] = rows.labels
    return DeviceSplit(images=images, labels=labels, mask=np.arange(rows.start, rows.stop) <
                       rows.size, stats=stats,
                       examples=rows.size if rows.padded != rows.size else None)


def device_split(split: Any, stats: PreprocessStats, pad_to: int = 1) -> DeviceSplit:
    """`host_split` on the default device."""
    return jax.device_put(host_split(split, stats, pad_to))


class GivenBatch(struct.PyTreeNode):
    """One training batch handed to the step (streamed data, cnnlab/data/stream.py) instead of one
    gathered from a `DeviceSplit` by `batch_indices`."""

    images: jax.Array  # (B, H, W, C) uint8
    labels: jax.Array  # (B,) int32
    stats: PreprocessStats


class StreamedChunk(struct.PyTreeNode):
    """The batches of a chunk of steps, stacked: the xs of the chunk's scan (cnnlab/data/stream.py
    reads them, in `batch_indices`' order, from files on the host)."""

    images: jax.Array  # (num_steps, B, H, W, C) uint8
    labels: jax.Array  # (num_steps, B) int32
    stats: PreprocessStats


def select_batch(data: DeviceSplit | GivenBatch, data_key: jax.Array, step: jax.Array,
                 batch_size: int) -> tuple[jax.Array, jax.Array]:
    """(images, labels) of the batch at `step`: gathered from a device-resident split, or the
    streamed batch itself (already in the same order)."""
    if isinstance(data, GivenBatch):
        return data.images, data.labels
    n = data.labels.shape[0] if data.examples is None else data.examples
    idx = batch_indices(data_key, step, n, batch_size)
    return data.images[idx], data.labels[idx]


def batch_indices(data_key: jax.Array, step: jax.Array, num_examples: int,
                  batch_size: int) -> jax.Array:
    """Indices of the batch at `step`: each epoch is a fresh permutation from fold_in(key, epoch).

    The tail of each permutation that does not fill a batch is skipped (drop remainder).
    """
    steps_per_epoch = num_examples // batch_size
    epoch, position = jnp.divmod(step, steps_per_epoch)
    order = jax.random.permutation(jax.random.fold_in(data_key, epoch), num_examples)
    return jax.lax.dynamic_slice(order, (position * batch_size,), (batch_size,))
