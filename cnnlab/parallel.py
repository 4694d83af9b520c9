"""Data parallelism with `jax.sharding`: one mesh axis over the devices, the batch split across it.

The train state and the device-resident dataset are replicated on every device; each step's
batch is constrained to be split along the mesh's `data` axis right after it is gathered, and
XLA (GSPMD) partitions the step: every device runs the forward and backward pass of its slice,
and the mean loss, the gradients and BatchNorm's batch statistics are all-reduced over the
devices, so the step computes what one device computes on the whole batch (up to the order of
float sums). With one device nothing is constrained: the single-device program is unchanged.

The state's checkpoint holds whole (unsharded) arrays, so a run resumes on any device count.
Sharded state (FSDP-style) would change only `Placement.state`: the mesh is the place for it.

Multi-host (`train.distributed`): `jax.distributed.initialize()` reads a Slurm job's environment
(or JAX's coordinator variables) itself; every process then sees every device of the job and the
mesh spans the hosts. Global arrays are built from each process's local pieces
(`jax.make_array_from_callback`, `make_array_from_process_local_data`), never by `device_put` of
a host copy, which would check every process's copy against the others by all-gathering them
(P copies through every device): a process transfers only what its own devices hold. When the
mesh spans processes, the device-resident training set is split by rows over the devices
(`put_local_rows`: each process decodes and places only its rows, cnnlab/data/share.py; each
step's gather then all-reduces the batch, never the set) and each process reads only its slice
of every streamed batch (`local_rows`). One-time work runs on process 0 first
(`primary_first`), and values a run must agree on are broadcast or reduced (`broadcast_text`,
`max_over_processes`).
"""

import contextlib
import dataclasses
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cnnlab import host_pool
from cnnlab.errors import ConfigError

log = logging.getLogger(__name__)
DATA_AXIS = "data"
DISTRIBUTED_MODES = ("auto", "true", "false")
T = TypeVar("T")


# The devices programs are built and traced for when they are not this process's own
# (`cnnlab compile` compiles for a TPU or GPU slice from a CPU host). None: this process's.
_target_devices: Sequence[Any] | None = None
# Device platforms by the name the layers choose by (a CUDA or ROCm compile target is a "gpu").
_PLATFORMS = {"cuda": "gpu", "rocm": "gpu"}


def platform() -> str:
    """The platform ("cpu", "gpu", "tpu") of the devices the programs built and traced now will
    run on: the target's devices within `compiling_for`, else this process's devices (those
    `train.devices` picks from). Everything that chooses by platform (the CPU convolution,
    max-pool's gradient, the chunk's and gradient accumulation's loops) asks this, so that a
    run and its compile for another platform decide alike; never the default backend's name."""
    return _platform_of(_target_devices if _target_devices is not None else jax.devices())


def _platform_of(devices: Sequence[Any]) -> str:
    name = next(iter(devices)).platform
    return _PLATFORMS.get(name, name)


@contextlib.contextmanager
def compiling_for(devices: Sequence[Any]) -> Iterator[None]:
    """Within: `platform()` is `devices`' platform, for models and steps built and traced
    here (`cnnlab compile`: a topology's devices, which this host lacks)."""
    global _target_devices
    previous, _target_devices = _target_devices, list(devices)
    try:
        yield
    finally:
        _target_devices = previous


def _slurm_multi_task() -> bool:
    """A Slurm step of several tasks (srun, or submitit with tasks_per_node/nodes > 1)."""
    return int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ


def check_distributed(mode: str | bool | None) -> str:
    """`train.distributed` as one of DISTRIBUTED_MODES (YAML reads true/false as booleans,
    the schema stores them as "True"/"False"; None is a config from before the key: auto)."""
    name = "auto" if mode is None else str(mode).lower()
    if name not in DISTRIBUTED_MODES:
        raise ConfigError(f"train.distributed={mode!r} is not one of "
                          f"{', '.join(DISTRIBUTED_MODES)}")
    return name


