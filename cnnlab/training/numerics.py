"""How a run's arithmetic is done: matmul precision, deterministic GPU ops, CPU kernels.

`train.matmul_precision` (default `highest`): what float32 matrix products and convolutions
compute in. `highest` is float32 everywhere, the numbers a CPU gives; `high` and `default`
let a GPU use TF32 (10-bit mantissa inputs) on Ampere and later, and a TPU bfloat16 passes,
faster and less exact. It sets `jax_default_matmul_precision`; bf16 runs
(`train.precision=bf16`) compute in bfloat16 whatever it says.

`train.deterministic` (default true): the training step is compiled with XLA's
`xla_gpu_deterministic_ops` (`compiler_options`), so that a GPU run gives the same bits twice
(no atomics in reductions, no autotuned nondeterministic convolution algorithms): what
bit-exact resume needs there. A compiler option of the step rather than `XLA_FLAGS`, which XLA
reads once when it starts (in `cnnlab train` that is while the config is checked, before the
run's settings apply). CPU and TPU programs are deterministic either way.

`train.cpu_kernels` (default `eigen`): which library XLA:CPU runs the training and
evaluation steps' convolutions in. jaxlib 0.10.2 hands them to YNNPACK (`ynnpack`, XLA's
default), whose convolutions run on one thread; `eigen` takes convolutions out of the YNNPACK
fusion types (`xla_cpu_experimental_ynn_fusion_type`, a compiler option of the steps), so that
Eigen runs each on every core, while dots and reductions stay YNNPACK's. On 2 cores: ResNet-20 +40%,
ResNet-18 +41%, ResNet-56 +23%; evaluating fashion_mnist's test set 4.2 s instead of 5.2
(docs/speed.md). Only programs compiled for the CPU get it.
"""

from typing import Any

import jax
from omegaconf import DictConfig

from cnnlab.errors import require

# train.cpu_kernels -> the step's XLA:CPU compiler options (none: XLA's default, YNNPACK).
# XLA's default in jaxlib 0.10.2 hands YNNPACK individual dots, individual convolutions and
# reductions; `eigen` leaves it the dots and reductions: with XLA's own reduction loops too,
# test_fidelity's float32 step was 1.3e-2 off its float64 gradient instead of 1e-5.
CPU_KERNELS: dict[str, dict[str, Any]] = {
    "eigen": {"xla_cpu_experimental_ynn_fusion_type":
              "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"},
    "ynnpack": {},
}

# train.matmul_precision -> jax_default_matmul_precision.
MATMUL_PRECISIONS = {"highest": "highest", "high": "high", "default": "default"}


def matmul_precision(train: DictConfig) -> str:
    """The setting's value (configs saved before the key: `highest`, which CPU always did)."""
    return train.get("matmul_precision") or "highest"


def deterministic(train: DictConfig) -> bool:
    value = train.get("deterministic")
    return True if value is None else bool(value)


def cpu_kernels(train: DictConfig) -> str:
    """The setting's value (configs saved before the key: `ynnpack`, as they trained)."""
    return train.get("cpu_kernels") or "ynnpack"


def validate(train: DictConfig) -> None:
    value = matmul_precision(train)
    require(value in MATMUL_PRECISIONS,
            f"train.matmul_precision={value} is not one of {', '.join(MATMUL_PRECISIONS)}")
    kernels = cpu_kernels(train)
    require(kernels in CPU_KERNELS,
            f"train.cpu_kernels={kernels} is not one of {', '.join(CPU_KERNELS)}")


def configure(train: DictConfig) -> None:
    """Apply `train.matmul_precision` to this process (before the steps are traced)."""
    validate(train)
    jax.config.update("jax_default_matmul_precision", MATMUL_PRECISIONS[matmul_precision(train)])


def compiler_options(train: DictConfig, platform: str) -> dict[str, Any]:
    """XLA options the training step (and, with the same kernels, the evaluation) is compiled
    with (`jax.jit(compiler_options=...)`) for devices of `platform` (`parallel.platform()`'s
    names)."""
    options = {"xla_gpu_deterministic_ops": True} if deterministic(train) else {}
    return {**options, **CPU_KERNELS[cpu_kernels(train)]} if platform == "cpu" else options
