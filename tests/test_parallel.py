"""Data parallelism (cnnlab/parallel.py): the same run on 1, 2 and 4 devices.

The sharded runs need several devices, which a CPU has only when XLA is told before JAX starts
(`--xla_force_host_platform_device_count`): tests/sharded_runs.py runs them in one child process
with 4 host devices.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cnnlab import host_pool, parallel
from cnnlab.cli.preflight import validate
from cnnlab.errors import ConfigError
from tests.helpers import REPO, compose_config
from tests.multihost_run import launch, report
from tests.sharded_runs import losses_agree


def _sharded_runs(out: Path, fashion_dir: Path) -> dict:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(REPO / "tests" / "sharded_runs.py"),
                           str(fashion_dir), str(out)], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_same_run_on_one_to_four_devices_and_two_processes(
        tmp_path: Path, fashion_dir: Path) -> None:
    """One test, so that one test process runs the sharded runs (they take a minute) once."""
    sharded = _sharded_runs(tmp_path, fashion_dir)
    _four_devices_train_like_one(sharded)
    _a_streamed_run_splits_its_batches_too(sharded)
    _the_step_is_partitioned_over_the_devices(sharded)
    _summary_records_devices(sharded)
    _a_run_resumes_on_another_device_count(sharded)
    _a_batch_that_does_not_split_is_refused(sharded)
    _a_two_process_slurm_job_trains_like_one_device(sharded, tmp_path, fashion_dir)


def _four_devices_train_like_one(sharded: dict) -> None:
    one, four = sharded["devices1"], sharded["devices4"]
    assert sharded["device_count"] == 4
    assert len(one["losses"]) == 4 and losses_agree(four["losses"], one["losses"])
    # The same predictions up to float order: the same error counts on 1,024 test images.
    assert four["test_errors"] == pytest.approx(one["test_errors"], abs=0.2)
    assert four["losses"]["20"] < four["losses"]["5"]  # and it trains


def _a_streamed_run_splits_its_batches_too(sharded: dict) -> None:
    streamed, one = sharded["streamed4"], sharded["devices1"]
    assert streamed["devices"] == 4
    assert losses_agree(streamed["losses"], one["losses"])
    assert streamed["test_errors"] == pytest.approx(one["test_errors"], abs=0.2)


def _the_step_is_partitioned_over_the_devices(sharded: dict) -> None:
    # One device: no collective at all; four: the loss, gradients and BN statistics all-reduced.
    assert sharded["collectives"] == {"1": [], "4": ["all-reduce"]}
    # The CPU kernel gradient's batch tiles keep each device's images on it: the sum over
    # the devices is the only collective.
    assert sharded["kernel_gradient_collectives"] == ["all-reduce"]
    assert sharded["pointwise_gradient_collectives"] == ["all-reduce"]  # 1x1: one matmul
    assert sharded["tiled_conv_collectives"] == ["all-reduce"]  # train.conv_impl's tiles too


def _summary_records_devices(sharded: dict) -> None:
    assert sharded["devices1"]["summary"] == {
        "devices": 1, "device_kind": "cpu", "platform": "cpu", "processes": 1,
        "status": "finished"}
    assert sharded["devices4"]["summary"]["devices"] == 4


def _a_run_resumes_on_another_device_count(sharded: dict) -> None:
    resumed, four = sharded["resumed"], sharded["devices4"]
    assert resumed["resumed_from"] == 10 and resumed["devices"] == 2
    assert losses_agree(resumed["losses"], four["losses"])
    assert resumed["test_errors"] == pytest.approx(four["test_errors"], abs=0.2)


@pytest.mark.parametrize("override, message", [
    ("train.devices=0", "train.devices=0 must be a positive integer or null"),
    ("train.distributed=sometimes",
     "train.distributed='sometimes' is not one of auto, true, false"),
])
def test_bad_parallel_settings_are_one_line(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate(compose_config([override]))


def test_more_devices_than_the_machine_has() -> None:
    import jax

    count = jax.device_count()
    with pytest.raises(ConfigError, match=f"train.devices={count + 1}: this machine has {count}"):
        parallel.resolve_devices(count + 1)


def _a_batch_that_does_not_split_is_refused(sharded: dict) -> None:
    assert sharded["indivisible"] == ("train.batch_size=30 does not split over 4 devices; use "
                                      "a multiple of 4 or train.devices=N with N dividing 30")


@pytest.mark.parametrize("value, expected", [(None, "auto"), (True, "true"), ("False", "false"),
                                             ("auto", "auto")])
def test_distributed_modes(value: object, expected: str) -> None:
    assert parallel.check_distributed(value) == expected


def test_auto_joins_only_a_multi_task_slurm_job(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(parallel.jax.distributed, "initialize", lambda: calls.append(1))
    monkeypatch.setattr(parallel.jax.distributed, "is_initialized", lambda: False)
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert not parallel.initialize_distributed("auto") and not calls
    monkeypatch.setenv("SLURM_NTASKS", "8")
    assert not parallel.initialize_distributed("false") and not calls
    assert parallel.initialize_distributed("auto") and calls == [1]


def _a_two_process_slurm_job_trains_like_one_device(
        sharded: dict, out: Path, fashion_dir: Path) -> None:
    run_dir = out / "two_processes"
    reports = [report(r) for r in launch([str(fashion_dir), str(run_dir)])]
    assert [(r["process"], r["processes"], r["devices"]) for r in reports] == [(0, 2, 4), (1, 2, 4)]
    # Each process put on its 2 devices its half of the 1,024 training images (the set is split
    # by rows over the 4 devices), and nothing through device_put's cross-process check (an
    # all-gather of every process's copy).
    assert [r["placed_rows"] for r in reports] == [512, 512]
    assert [r["placed_bytes"] for r in reports] == [512 * 28 * 28] * 2
    assert [r["equality_checks"] for r in reports] == [0, 0]
    # One set of files, written by process 0, with the one-device run's losses.
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["devices"] == 4
    assert summary["processes"] == 2
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {str(e["step"]): e["train/loss"] for e in metrics if "train/loss" in e}
    assert losses_agree(losses, sharded["devices1"]["losses"])
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["10", "20"]


@pytest.mark.parametrize("environ, threads", [
    ({"XLA_FLAGS": "--xla_cpu_enable_fast_math=false --xla_force_host_platform_device_count=4"},
     16),
    ({"JAX_NUM_CPU_DEVICES": "2", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}, 8),
    ({"JAX_NUM_CPU_DEVICES": "3"}, 12),
    ({"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}, None),
    ({}, None),
    ({"NPROC": "6", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}, None),
])
def test_several_host_devices_get_four_pool_threads_each(environ: dict, threads: int | None,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """cnnlab/host_pool.py: what `cnnlab` sets before JAX starts (NPROC sizes XLA:CPU's
    thread pool); a user's own NPROC is kept. Two cores here, so the devices decide."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    before = dict(environ)
    assert host_pool.size_host_pool(environ) == threads
    assert environ == (before if threads is None else {**before, "NPROC": str(threads)})


class _Device:
    def __init__(self, platform: str, process_index: int = 0) -> None:
        self.platform, self.process_index = platform, process_index


@pytest.mark.parametrize("devices, environ, warns", [
    ([_Device("cpu")] * 4, {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}, True),
    ([_Device("cpu")] * 2, {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}, True),
    ([_Device("cpu")], {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}, False),
    ([_Device("cpu")] * 4, {"NPROC": "16"}, False),  # as `cnnlab` sets it
    ([_Device("cpu")] * 4, {"NPROC": "12"}, True),
    ([_Device("cpu", p) for p in range(4)], {}, False),  # one per process (gloo): no pool shared
    ([_Device("gpu")] * 4, {}, False),
])
def test_a_run_on_host_devices_without_enough_threads_is_warned(
        devices: list, environ: dict, warns: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where JAX was started without `cnnlab` (a script of its own): one line saying what to
    set. The pool has max(NPROC or the cores, the host devices) threads; 2 cores here."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    warning = host_pool.pool_warning(devices, environ)
    if not warns:
        assert warning is None
    else:
        assert warning is not None and "hang" in warning
        assert f"NPROC={4 * len(devices)} before JAX starts" in warning
        assert warning.startswith(f"{len(devices)} CPU devices share")
