"""The suite's bit-exact claims under the XLA users run.

tests/conftest.py compiles the suite, and every process it starts, with most of XLA's
optimizations off (compiling tiny models dominates the suite's time). Optimized code sums in
another order, so "resume is bit-identical", "streamed equals on-device" and "4 devices train
like 1" are proven here again on programs compiled with the defaults: tests/optimized_runs.py
trains the TINY runs in a fresh process without the switch. The float32 fidelity step
(tests/test_fidelity.py) runs in the suite's process under the `optimized_xla` fixture; the
last test checks that the fixture compiles what a fresh optimized process compiles.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import REPO, xla_optimizations, xla_probe
from tests.sharded_runs import losses_agree
from tests.test_faults import _events, _params

FINAL = 20  # the runs' last step (tests/test_faults.py's FAULTS)


@pytest.fixture(scope="module")
def optimized(tmp_path_factory: pytest.TempPathFactory, fashion_dir: Path) -> tuple[Path, dict]:
    """(the runs' folder, their summaries), trained by one optimized child process."""
    out = tmp_path_factory.mktemp("optimized")
    env = {k: v for k, v in os.environ.items() if k != "JAX_DISABLE_MOST_OPTIMIZATIONS"}
    env |= {"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(REPO / "tests" / "optimized_runs.py"),
                           str(fashion_dir), str(out)], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    summaries = json.loads(done.stdout.strip().splitlines()[-1])
    assert summaries["disable_most_optimizations"] is False and summaries["device_count"] == 4
    return out, summaries


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(e["step"], e["train/loss"]) for e in _events(run_dir) if "train/loss" in e]


def _assert_bitwise_equal_runs(a: Path, b: Path) -> None:
    for x, y in zip(_params(a, FINAL), _params(b, FINAL), strict=True):
        np.testing.assert_array_equal(x, y)  # bitwise, not allclose
    assert _losses(a) == _losses(b) and len(_losses(a)) == 4


def test_a_sigterm_and_resume_ends_bit_identical_to_the_straight_run(optimized):
    out, summaries = optimized
    assert summaries["interrupted"]["status"] == "interrupted"
    assert summaries["resumed"]["status"] == "finished"
    assert summaries["resumed"]["resumed_from"] == 15
    _assert_bitwise_equal_runs(out / "straight", out / "resumed")
    assert summaries["resumed"]["final/test/loss"] == summaries["straight"]["final/test/loss"]


def test_a_streamed_run_is_bit_identical_to_the_device_resident_one(optimized):
    out, summaries = optimized
    _assert_bitwise_equal_runs(out / "straight", out / "streamed")
    assert summaries["streamed"]["final/test/loss"] == summaries["straight"]["final/test/loss"]


def test_four_devices_train_like_one(optimized):
    """As tests/test_parallel.py claims it: the same losses up to float order (the batch's sums
    are all-reduced across devices), the same test error up to a few of 10,000 images."""
    out, summaries = optimized
    one, four = dict(_losses(out / "straight")), dict(_losses(out / "four"))
    assert summaries["four"]["devices"] == 4 and summaries["straight"]["devices"] == 1
    assert len(one) == 4 and losses_agree(four, one)
    assert four[FINAL] < four[5]  # and it trains
    assert summaries["four"]["final/test/error"] == pytest.approx(
        summaries["straight"]["final/test/error"], abs=0.2)


def test_the_optimized_xla_fixture_compiles_as_a_fresh_optimized_process(optimized):
    """What tests/test_fidelity.py's float32 step relies on: in this (unoptimized) process the
    fixture's switch gives the bits an optimized process computes, which differ from the
    suite's unoptimized ones (so the probe tells the two apart)."""
    out, _ = optimized
    fresh = np.load(out / "probe.npy")
    with xla_optimizations(True):
        np.testing.assert_array_equal(xla_probe(), fresh)
    assert not np.array_equal(xla_probe(), fresh)


def test_the_documented_four_cpu_device_run_finishes(tmp_path: Path, fashion_dir: Path) -> None:
    """docs/scale.md's and the README's `XLA_FLAGS=--xla_force_host_platform_device_count=4
    cnnlab train`, as users run it: the `cnnlab` command, optimized XLA, the default run
    (ResNet-20 on fashion_mnist, 10 steps per call). Before the command sized XLA:CPU's thread
    pool (cnnlab/host_pool.py) it aborted every time, its threads all blocked in all-reduces
    (XLA's stuck-collective timeouts are shortened here so that such a failure is quick)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("JAX_DISABLE_MOST_OPTIMIZATIONS", "NPROC")
           and not k.startswith("WANDB_SERVICE")}
    env |= {"TFDS_DATA_DIR": str(fashion_dir), "PYTHONPATH": str(REPO),
            "XLA_FLAGS": "--xla_force_host_platform_device_count=4 "
                         "--xla_cpu_collective_call_warn_stuck_timeout_seconds=10 "
                         "--xla_cpu_collective_call_terminate_timeout_seconds=30"}
    done = subprocess.run([sys.executable, "-m", "cnnlab.cli", "train", "train.steps=20",
                           "train.eval_every=0", "progress=false", f"hydra.run.dir={tmp_path}"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["status"], summary["devices"], summary["final_step"]) == ("finished", 4, 20)
