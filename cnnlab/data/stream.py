"""Training sets larger than device memory: TFDS array_record files streamed through Grain.

The on-device path (cnnlab/data/load.py, then cnnlab/data/device.py's `device_split`) decodes a
whole split into host NumPy and puts it on the accelerator. A streamed split stays in its
array_record files instead: a Grain pipeline reads the examples of each chunk of steps by random
access, decodes them (and, for datasets of variable image sizes, resizes the shorter side and
cuts out the centre at the dataset's image_shape) in host worker processes, batches them, and a
background thread stacks `train.steps_per_call` batches into a `device.StreamedChunk` and puts
it on the device ahead of use. Random crops and flips still happen on the device, inside the
compiled step.

Order: the example of slot k (step k // B, place k % B) is the one `device.batch_indices` would
gather at that step: each epoch is jax.random.permutation(fold_in(data_key, epoch), n) computed
on the CPU (threefry gives the same bits on every backend), the tail that does not fill a batch
skipped. So a set that fits trains the same on both paths, and a resumed run starts reading at
its step without replaying the ones before. In a multi-host job each process reads only the rows
of every batch that its devices hold (cnnlab/parallel.py's `local_rows`): the same global batches
on any process count.

Choosing the path (`dataset.on_device`, `placement`) and the checks live in
cnnlab/data/placement.py.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import jax
import numpy as np

from cnnlab.data import device
from cnnlab.data.preprocess import PreprocessStats
from cnnlab.data.types import ArraySplit

log = logging.getLogger(__name__)

# Epoch orders each process keeps: the current one and the next (a chunk may straddle them).
_ORDERS_KEPT = 2


@dataclasses.dataclass(frozen=True)
class StreamOptions:
    """How the host reads: worker processes (0: in this process), reading threads per process,
    elements buffered per worker, chunks put on the device ahead of use."""

    workers: int = 0
    threads: int = 4
    worker_buffer: int = 2
    prefetch_chunks: int = 1


@dataclasses.dataclass(frozen=True)
class Decode:
    """Encoded example -> (uint8 image of `image_shape`, int32 label). Picklable: it runs in the
    Grain workers."""

    image_key: str
    label_key: str
    image_shape: tuple[int, int, int]

    def __call__(self, example: dict[str, Any]) -> tuple[np.ndarray, np.int32]:
        from PIL import Image, ImageOps

        height, width, channels = self.image_shape
        with Image.open(io.BytesIO(example[self.image_key])) as img:
            if img.size != (width, height):
                # JPEG: decode at the smallest power-of-two reduction still covering the
                # target, a several-fold saving on ImageNet-size photos.
                img.draft("RGB" if channels == 3 else "L", (width, height))
            img = img.convert("RGB" if channels == 3 else "L")
            if img.size != (width, height):
                # The shorter side to the target's, then the centre: no distortion, as ImageNet
                # evaluation crops are cut (random crops stay on the device).
                img = ImageOps.fit(img, (width, height), Image.Resampling.BILINEAR,
                                   centering=(0.5, 0.5))
            image = np.asarray(img, np.uint8).reshape(self.image_shape)
        return image, np.int32(example[self.label_key])


@dataclasses.dataclass(frozen=True)
class _Example:
    """Source index -> decoded (image, label); what the workers run (source and decoder only)."""

    source: Any
    decode: Decode

    def __call__(self, index: int) -> tuple[np.ndarray, np.int32]:
        return self.decode(self.source[int(index)])


@dataclasses.dataclass(eq=False)
class StreamSplit:
    """A split read from its files on demand: the first `size` examples of `source` (a TFDS
    random-access data source whose images are left encoded)."""

    name: str
    source: Any
    decode: Decode
    size: int
    # The training split's bounded sample (cnnlab/data/placement.py) for preprocessing
    # statistics and lighting PCA; never sent to the workers.
    sample: ArraySplit | None = None

    def __len__(self) -> int:
        return self.size

    @property
    def example(self) -> _Example:
        return _Example(self.source, self.decode)

    def read(self, indices: np.ndarray, options: StreamOptions) -> ArraySplit:
        """The examples at `indices`, decoded (through Grain, with `options`' workers)."""
        images, labels = [], []
        for batch_images, batch_labels in _iterate(
                _grain().MapDataset.source(np.asarray(indices)).map(self.example).batch(256),
                options):
            images.append(np.asarray(batch_images))
            labels.append(np.asarray(batch_labels))
        return ArraySplit(np.concatenate(images), np.concatenate(labels).astype(np.int32))


def stats_images(split: ArraySplit | StreamSplit) -> np.ndarray:
    """The training images statistics are computed from: all of a split in memory, the sample
    of a streamed one."""
    return split.sample.images if isinstance(split, StreamSplit) else split.images


def _grain() -> Any:
    import grain

    return grain


def _iterate(dataset: Any, options: StreamOptions) -> Iterator[Any]:
    """A Grain MapDataset's elements in order, read by `options`' threads and workers."""
    grain = _grain()
    it = dataset.to_iter_dataset(grain.ReadOptions(num_threads=options.threads,
                                                   prefetch_buffer_size=max(16, options.threads)))
    if options.workers > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=options.workers, per_worker_buffer_size=options.worker_buffer))
    return iter(it)


