"""Each epoch's order of the device-resident training set, drawn once per epoch.

`device.batch_indices` gives the batch at a step from the epoch's permutation,
`permutation(fold_in(data_key, epoch), n)`, drawn anew at every step: a sort of all n example
keys per step (1.28 M for ImageNet). Here the host draws each epoch's permutation once, on the
device (`EpochOrders.draw`, dispatched ahead, never waited for) and hands a chunk of steps the
permutations of the epochs it spans (`OrderedSplit`); the batches are the very ones
`batch_indices` gives, so the order, the runs and their resumes are unchanged.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from cnnlab.data.device import DeviceSplit, GivenBatch, select_batch


def epochs_spanned(num_steps: int, steps_per_epoch: int) -> int:
    """The most epochs `num_steps` consecutive steps can touch (a chunk may start anywhere)."""
    return (num_steps + steps_per_epoch - 2) // steps_per_epoch + 1


class OrderedSplit(struct.PyTreeNode):
    """The training split with the permutations of epochs `first`, `first` + 1, ... (as many as
    the chunk's steps can span): what a chunk of steps on the device-resident set takes."""

    split: DeviceSplit
    orders: tuple[jax.Array, ...]
    first: jax.Array  # int32 scalar

    @property
    def stats(self) -> Any:
        return self.split.stats

    def batch(self, step: jax.Array, batch_size: int) -> tuple[jax.Array, jax.Array]:
        """(images, labels) of the batch at `step`, as `device.batch_indices` selects them."""
        n = self.orders[0].shape[0]
        epoch, position = jnp.divmod(step, n // batch_size)
        order = jnp.stack(self.orders)[epoch - self.first] if len(self.orders) > 1 \
            else self.orders[0]
        idx = jax.lax.dynamic_slice(order, (position * batch_size,), (batch_size,))
        return self.split.images[idx], self.split.labels[idx]


def select(data: OrderedSplit | DeviceSplit | GivenBatch, data_key: jax.Array, step: jax.Array,
           batch_size: int) -> tuple[jax.Array, jax.Array]:
    """(images, labels) of the batch at `step`: from the epoch orders a chunk was handed, else
    as `device.select_batch` draws it (a permutation per call: diagnostics, single steps)."""
    if isinstance(data, OrderedSplit):
        return data.batch(step, batch_size)
    return select_batch(data, data_key, step, batch_size)


@functools.partial(jax.jit, static_argnames="num_examples")
def _permutation(data_key: jax.Array, epoch: jax.Array, num_examples: int) -> jax.Array:
    # The expression of device.batch_indices, so that the orders are the same.
    return jax.random.permutation(jax.random.fold_in(data_key, epoch), num_examples)


class EpochOrders:
    """Host side: the permutation of each epoch, drawn once on the device and kept while a chunk
    may still need it. `data_key` is the run's data key (the first half of the split of
    `TrainState.rng`), a device array: nothing here waits for the device."""

    def __init__(self, data_key: jax.Array, num_examples: int, batch_size: int) -> None:
        self.data_key, self.num_examples = data_key, num_examples
        self.steps_per_epoch = num_examples // batch_size
        self._drawn: dict[int, jax.Array] = {}
        self.draws = 0  # how many permutations were drawn (one per epoch)

    def draw(self, epoch: int) -> jax.Array:
        if epoch not in self._drawn:
            self._drawn[epoch] = _permutation(self.data_key, np.int32(epoch), self.num_examples)
            self.draws += 1
        return self._drawn[epoch]

    def __call__(self, split: DeviceSplit, step: int, num_steps: int) -> OrderedSplit:
        """`split` with the orders of the epochs that steps step..step + num_steps - 1 can
        span (always the same number for a chunk length, so a length compiles once)."""
        first = step // self.steps_per_epoch
        for old in [e for e in self._drawn if e < first]:
            del self._drawn[old]
        count = epochs_spanned(num_steps, self.steps_per_epoch)
        orders = tuple(self.draw(first + i) for i in range(count))
        return OrderedSplit(split, orders, np.int32(first))
