"""hydra/launcher=parallel on one GPU node: each job's own GPUs (cnnlab/cli/job_devices.py).

No GPU here: the mapping is checked as environment variables (what JAX reads when it starts);
tests/test_sweep.py's joblib sweep shows each worker process setting its own
(`assert_each_worker_took_its_own_gpu`)."""

import os
from pathlib import Path

import pytest

from cnnlab.cli import job_devices


def test_visible_gpus_from_the_environment_or_the_driver(tmp_path):
    assert job_devices.visible_gpus({"CUDA_VISIBLE_DEVICES": "3, 5"}) == ["3", "5"]
    assert job_devices.visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    driver = tmp_path / "gpus"
    for bus in ("0000:01:00.0", "0000:41:00.0"):
        (driver / bus).mkdir(parents=True)
    assert job_devices.visible_gpus({}, driver) == ["0", "1"]
    assert job_devices.visible_gpus({}, tmp_path / "none") == []


def test_jobs_split_the_gpus_or_share_them_with_their_memory_split():
    gpus = ["0", "1", "2", "3"]
    # As many or more GPUs than jobs: disjoint groups.
    assert [job_devices.job_env(s, 2, gpus) for s in range(2)] == [
        {"CUDA_VISIBLE_DEVICES": "0,1"}, {"CUDA_VISIBLE_DEVICES": "2,3"}]
    taken = [job_devices.job_env(s, 3, gpus)["CUDA_VISIBLE_DEVICES"] for s in range(3)]
    assert taken == ["0", "1", "2"]
    # More jobs than GPUs: round robin, each GPU's memory split among the jobs on it.
    shared = [job_devices.job_env(s, 3, ["0", "1"]) for s in range(3)]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in shared] == ["0", "1", "0"]
    assert [e["XLA_PYTHON_CLIENT_MEM_FRACTION"] for e in shared] == ["0.450", "0.900", "0.450"]
    # One job, or no GPU: nothing changes.
    assert job_devices.job_env(0, 1, gpus) == {} and job_devices.job_env(1, 2, []) == {}


def test_live_workers_hold_different_slots_and_keep_theirs(tmp_path):
    first, second, third = {}, {}, {}
    assert job_devices.claim_slot(tmp_path, 2, first) == 0
    assert job_devices.claim_slot(tmp_path, 2, first) == 0  # the same worker, its next job
    assert job_devices.claim_slot(tmp_path, 2, second) == 1
    first[str(tmp_path)][1].close()  # the first worker exits: its slot is free again
    assert job_devices.claim_slot(tmp_path, 2, third) == 0
    for held in (second, third):
        held[str(tmp_path)][1].close()


def test_the_sweep_process_does_not_preallocate_and_its_jobs_get_the_setting_back():
    env = {"XLA_PYTHON_CLIENT_PREALLOCATE": "true"}
    job_devices.spare_the_sweep_process(env)
    assert env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    job = dict(env)  # what a job's process inherits
    job_devices.assign(Path("/nonexistent"), 1, 0, job)
    assert job == {"XLA_PYTHON_CLIENT_PREALLOCATE": "true"}
    unset: dict[str, str] = {}
    job_devices.spare_the_sweep_process(unset)
    job_devices.restore_preallocation(unset)
    assert unset == {}


def test_only_joblib_runs_several_jobs_on_this_node():
    joblib = {"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"}
    assert job_devices.launcher_jobs({**joblib, "n_jobs": 3}) == 3
    assert job_devices.launcher_jobs({**joblib, "n_jobs": -1}) == os.cpu_count()
    assert job_devices.launcher_jobs({"_target_": "hydra._internal.core_plugins."
                                      "basic_launcher.BasicLauncher"}) == 1


@pytest.mark.parametrize("off", ["off", "0"])
def test_job_devices_can_be_left_alone(off, tmp_path):
    env = {"CNNLAB_JOB_DEVICES": off, "CUDA_VISIBLE_DEVICES": "0,1"}
    assert job_devices.assign(tmp_path, 2, 0, env) == {}
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1"


def assert_each_worker_took_its_own_gpu(sweep_dir: Path, gpus: str) -> None:
    """Every job of a 2-job parallel sweep with CUDA_VISIBLE_DEVICES=`gpus` ("5,7") says which
    GPU its worker took; jobs in different worker processes took different ones."""
    import re

    taken, logs = {}, list(sweep_dir.glob("*/*.log"))
    assert len(logs) == 2
    for log in logs:
        found = re.search(r"worker slot (\d) of 2 \(process (\d+)\), CUDA_VISIBLE_DEVICES=(\d)",
                          log.read_text())
        assert found, log.read_text()[-2000:]
        slot, pid, gpu = found.groups()
        assert gpu == gpus.split(",")[int(slot)]
        taken[pid] = gpu
    assert len(set(taken.values())) == len(taken)  # one GPU per worker process
    assert "XLA_PYTHON_CLIENT_PREALLOCATE" not in os.environ  # the sweep process's, restored