def _cpu_only_if_fresh() -> None:
    """In a Grain worker (a fresh process), JAX must not start the accelerator's backend: the
    order is computed on the CPU, and a worker holding device memory would starve training."""
    from jax._src import xla_bridge

    if not xla_bridge.backends_are_initialized():
        jax.config.update("jax_platforms", "cpu")


def epoch_order(data_key: np.ndarray, epoch: int, num_examples: int) -> np.ndarray:
    """`device.batch_indices`' permutation of epoch `epoch`, computed on the CPU backend."""
    # This process's CPU: in a multi-host job jax.devices("cpu")[0] is process 0's.
    cpu = jax.local_devices(backend="cpu")[0]
    with jax.default_device(cpu):
        key = jax.device_put(np.asarray(data_key), cpu)
        order = jax.random.permutation(jax.random.fold_in(key, epoch), num_examples)
    return np.asarray(order)


class Order:
    """Slot k of the training stream (step k // B, place k % B) -> the example index that
    `device.batch_indices` gives at that step; the epoch orders are computed where it runs (each
    Grain worker) and the last few kept."""

    def __init__(self, data_key: np.ndarray, num_examples: int, batch_size: int) -> None:
        self.data_key = np.asarray(data_key)
        self.num_examples, self.batch_size = num_examples, batch_size
        self.steps_per_epoch = num_examples // batch_size
        self._orders: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"data_key": self.data_key, "num_examples": self.num_examples,
                "batch_size": self.batch_size}

    def __setstate__(self, state: dict[str, Any]) -> None:
        _cpu_only_if_fresh()
        self.__init__(state["data_key"], state["num_examples"], state["batch_size"])

    def _order(self, epoch: int) -> np.ndarray:
        with self._lock:  # Grain's reading threads share it
            if epoch not in self._orders:
                self._orders[epoch] = epoch_order(self.data_key, epoch, self.num_examples)
                while len(self._orders) > _ORDERS_KEPT:
                    self._orders.popitem(last=False)
            return self._orders[epoch]

    def __call__(self, slot: int) -> int:
        step, place = divmod(int(slot), self.batch_size)
        epoch, position = divmod(step, self.steps_per_epoch)
        return int(self._order(epoch)[position * self.batch_size + place])


@dataclasses.dataclass(frozen=True)
class _LocalSlots:
    """Position j of this process's stream -> its slot: the rows [start, start + rows) of every
    batch (a multi-host job's process reads only what its devices hold)."""

    batch_size: int
    start: int
    rows: int

    def __call__(self, j: int) -> int:
        step, place = divmod(int(j), self.rows)
        return step * self.batch_size + self.start + place


def train_batches(split: StreamSplit, data_key: np.ndarray, batch_size: int, start_step: int,
                  total_steps: int, options: StreamOptions,
                  rows: tuple[int, int] | None = None) -> Iterator[tuple[Any, Any]]:
    """(images (B, H, W, C) uint8, labels (B,)) of steps start_step, start_step + 1, ... up to
    total_steps, in `device.batch_indices`' order. Random access: nothing before start_step is
    read. `rows` = (start, stop): only those rows of each batch (this process's share)."""
    order = Order(data_key, len(split), batch_size)
    start, stop = (0, batch_size) if rows is None else rows
    slots = _grain().MapDataset.range(start_step * (stop - start), total_steps * (stop - start))
    slots = slots.map(_LocalSlots(batch_size, start, stop - start))
    return _iterate(slots.map(order).map(split.example).batch(stop - start, drop_remainder=True),
                    options)


