"""Ahead-of-time compilation of a run's training chunk for an accelerator this host does not
have (`cnnlab compile`), after MaxText's train_compile.py: the target compiler's devices
(cnnlab/training/chips.py), a mesh over them, the run's state and data as abstract arrays with
the shardings training gives them, and `jax.jit(...).lower(...).compile()`. The compiled
program's memory and cost analyses say whether the run fits a chip and how long a step takes at
best (its roofline).

The chunk is `build.make_chunk`'s, the function `cnnlab train` runs; nothing is allocated or
read (the training set's statistics come from a few synthetic images: only their shapes count).
"""

import dataclasses
import re
import time
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from omegaconf import DictConfig

from cnnlab import parallel
from cnnlab.data import placement as data_placement
from cnnlab.data import preprocess
from cnnlab.data.augment.pipeline import make_augment
from cnnlab.data.device import DeviceSplit, StreamedChunk
from cnnlab.data.load import channel_mean_std
from cnnlab.data.order import OrderedSplit, epochs_spanned
from cnnlab.data.types import ArraySplit, Dataset
from cnnlab.errors import ConfigError, require
from cnnlab.models import abstract_variables, build_model
from cnnlab.training import build, chips, steps
from cnnlab.training.optim import make_optimizer, make_schedule

# The collectives counted in the compiled program (asynchronous ones by their -start half).
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
_COLLECTIVE = re.compile(r"\s(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
# What XLA says when a program cannot fit the device's memory.
_OUT_OF_MEMORY = ("RESOURCE_EXHAUSTED", "Ran out of memory", "out of memory")


class DoesNotFit(ConfigError):
    """The run cannot fit the target's memory (the compiler refused it, or its analysis)."""


@dataclasses.dataclass(frozen=True)
class Compiled:
    """What compiling a run for a target says; `summary()` is the command's JSON line."""

    target: chips.Target
    devices: int
    steps_per_call: int
    # Steps the cost analysis counts: XLA costs a loop's body once, so a chunk rolled into a
    # loop (off CPU, steps.unroll_for) is costed as one step, an unrolled one as all of them;
    # and a step whose train.grad_accum microbatches are a rolled loop (off CPU) as one of them:
    # 1/K of a step (the optimizer's update, outside the loop, then counts K times: a few
    # tenths of a percent of a ResNet's step).
    costed_steps: float
    data: str  # where the training set is: on the device, or streamed chunk by chunk
    memory: dict[str, int]  # memory_analysis(), per device
    compile_s: tuple[float, float]  # wall and CPU seconds
    flops: float  # per device, per chunk (cost_analysis)
    bytes_accessed: float
    cost_source: str
    collectives: dict[str, int]
    precision: str

    @property
    def per_device_bytes(self) -> int:
        """Arguments + outputs + temporaries + code, less the outputs that reuse a donated
        argument's buffer (the state, updated in place)."""
        m = self.memory
        return m["argument"] + m["output"] - m["alias"] + m["temp"] + m["code"]

    @property
    def fits(self) -> bool:
        return self.per_device_bytes <= self.target.chip.memory_bytes

    @property
    def roofline_step_s(self) -> float:
        chip = self.target.chip
        return max(self.flops / chip.peak(self.precision),
                   self.bytes_accessed / chip.bandwidth) / self.costed_steps

    def summary(self) -> dict[str, Any]:
        per_step = self.costed_steps
        return {"target": self.target.name, "devices": self.devices,
                "per_device_bytes": self.per_device_bytes,
                "device_memory_bytes": self.target.chip.memory_bytes, "fits": self.fits,
                "compile_s": round(self.compile_s[0], 2),
                "compile_cpu_s": round(self.compile_s[1], 2),
                "flops_per_step": self.flops / per_step,
                "bytes_per_step": self.bytes_accessed / per_step,
                "collectives": self.collectives, "roofline_step_s": self.roofline_step_s,
                "steps_per_call": self.steps_per_call, "precision": self.precision,
                "data": self.data,
                "cost_source": self.cost_source,
                "memory": self.memory}


def collectives(hlo_text: str) -> dict[str, int]:
    """{collective: count} of the operations in an HLO module's text."""
    found: dict[str, int] = {}
    for name in _COLLECTIVE.findall(hlo_text):
        found[name] = found.get(name, 0) + 1
    return dict(sorted(found.items()))


def _stand_in_dataset(cfg: DictConfig) -> Dataset:
    """A few synthetic images of the run's shape: the statistics `cfg.preprocess` computes from
    them have the shapes of the real ones, which is all a compile needs."""
    shape = tuple(cfg.dataset.image_shape)
    images = np.random.default_rng(0).integers(0, 256, (8, *shape), dtype=np.uint8)
    split = ArraySplit(images, np.zeros(8, np.int32))
    mean, std = channel_mean_std(images)
    return Dataset(cfg.dataset.name, split, split, None, cfg.dataset.num_classes, shape, mean,
                   std)


def _abstract(tree: Any, sharding: NamedSharding) -> Any:
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype, sharding=sharding),
                        tree)


