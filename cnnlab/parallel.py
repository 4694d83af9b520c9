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
(or JAX's coordinator variables) itself; every process then sees every device of the job, each
feeds the same replicated data, and the mesh spans the hosts.
"""

import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cnnlab.errors import ConfigError

log = logging.getLogger(__name__)
DATA_AXIS = "data"
DISTRIBUTED_MODES = ("auto", "true", "false")


# The platform programs are traced for when it is not this process's own (`cnnlab compile`
# compiles for a TPU or GPU from a CPU host): the layers that pick a kernel by backend must pick
# the target's. None: jax.default_backend().
_target_platform: str | None = None


def backend() -> str:
    """The platform ("cpu", "gpu", "tpu") the traced programs will run on: this process's
    default backend, or the target `compiling_for` names."""
    return _target_platform or jax.default_backend()


@contextlib.contextmanager
def compiling_for(platform: str) -> Iterator[None]:
    """Within: `backend()` is `platform`, for models and steps built and traced here."""
    global _target_platform
    previous, _target_platform = _target_platform, platform
    try:
        yield
    finally:
        _target_platform = previous


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
    if wanted is None:
        return available
    if isinstance(wanted, bool) or not isinstance(wanted, int) or not (
            1 <= wanted <= len(available)):
        raise ConfigError(f"train.devices={wanted!r}: this machine has {len(available)} "
                          f"{available[0].platform} device(s); choose 1..{len(available)} or "
                          "null (all)")
    return available[:wanted]


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

    def put(self, tree: Any) -> Any:
        """`tree` (device arrays) replicated on every device of the mesh; on one device left
        where it is, so a single-device run's programs and shardings are what they always were."""
        if self.size == 1:
            return tree
        if jax.process_count() > 1:
            # Every process holds the same values; a global sharding is filled from the host.
            tree = jax.device_get(tree)
        return jax.device_put(tree, self.replicated)

    def put_batches(self, chunk: Any) -> Any:
        """A streamed chunk (cnnlab.data.device.StreamedChunk: images and labels stacked (steps,
        batch, ...)) onto the devices, each batch split along its second axis as the step wants
        it."""
        if self.size == 1:
            return jax.device_put(chunk)
        split = NamedSharding(self.mesh, PartitionSpec(None, DATA_AXIS))
        if jax.process_count() > 1:
            chunk = jax.device_get(chunk)
        return chunk.replace(images=jax.device_put(chunk.images, split),
                             labels=jax.device_put(chunk.labels, split),
                             stats=jax.device_put(chunk.stats, self.replicated))

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


def is_primary() -> bool:
    """The process that writes the run's files and logs (process 0 of a multi-host job)."""
    return jax.process_index() == 0