class ChunkFeeder:
    """`feeder(step, num_steps) -> device.StreamedChunk` on the device: the batches of those
    steps. One background thread reads the chunks that follow (`train.steps_per_call` each, up
    to the last step) while the device trains, `prefetch_chunks` ahead; a request out of that
    sequence (a restart) reopens the stream at its step."""

    def __init__(self, split: StreamSplit, data_key: np.ndarray, stats: PreprocessStats,
                 batch_size: int, total_steps: int, per_call: int,
                 options: StreamOptions, put: Callable[[Any], Any] = jax.device_put,
                 rows: tuple[int, int] | None = None) -> None:
        # `put`: to the device, or split over the devices (cnnlab/parallel.py); `rows`: the
        # rows of each batch this process reads (its devices' share), None: all.
        self.put, self.rows = put, rows
        self.split, self.data_key, self.stats = split, np.asarray(data_key), stats
        self.batch_size, self.total_steps, self.per_call = batch_size, total_steps, per_call
        self.options = options
        self._batches: Iterator[tuple[Any, Any]] | None = None
        self._next_step = -1  # the step of the next batch `_batches` yields
        self._pending: collections.deque = collections.deque()
        self._reader = futures.ThreadPoolExecutor(1, thread_name_prefix="cnnlab-stream")

    def __call__(self, step: int, num_steps: int) -> device.StreamedChunk:
        if self._pending and self._pending[0][:2] != (step, num_steps):
            for *_, pending in self._pending:  # reads run in order: let them end, then reopen
                pending.cancel() or pending.exception()
            self._pending.clear()
        if not self._pending:
            self._pending.append((step, num_steps,
                                  self._reader.submit(self._read, step, num_steps)))
        *_, chunk = self._pending.popleft()
        self._schedule(step + num_steps)
        return chunk.result()

    def _schedule(self, step: int) -> None:
        """Queue the chunks from `step` on, up to `prefetch_chunks` waiting."""
        if self._pending:
            step = self._pending[-1][0] + self._pending[-1][1]
        while len(self._pending) < self.options.prefetch_chunks and step < self.total_steps:
            num_steps = min(self.per_call, self.total_steps - step)
            self._pending.append((step, num_steps,
                                  self._reader.submit(self._read, step, num_steps)))
            step += num_steps

    def _read(self, step: int, num_steps: int) -> device.StreamedChunk:
        if self._next_step != step:
            log.info("streaming %s from step %d (%d examples)", self.split.name, step,
                     len(self.split))
            self._batches = train_batches(self.split, self.data_key, self.batch_size, step,
                                          self.total_steps, self.options, self.rows)
        batches = [next(self._batches) for _ in range(num_steps)]
        self._next_step = step + num_steps
        chunk = device.StreamedChunk(
            images=np.stack([np.asarray(images) for images, _ in batches]),
            labels=np.stack([np.asarray(labels, np.int32) for _, labels in batches]),
            stats=self.stats)
        # Asynchronous: the copy overlaps the chunk the device is running.
        return self.put(chunk)

    def close(self) -> None:
        self._reader.shutdown(wait=True, cancel_futures=True)
        self._batches = None


@dataclasses.dataclass(eq=False)
class EvalStream:
    """A held-out split evaluated from its files: whole batches, the tail padded and masked,
    each handed to the compiled eval function as a one-batch `device.DeviceSplit`."""

    split: StreamSplit
    stats: PreprocessStats
    options: StreamOptions
    # Each batch's way onto the device(s) (cnnlab/parallel.py's Placement.put: replicated).
    put: Callable[[Any], Any] = lambda tree: tree

    def __len__(self) -> int:
        return len(self.split)

    def device_batches(self, batch_size: int) -> Iterator[tuple[device.DeviceSplit, int]]:
        """(one padded batch on the device, index 0) per batch of the split, in file order."""
        batches = _grain().MapDataset.source(np.arange(len(self.split))).map(
            self.split.example).batch(batch_size)
        for images, labels in _iterate(batches, self.options):
            part = ArraySplit(np.asarray(images), np.asarray(labels, np.int32))
            yield self.put(device.device_split(part, self.stats, batch_size)), 0
