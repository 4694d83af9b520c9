"""Run by tests/test_optimized_xla.py in a fresh process that compiles as users' runs do, with
XLA's default optimizations (tests/conftest.py turns most of them off for the suite and the
processes it starts) and 4 forced host devices: the TINY runs behind the suite's bit-exact
claims, written under OUT, their summaries printed as one JSON line, and `xla_probe`'s bits.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/optimized_runs.py DATA OUT
"""

import json
import signal
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from cnnlab import host_pool
from tests.helpers import train_tiny, xla_probe
from tests.test_faults import FAULTS, _signal_at

# 20 steps of 5 per compiled call, a checkpoint every 5, on one device unless said otherwise.
ONE = [*FAULTS, "train.devices=1"]
# Streamed through Grain, read in this process (no worker processes to start).
STREAMED = ["dataset.on_device=false", "dataset.stream_workers=0", "dataset.stream_threads=2"]


def main(data_dir: Path, out: Path) -> None:
    results: dict = {"disable_most_optimizations": jax.config.read(
        "jax_disable_most_optimizations"), "device_count": jax.device_count(), "seconds": {}}

    def run(name: str, folder: str, overrides: list[str]) -> None:
        start = time.perf_counter()  # for docs/development.md; never asserted
        results[name] = train_tiny(out / folder, data_dir, overrides)
        results["seconds"][name] = round(time.perf_counter() - start, 1)

    run("straight", "straight", ONE)
    # Stopped by SIGTERM after step 10 (it checkpoints at 15), then resumed.
    with pytest.MonkeyPatch.context() as patch:
        _signal_at(patch, 10, signal.SIGTERM)
        run("interrupted", "resumed", ONE)
    run("resumed", "resumed", ONE)
    run("streamed", "streamed", [*ONE, *STREAMED])
    run("four", "four", [*FAULTS, "train.devices=4"])
    np.save(out / "probe.npy", xla_probe())
    print(json.dumps(results, default=str))


if __name__ == "__main__":
    host_pool.size_host_pool()  # as `cnnlab` does: 4 host devices need the threads
    main(Path(sys.argv[1]), Path(sys.argv[2]))
