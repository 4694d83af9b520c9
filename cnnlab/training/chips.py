"""Accelerator chips and topologies that `cnnlab compile` (cnnlab/training/aot.py) compiles
for without having them: each chip's memory, peak FLOP/s and memory bandwidth, and how to get
its devices from the target's compiler on this host.

The figures are per chip, from the vendors' public spec sheets:

- TPU v4, v5e, v5p, v6e: Google Cloud's "TPU v4", "TPU v5e", "TPU v5p" and "TPU v6e" pages
  (cloud.google.com/tpu/docs/v4, .../v5e, .../v5p, .../v6e): HBM 32 GiB / 16 GiB / 95 GiB /
  32 GiB, bf16 peak 275 / 197 / 459 / 918 TFLOP/s, HBM bandwidth 1,200 / 819 / 2,765 / 1,640
  GB/s. Google publishes no float32 peak: under JAX's default matmul precision a float32 dot or
  convolution runs as one bfloat16 pass on the MXU, so the float32 column is the bf16 peak
  (precision=highest would take about six passes).
- H100 SXM5 80 GB: NVIDIA's H100 datasheet: 3.35 TB/s, bf16 989 TFLOP/s dense (1,979 is with
  2:4 sparsity), TF32 495 TFLOP/s dense. A100 SXM4 80 GB: NVIDIA's A100 datasheet: 2,039 GB/s,
  bf16 312 TFLOP/s, TF32 156 TFLOP/s. The float32 column is TF32, what XLA runs float32 dots
  and convolutions in on these GPUs by default (docs/scale.md).

A GPU target also needs XLA's description of the device (`gpu_specs/*.txtpb` beside this
file, openxla/xla's xla/tools/hlo_opt/gpu_specs format).
"""

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

from cnnlab.errors import ConfigError, require
from cnnlab.registry import Registry

GPU_SPECS = Path(__file__).with_name("gpu_specs")
GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    platform: str  # "tpu" or "gpu": which compiler, and the extra that brings it
    memory_bytes: int  # HBM per chip
    peak_bf16: float  # FLOP/s per chip, dense
    peak_fp32: float  # FLOP/s per chip of float32 dots at JAX's default precision (see above)
    bandwidth: float  # HBM bytes/s per chip
    # TPU: the TPU_ACCELERATOR_TYPE prefix libtpu expects, and TensorCores per chip (v4 and v5p
    # name slices by cores: 4 chips are v4-8). GPU: the device description file.
    accelerator: str
    cores_per_chip: int = 1

    def peak(self, precision: str | None) -> float:
        return self.peak_bf16 if precision == "bf16" else self.peak_fp32


CHIPS: Registry[Chip] = Registry("chip")
CHIPS.register("v4", Chip("tpu", 32 * GiB, 275e12, 275e12, 1200e9, "v4", cores_per_chip=2))
CHIPS.register("v5e", Chip("tpu", 16 * GiB, 197e12, 197e12, 819e9, "v5litepod"))
CHIPS.register("v5p", Chip("tpu", 95 * GiB, 459e12, 459e12, 2765e9, "v5p", cores_per_chip=2))
CHIPS.register("v6e", Chip("tpu", 32 * GiB, 918e12, 918e12, 1640e9, "v6e"))
CHIPS.register("h100", Chip("gpu", 80 * 10**9, 989e12, 495e12, 3350e9, "h100_sxm.txtpb"))
CHIPS.register("a100", Chip("gpu", 80 * 10**9, 312e12, 156e12, 2039e9, "a100.txtpb"))

# What each platform's compiler needs installed (pyproject's optional extras), by module.
EXTRAS = {"tpu": ("libtpu", "tpu"), "gpu": ("jax_cuda13_plugin", "gpu")}


@dataclasses.dataclass(frozen=True)
class Target:
    """`tpu:v5e:2x2`: a platform, a chip and the topology of a slice of those chips."""

    name: str
    chip_name: str
    chip: Chip
    topology: str

    @property
    def platform(self) -> str:
        return self.chip.platform

    @property
    def chips(self) -> int:
        return math.prod(int(d) for d in self.topology.split("x"))


def parse_target(text: str) -> Target:
    """`PLATFORM:CHIP:TOPOLOGY` (tpu:v5e:2x2, tpu:v4:2x2x1, gpu:h100:1x1x4) or a ConfigError."""
    parts = text.split(":")
    require(len(parts) == 3, f"target '{text}' is not PLATFORM:CHIP:TOPOLOGY, e.g. tpu:v5e:2x2, "
            "tpu:v4:2x2x1, gpu:h100:1x1x4")
    platform, chip_name, topology = parts
    chip = CHIPS.get(chip_name)
    require(platform == chip.platform, f"target '{text}': {chip_name} is a {chip.platform} chip; "
            f"write {chip.platform}:{chip_name}:{topology}")
    dims = topology.split("x")
    require(all(d.isdigit() and int(d) > 0 for d in dims) and len(dims) in (2, 3),
            f"target '{text}': topology '{topology}' must be 2 or 3 positive sizes joined by x "
            "(2x2, 2x2x1, 1x1x4)")
    return Target(text, chip_name, chip, topology)


def prepare_environment(target: Target) -> None:
    """Before JAX starts its backends: this host's own CPU is enough (the target's compiler
    needs no device), and libtpu is told which slice it is (else it probes the machine)."""
    os.environ["JAX_PLATFORMS"] = "cpu"
    if target.platform == "tpu":
        cores = target.chips * target.chip.cores_per_chip
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{target.chip.accelerator}-{cores}")
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        # libtpu otherwise holds a lock file that a second compiling process (a parallel test,
        # a sweep) fails on: no chip is opened here, so there is nothing to share.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    else:
        # The CUDA plugin otherwise refuses to load beside CUDA libraries it cannot check
        # without a driver.
        os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")


def missing_extra(target: Target) -> str | None:
    """The one-line refusal when the target's compiler is not installed, else None."""
    import importlib.util

    module, extra = EXTRAS[target.platform]
    if importlib.util.find_spec(module) is not None:
        return None
    return (f"compiling for {target.name} needs {module}: pip install 'cnnlab[{extra}]' (in its "
            "own environment: docs/scale.md, `cnnlab compile`)")


def devices(target: Target) -> list[Any]:
    """The target's devices, from its compiler's topology description (no hardware needed)."""
    from jax.experimental import topologies

    if target.platform == "tpu":
        # Two TensorCores per chip are one JAX device ("megacore"), as on a v4 or v5p VM.
        megacore = {"chip_config_name": "megacore"} if target.chip.cores_per_chip == 2 else {}
        description = topologies.get_topology_desc(f"{target.chip_name}:{target.topology}",
                                                   "tpu", **megacore)
    else:
        spec = GPU_SPECS / target.chip.accelerator
        if not spec.exists():
            raise ConfigError(f"no device description {spec} for {target.name}")
        description = topologies.get_topology_desc(
            target.chip_name, "cuda", target_config=spec.read_text(), topology=target.topology)
    found = list(description.devices)
    require(len(found) == target.chips, f"target {target.name}: its compiler gave "
            f"{len(found)} devices for {target.chips} chips")
    return found