def initialize_distributed(mode: str | bool | None) -> bool:
    """Join a multi-process JAX job as `train.distributed` says; True when this process did.

    auto: when the environment is a multi-task Slurm step or names a JAX coordinator
    (JAX_COORDINATOR_ADDRESS). Must run before anything touches a device; a second call (a sweep
    runs several jobs in one process) is a no-op.
    """
    mode = check_distributed(mode)
    wanted = mode == "true" or (mode == "auto" and (
        _slurm_multi_task() or "JAX_COORDINATOR_ADDRESS" in os.environ))
    if not wanted or jax.distributed.is_initialized():
        return False
    # CPU processes (tests, CPU clusters) need a collectives library to all-reduce across
    # processes; accelerators bring their own (NCCL, ICI) and ignore this.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize()
    log.info("process %d of %d: %d local of %d devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def resolve_devices(wanted: int | None) -> list[jax.Device]:
    """The devices a run uses: all (`wanted` null) or the first `wanted` of them."""
    available = jax.devices()
    if wanted is not None and (isinstance(wanted, bool) or not isinstance(wanted, int) or not (
            1 <= wanted <= len(available))):
        raise ConfigError(f"train.devices={wanted!r}: this machine has {len(available)} "
                          f"{available[0].platform} device(s); choose 1..{len(available)} or "
                          "null (all)")
    devices = available if wanted is None else available[:wanted]
    if warning := host_pool.pool_warning(devices):
        log.warning(warning)
    return devices


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a run's arrays live: replicated state and data, batches split over `mesh`."""

    mesh: Mesh

    @classmethod
    def over(cls, devices: list[jax.Device]) -> "Placement":
        return cls(Mesh(np.asarray(devices), (DATA_AXIS,)))

    @property
    def size(self) -> int:
        return self.mesh.size

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    @property
    def batch(self) -> NamedSharding | None:
        """The sharding of a batch's leading axis; None on one device (nothing to split)."""
        return NamedSharding(self.mesh, PartitionSpec(DATA_AXIS)) if self.size > 1 else None

    def eval_batch(self, batch_size: int) -> NamedSharding | None:
        """`batch` for evaluation batches that split evenly; others are evaluated whole on every
        device (the same numbers, only slower), which the log says."""
        if self.batch is not None and batch_size % self.size:
            log.warning("train.eval_batch_size=%d does not split over %d devices: every device "
                        "evaluates whole batches (a multiple of %d would split them)",
                        batch_size, self.size, self.size)
            return None
        return self.batch

    @property
    def platform(self) -> str:
        """The platform of the mesh's devices (as `platform()` names it)."""
        return _platform_of(list(self.mesh.devices.flat))

    @property
    def spans_processes(self) -> bool:
        """Whether the mesh has devices of several processes (a multi-host job)."""
        return len({d.process_index for d in self.mesh.devices.flat}) > 1

    @property
    def row_multiple(self) -> int:
        """What a device-resident training split's row count must be a multiple of: the device
        count when `put_rows` splits it over the devices, else 1."""
        return self.size if self.spans_processes else 1

    def put(self, tree: Any) -> Any:
        """`tree` (host or device arrays) replicated on every device of the mesh; on one device
        left where it is, so a single-device run's programs and shardings are what they always
        were. Across processes each process fills its own devices from its own copy."""
        if self.size == 1:
            return tree
        if not self.spans_processes:
            return jax.device_put(tree, self.replicated)
        return jax.tree.map(lambda x: _from_local(x, self.replicated), jax.device_get(tree))

    def put_rows(self, split: Any) -> Any:
        """A device-resident split (cnnlab.data.device.DeviceSplit of host arrays, its rows a
        multiple of `row_multiple`) onto the devices: across processes split by rows, each
        process transferring only the rows its devices hold; otherwise replicated (`put`)."""
        if not self.spans_processes:
            return self.put(jax.device_put(split) if self.size == 1 else split)
        rows = NamedSharding(self.mesh, PartitionSpec(DATA_AXIS))
        return split.replace(
            images=_from_local(np.asarray(split.images), rows),
            labels=_from_local(np.asarray(split.labels), rows),
            mask=_from_local(np.asarray(split.mask), rows), stats=self.put(split.stats))

    def put_local_rows(self, split: Any, rows: int) -> Any:
        """A device-resident split of this process's rows only (`local_rows(rows)` of a split
        of `rows` rows, cnnlab/data/share.py) onto the devices, split by rows as `put_rows`
        splits a whole one: no process holds, decodes or transfers the others' rows."""
        sharding = NamedSharding(self.mesh, PartitionSpec(DATA_AXIS))

        def put(local: np.ndarray) -> jax.Array:
            return jax.make_array_from_process_local_data(sharding, np.asarray(local),
                                                         (rows, *np.shape(local)[1:]))

        return split.replace(images=put(split.images), labels=put(split.labels),
                             mask=put(split.mask), stats=self.put(split.stats))

    def local_rows(self, batch_size: int) -> tuple[int, int]:
        """[start, stop) of the rows of a batch split over the mesh that this process's devices
        hold (a contiguous range: the mesh lists each process's devices together); the whole
        batch unless the mesh spans processes."""
        if not self.spans_processes:
            return 0, batch_size
        split = NamedSharding(self.mesh, PartitionSpec(DATA_AXIS))
        held = sorted({(index[0].start or 0, index[0].stop or batch_size) for index in
                       split.addressable_devices_indices_map((batch_size,)).values()})
        start, stop = held[0][0], held[-1][1]
        if sum(b - a for a, b in held) != stop - start:
            raise ConfigError("this process's devices are not together in the device mesh: "
                              "list each process's devices together")
        return start, stop

    def put_batches(self, chunk: Any) -> Any:
        """A streamed chunk (cnnlab.data.device.StreamedChunk: images and labels stacked (steps,
        batch, ...)) onto the devices, each batch split along its second axis as the step wants
        it. Across processes `chunk` holds this process's rows of each batch (`local_rows`) and
        the global batches are assembled from every process's rows."""
        if self.size == 1:
            return jax.device_put(chunk)
        split = NamedSharding(self.mesh, PartitionSpec(None, DATA_AXIS))
        if not self.spans_processes:
            return chunk.replace(images=jax.device_put(chunk.images, split),
                                 labels=jax.device_put(chunk.labels, split),
                                 stats=jax.device_put(chunk.stats, self.replicated))
        local = jax.device_get(chunk)
        return chunk.replace(
            images=jax.make_array_from_process_local_data(split, local.images),
            labels=jax.make_array_from_process_local_data(split, local.labels),
            stats=self.put(local.stats))

    def check_batch(self, key: str, batch_size: int) -> None:
        """Each device must get an equal share of a batch."""
        if batch_size % self.size:
            raise ConfigError(
                f"{key}={batch_size} does not split over {self.size} devices; use a multiple "
                f"of {self.size} or train.devices=N with N dividing {batch_size}")

    def describe(self) -> dict[str, Any]:
        """For summary.json and W&B: how many devices of which kind, in how many processes."""
        devices = self.mesh.devices.flat
        first = next(iter(devices))
        return {"devices": self.size, "device_kind": first.device_kind,
                "platform": first.platform, "processes": jax.process_count()}


def constrain(tree: Any, sharding: NamedSharding | None) -> Any:
    """Inside a jitted function: `tree`'s leading axes split as `sharding` says (None: as is)."""
    if sharding is None:
        return tree
    return jax.lax.with_sharding_constraint(tree, sharding)


def multi_process() -> bool:
    """Whether this process is one of a multi-host job's."""
    return jax.process_count() > 1


def is_primary() -> bool:
    """The process that writes the run's files and logs (process 0 of a multi-host job)."""
    return jax.process_index() == 0


def sum_over_processes(value: np.ndarray) -> np.ndarray:
    """float64 `value` summed over the processes, in process order: the same bits on every
    process. (Sent as its bytes: without jax_enable_x64 the devices would round it to
    float32.)"""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    value = np.asarray(value, np.float64)
    words = np.ascontiguousarray(value).reshape(-1).view(np.uint32)
    parts = np.asarray(multihost_utils.process_allgather(words)).view(np.float64)
    total = parts[0].copy()
    for part in parts[1:]:
        total += part
    return total.reshape(value.shape)


def _from_local(value: Any, sharding: NamedSharding) -> jax.Array:
    """A global array of `value`'s shape (every process holds all of `value`), each process
    transferring only the parts its devices hold, with no cross-process comparison."""
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def _barrier(name: str) -> None:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def primary_first(work: Callable[[], T], name: str) -> T:
    """`work` (one-time work: a download, moving a file) on process 0, then on the others once
    it is done, so that they find its result instead of doing it again. Every process of a
    multi-host job must call this at the same point; a single process just runs `work`. A
    failure on process 0 releases the others, which then fail the same way or succeed."""
    if jax.process_count() == 1:
        return work()
    if is_primary():
        try:
            return work()
        finally:
            _barrier(f"cnnlab:{name}")
    _barrier(f"cnnlab:{name}")
    return work()


def primary_only(work: Callable[[], Any], name: str) -> None:
    """`work` on process 0 only (moving a bad checkpoint aside), which the others wait for;
    called by every process at the same point."""
    if is_primary():
        try:
            work()
        finally:
            if jax.process_count() > 1:
                _barrier(f"cnnlab:{name}")
    else:
        _barrier(f"cnnlab:{name}")


def broadcast_text(text: str, limit: int = 4096) -> str:
    """Process 0's `text` on every process (a run directory named by the time each process
    started, which differs); a single process's unchanged."""
    if jax.process_count() == 1:
        return text
    from jax.experimental import multihost_utils

    data = np.zeros(limit, np.uint8)
    encoded = text.encode()[:limit]
    data[:len(encoded)] = np.frombuffer(encoded, np.uint8)
    agreed = np.asarray(multihost_utils.broadcast_one_to_all(data))
    return bytes(agreed[agreed != 0]).decode()


def max_over_processes(value: int, placement: Placement, after: Any) -> jax.Array:
    """The largest of the processes' `value`s, as a replicated device array that is not waited
    for: read it later, and every process reads the same number. `after` (a device array of the
    run) orders the reduction after the work that made it, so that every process runs its
    collectives in one order."""
    mesh = placement.mesh
    local = np.full((sum(d.process_index == jax.process_index() for d in mesh.devices.flat),),
                    value, np.int32)
    values = jax.make_array_from_process_local_data(
        NamedSharding(mesh, PartitionSpec(DATA_AXIS)), local)
    return _largest(values, after)


@jax.jit
def _largest(values: jax.Array, after: jax.Array) -> jax.Array:
    # `after` is used (a comparison XLA cannot fold away) so that the call waits for it.
    return jnp.where(after == after, jnp.max(values), 0)
