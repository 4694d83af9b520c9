"""Run by tests/test_parallel.py in a process with 4 forced host devices (XLA_FLAGS must be set
before JAX starts, which the test process cannot do for itself): tiny fashion_mnist runs on 1, 2
and 4 devices, printed as one JSON line.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/sharded_runs.py DATA_DIR OUT
"""

import json
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from cnnlab import host_pool
from cnnlab.cli import preflight
from cnnlab.errors import ConfigError
from cnnlab.training.build import build
from tests.helpers import TINY, train_tiny

COMMON = ["train.steps=20", "train.log_every=5", "train.eval_every=10", "logger.mode=disabled"]


def losses_agree(a: dict, b: dict, rtol: float = 2e-3) -> bool:
    """Losses of the same run on other device counts: the first log window within 1e-5, later
    ones within `rtol`. Each device's kernel gradient sums its own images in one convolution
    (cnnlab/models/conv.py), so per-device batches round differently from one whole batch, and
    20 steps of this tiny net at lr 0.1 grow that to ~8e-4 by step 15 (measured 2026-12-05;
    the first window, 4e-7)."""
    first = min(a, key=int)
    return (a.keys() == b.keys() and abs(a[first] - b[first]) <= 1e-5 * abs(b[first])
            and all(abs(a[k] - b[k]) <= rtol * abs(b[k]) for k in a))


def losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {e["step"]: e["train/loss"] for e in map(json.loads, lines) if "train/loss" in e}


def test_errors(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {e["step"]: e["test/error"] for e in map(json.loads, lines) if "test/error" in e}


def collectives_in(hlo: str) -> list[str]:
    """The cross-device collectives a compiled program's text holds."""
    return sorted({op for op in ("all-reduce", "all-gather", "all-to-all", "reduce-scatter")
                   if op in hlo})


def collectives(data_dir: Path, devices: int) -> list[str]:
    """The cross-device collectives XLA put into the compiled training chunk."""
    cfg = preflight.compose([*TINY, f"dataset.data_dir={data_dir}", f"train.devices={devices}"])
    run = build(cfg)
    return collectives_in(
        run.train_chunk.lower(run.state, run.train_data, num_steps=1).compile().as_text())


def kernel_gradient_collectives(devices: int) -> list[str]:
    """The collectives of a layer's CPU kernel gradient taken as matmuls over batch tiles
    (cnnlab/models/conv.py), its batch split over `devices`, in 4 tiles: each tile must take
    images from every device's share, or XLA gathers the whole batch on every device."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from cnnlab.models import conv

    mesh = Mesh(np.array(jax.devices()[:devices]), ("data",))
    x = jax.ShapeDtypeStruct((32, 16, 16, 8), jnp.float32,
                             sharding=NamedSharding(mesh, PartitionSpec("data")))
    w = jnp.ones((3, 3, 8, 8))
    pads = ((1, 1), (1, 1))
    assert conv.takes_matmul_kernel_gradient(w.shape, (1, 1), pads, (32, 16, 16, 8))
    per_image = 18 * 16 * 3 * 8 * 4  # bytes of one image's shifted input
    conv.MATMUL_TILE_BYTES, budget = 8 * per_image, conv.MATMUL_TILE_BYTES
    try:
        loss = lambda w, x: jnp.sum(conv.conv_general_dilated(  # noqa: E731
            x, w, (1, 1), pads, dimension_numbers=("NHWC", "HWIO", "NHWC")) ** 2)
        return collectives_in(jax.jit(jax.grad(loss)).lower(w, x).compile().as_text())
    finally:
        conv.MATMUL_TILE_BYTES = budget


def pointwise_gradient_collectives(devices: int) -> list[str]:
    """The collectives of a 1x1/2 layer's CPU gradients (its kernel gradient one matmul over
    every image's pixels, conv._pointwise_kernel_gradient), its batch split over `devices`."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from cnnlab.models import conv

    mesh = Mesh(np.array(jax.devices()[:devices]), ("data",))
    x = jax.ShapeDtypeStruct((32, 9, 9, 8), jnp.float32,
                             sharding=NamedSharding(mesh, PartitionSpec("data")))
    loss = lambda w, x: jnp.sum(conv.conv_general_dilated(  # noqa: E731
        x, w, (2, 2), ((0, 0), (0, 0)), dimension_numbers=("NHWC", "HWIO", "NHWC")) ** 2)
    return collectives_in(jax.jit(jax.grad(loss)).lower(jnp.ones((1, 1, 8, 16)), x)
                          .compile().as_text())


def tiled_conv_collectives(devices: int) -> list[str]:
    """The collectives of a layer computed by `train.conv_impl=im2col` (cnnlab/models/conv_impl
    .py: batch tiles in a loop, forward and both gradients), its batch split over `devices`,
    in 4 tiles of 8 images."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from cnnlab.models import conv_impl

    mesh = Mesh(np.array(jax.devices()[:devices]), ("data",))
    x = jax.ShapeDtypeStruct((32, 8, 8, 4), jnp.float32,
                             sharding=NamedSharding(mesh, PartitionSpec("data")))
    loss = lambda w, x: jnp.sum(conv_impl.tiled(  # noqa: E731
        conv_impl.im2col, x, w, (1, 1), ((1, 1), (1, 1)), tile=8) ** 2)
    return collectives_in(jax.jit(jax.grad(loss, (0, 1))).lower(jnp.ones((3, 3, 4, 4)), x)
                          .compile().as_text())


def main(data_dir: Path, out: Path) -> None:
    results: dict = {"device_count": jax.device_count()}
    for devices in (1, 4):
        run_dir = out / f"devices{devices}"
        summary = train_tiny(run_dir, data_dir, [*COMMON, f"train.devices={devices}"])
        results[f"devices{devices}"] = {
            "losses": losses(run_dir), "test_errors": test_errors(run_dir),
            "summary": {k: summary.get(k) for k in ("devices", "device_kind", "platform",
                                                    "processes", "status")}}
    # Streamed through Grain (in-process reads), each chunk's batches split over 4 devices.
    streamed = out / "streamed4"
    summary = train_tiny(streamed, data_dir, [*COMMON, "train.devices=4", "dataset.on_device=false",
                                              "dataset.stream_workers=0"])
    results["streamed4"] = {"losses": losses(streamed), "test_errors": test_errors(streamed),
                            "devices": summary["devices"]}
    # Resume across device counts: the 4-device run as if killed after its checkpoint at step
    # 10, resumed on 2 devices.
    resumed = out / "resumed"
    shutil.copytree(out / "devices4", resumed)
    shutil.rmtree(resumed / "checkpoints" / "20")
    (resumed / "summary.json").unlink()
    summary = train_tiny(resumed, data_dir, [*COMMON, "train.devices=2"])
    results["resumed"] = {"losses": losses(resumed), "test_errors": test_errors(resumed),
                          "resumed_from": summary["resumed_from"], "devices": summary["devices"]}
    results["collectives"] = {n: collectives(data_dir, n) for n in (1, 4)}
    results["kernel_gradient_collectives"] = kernel_gradient_collectives(4)
    results["pointwise_gradient_collectives"] = pointwise_gradient_collectives(4)
    results["tiled_conv_collectives"] = tiled_conv_collectives(4)
    try:
        build(preflight.compose([*TINY, f"dataset.data_dir={data_dir}", "train.batch_size=30"]))
    except ConfigError as error:
        results["indivisible"] = str(error)
    print(json.dumps(results))


if __name__ == "__main__":
    host_pool.size_host_pool()  # as `cnnlab` does: 4 host devices need the threads
    main(Path(sys.argv[1]), Path(sys.argv[2]))
