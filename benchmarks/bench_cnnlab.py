"""One cnnlab run of the `make bench` suite, in its own process: prints one JSON line.

cnnlab trains with its real compiled chunk of `train.steps_per_call` steps (cnnlab.training.steps,
built by cnnlab.training.build.build) on random uint8 images held in memory, with the entry's
augmentation, per-channel normalization, cross-entropy and SGD (momentum 0.9, weight decay
1e-4), fp32. The first calls (compilation included) are untimed; compile_s is their time
beyond that of as many steady-state calls. Peak memory: the device's peak bytes in use on a
GPU, the process's peak RSS on the CPU (why each (entry, framework) gets its own process).

    python -m benchmarks.bench_cnnlab --model resnet20 --steps 10 --warmup 10
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import jax
import numpy as np

from benchmarks.suite import (
    Entry,
    add_entry_args,
    emit,
    entry_from_args,
    peak_rss_mib,
    warmup_overhead_s,
)
from cnnlab import host_memory
from cnnlab.cli.preflight import compose
from cnnlab.data.preprocess import PreprocessStats
from cnnlab.data.types import ArraySplit, Dataset
from cnnlab.models import count_params
from cnnlab.training.build import build


def synthetic_dataset(n: int, shape: tuple[int, int, int], num_classes: int,
                      seed: int = 0) -> Dataset:
    """Random uint8 images in memory, with fixed per-channel statistics."""
    rng = np.random.default_rng(seed)
    train = ArraySplit(rng.integers(0, 256, (n, *shape), dtype=np.uint8),
                            rng.integers(0, num_classes, (n,), dtype=np.int32))
    mean, std = np.full((shape[-1],), 0.5, np.float32), np.full((shape[-1],), 0.25, np.float32)
    return Dataset("synthetic", train, train, None, num_classes, shape, mean, std,
                        preprocess=PreprocessStats(mean=mean, std=std))


def overrides_for(entry: Entry, extra: list[str]) -> list[str]:
    """The entry's config; `extra` comes last, so a variant's override wins."""
    return [*entry.cnnlab, "optimizer=momentum", "train.precision=fp32",
            f"train.batch_size={entry.batch_size}",
            f"train.steps_per_call={entry.steps_per_call}", *extra]


def peak_device_mib(device: jax.Device) -> float | None:
    """Peak bytes the device's allocator held (GPU/TPU); None where it keeps no statistics."""
    stats = device.memory_stats() if device.platform != "cpu" else None
    return stats["peak_bytes_in_use"] / 2**20 if stats and "peak_bytes_in_use" in stats else None


def timed_calls(bench, state, steps_per_call: int, n: int, step: int = 0) -> tuple:
    """`n` calls of the run's chunk from `step` on, each timed to completion (the state is
    waited on); each gets its data as `cnnlab train`'s loop hands it over (`chunk_data`: the
    epochs' orders, drawn once per epoch)."""
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        data = bench.chunk_data(step + i * steps_per_call, steps_per_call)
        state, _ = bench.train_chunk(state, data, steps_per_call)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t0)
    return state, times


def run(entry: Entry, extra: list[str]) -> dict:
    cfg = compose(overrides_for(entry, extra))
    spc = cfg.train.steps_per_call
    bench = build(cfg, synthetic_dataset(entry.num_images, entry.shape, entry.num_classes))
    warm_calls = max(1, math.ceil(entry.warmup / spc))
    state, warm = timed_calls(bench, bench.state, spc, warm_calls)
    calls = max(1, math.ceil(entry.steps / spc))
    start = time.perf_counter()
    state, times = timed_calls(bench, state, spc, calls, step=warm_calls * spc)
    elapsed = time.perf_counter() - start
    device = jax.devices()[0]
    median_call = statistics.median(times)
    on_cpu = device.platform == "cpu"
    return {
        "framework": "cnnlab", "model": entry.name, "batch_size": cfg.train.batch_size,
        "input": entry.input, "params": count_params(state.params),
        "images_per_sec": calls * spc * cfg.train.batch_size / elapsed,
        "step_ms_median": 1000 * median_call / spc, "steps": calls * spc,
        "steps_per_call": spc, "compile_s": warmup_overhead_s(warm, median_call),
        "first_call_s": warm[0],
        "peak_mib": peak_rss_mib() if on_cpu else peak_device_mib(device),
        "peak_kind": "process peak RSS" if on_cpu else "device peak bytes in use",
        "platform": device.platform, "device": str(device.device_kind),
        "threads": None, "overrides": list(extra), "host_huge_pages": host_memory.huge_pages(),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_entry_args(p)
    p.add_argument("--overrides", nargs="*", default=[], help="extra cnnlab config overrides")
    args = p.parse_args(argv)
    emit(run(entry_from_args(args), args.overrides))


if __name__ == "__main__":
    main()