def _abstract_data(cfg: DictConfig, stats: Any, placement: parallel.Placement,
                   on_device: bool) -> OrderedSplit | StreamedChunk:
    """The training data as the chunk receives it: the whole split replicated on every device,
    or a streamed chunk's batches split along their batch axis (cnnlab/parallel.py)."""
    shape, batch = tuple(cfg.dataset.image_shape), cfg.train.batch_size
    whole = placement.replicated
    stats = _abstract(stats, whole)
    if not on_device:
        split = NamedSharding(placement.mesh, PartitionSpec(None, parallel.DATA_AXIS))
        steps = cfg.train.steps_per_call
        return StreamedChunk(
            images=jax.ShapeDtypeStruct((steps, batch, *shape), np.uint8, sharding=split),
            labels=jax.ShapeDtypeStruct((steps, batch), np.int32, sharding=split), stats=stats)
    ds = cfg.dataset
    require(ds.train_size is not None, f"dataset {ds.name} declares no train_size, which a "
            "compile needs for the device-resident training set: set dataset.train_size=N")
    n = ds.train_size if ds.max_examples is None else min(ds.train_size, ds.max_examples)
    require(batch <= n, f"train.batch_size={batch} exceeds the {n} training examples of "
            f"{ds.name}")
    split = DeviceSplit(images=jax.ShapeDtypeStruct((n, *shape), np.uint8, sharding=whole),
                        labels=jax.ShapeDtypeStruct((n,), np.int32, sharding=whole),
                        mask=jax.ShapeDtypeStruct((n,), np.bool_, sharding=whole), stats=stats)
    # With the epochs' permutations, as the training loop hands a chunk its data (data/order.py).
    count = epochs_spanned(cfg.train.steps_per_call, n // batch)
    order = jax.ShapeDtypeStruct((n,), np.int32, sharding=whole)
    return OrderedSplit(split, (order,) * count,
                        jax.ShapeDtypeStruct((), np.int32, sharding=whole))


def lower(cfg: DictConfig, placement: parallel.Placement, device_bytes: int,
          chunk_maker: Any = build.make_chunk) -> tuple[Any, str]:
    """The run's training chunk lowered over `placement`'s devices (call within
    `parallel.compiling_for`), and where its training set is. `chunk_maker`: `build.make_chunk`,
    or an experiment's variant of it with the same arguments."""
    require(cfg.transfer.mode == "scratch", f"transfer={cfg.transfer.mode}: cnnlab compile "
            "compiles transfer=scratch runs (a source's weights have the same shapes)")
    placement.check_batch("train.batch_size", cfg.train.batch_size)
    dataset = _stand_in_dataset(cfg)
    stats = preprocess.compute_stats(cfg.preprocess, dataset)
    lighting = (preprocess.channel_pca(dataset.train.images) if cfg.augment.lighting else None)
    model = build_model(cfg, dataset.num_classes)
    tx = make_optimizer(cfg.optimizer, make_schedule(cfg.schedule, cfg.optimizer.lr,
                                                     cfg.train.steps))
    shape = tuple(cfg.dataset.image_shape)
    state = jax.eval_shape(lambda v: build.state_of(cfg, tx, v, jax.random.PRNGKey(0)),
                           abstract_variables(model, shape))
    where = data_placement.target_location(cfg, device_bytes)
    data = _abstract_data(cfg, stats, placement, where.on_device)
    chunk = chunk_maker(cfg, model, tx, make_augment(cfg.augment, lighting), placement)
    lowered = chunk.lower(_abstract(state, placement.replicated), data,
                          num_steps=cfg.train.steps_per_call)
    return lowered, "on the device" if where.on_device else "streamed"


def _memory(compiled: Any) -> dict[str, int]:
    m = compiled.memory_analysis()
    return {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
            "alias": m.alias_size_in_bytes, "temp": m.temp_size_in_bytes,
            "code": m.generated_code_size_in_bytes}


def _hlo_cost(module: Any) -> dict[str, float]:
    """XLA's HLO cost analysis of `module`, run on this host."""
    from jax._src.lib import xla_client

    return xla_client._xla.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module)


def _cost(lowered: Any, compiled: Any, devices: int) -> tuple[float, float, str]:
    """(flops, bytes accessed) per device of a chunk, and where they come from. The TPU
    compiler reports them for the program it made. The GPU compiler reports none, and costing
    its optimized module would miss the convolutions (cuDNN calls): there the FLOPs are the
    program's before partitioning over `devices` devices, and the bytes its optimized module's."""
    cost = compiled.cost_analysis()
    if cost:
        return float(cost["flops"]), float(cost["bytes accessed"]), "compiler"
    whole = _hlo_cost(lowered.compiler_ir("hlo").get_hlo_module())
    optimized = _hlo_cost(compiled.runtime_executable().hlo_modules()[0])
    return (whole["flops"] / devices, float(optimized["bytes accessed"]),
            "HLO cost analysis (FLOPs before partitioning / devices)")


def _costed_microbatches(platform: str, grad_accum: int) -> int:
    """Of a step's `grad_accum` microbatches, how many XLA's cost analysis counts as one: all of
    them where they are a rolled loop (steps.py's default, off CPU: a loop's body is costed
    once), 1 where they are unrolled (steps.ACCUMULATE_LOOPS: CPU; every copy is counted)."""
    return 1 if platform in steps.ACCUMULATE_LOOPS else grad_accum


def _one_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(error).__name__


def compile_for(cfg: DictConfig, target: chips.Target,
                chunk_maker: Any = build.make_chunk) -> Compiled:
    """Compile the run `cfg` describes for `target`; DoesNotFit when its compiler refuses it for
    memory."""
    devices = chips.devices(target)
    wanted = cfg.train.devices
    require(wanted is None or 1 <= wanted <= len(devices), f"train.devices={wanted}: "
            f"{target.name} has {len(devices)} devices; choose 1..{len(devices)} or null (all)")
    placement = parallel.Placement.over(devices[:wanted])
    with parallel.compiling_for(devices):
        lowered, data = lower(cfg, placement, target.chip.memory_bytes, chunk_maker)
        start, start_cpu = time.perf_counter(), time.process_time()
        try:
            compiled = lowered.compile()
        except Exception as e:  # XlaRuntimeError; its kind is only in the message
            if any(word in str(e) for word in _OUT_OF_MEMORY):
                raise DoesNotFit(f"does not fit {target.name}: the compiler ran out of device "
                                 f"memory ({_one_line(e)})") from None
            raise
        # CPU seconds too: on a shared machine the wall time is mostly waiting for a core.
        seconds = (time.perf_counter() - start, time.process_time() - start_cpu)
    flops, accessed, source = _cost(lowered, compiled, placement.size)
    per_call = cfg.train.steps_per_call
    costed = (steps.unroll_for(placement.platform, per_call)
              / _costed_microbatches(placement.platform, cfg.train.grad_accum or 1))
    return Compiled(target, placement.size, per_call, costed, data, _memory(compiled), seconds,
                    flops, accessed, source, collectives(compiled.as_text()),
                    cfg.train.precision or "fp32")
