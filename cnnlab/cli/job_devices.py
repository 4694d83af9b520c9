"""Several sweep jobs on one GPU node (`hydra/launcher=parallel`): each its own GPUs.

JAX takes every GPU it sees and preallocates 75% of each one's memory, so two jobs of the joblib
launcher on one node would each try to take three quarters of every GPU. Each worker process of
the launcher (they run one job after another) claims a slot, 0 .. n_jobs - 1, by holding a lock
file in the sweep directory for as long as it lives, so that workers running at the same time
never hold the same slot; before JAX starts in it, the slot chooses its GPUs:

- at least as many GPUs as jobs: the GPUs are split into n_jobs equal groups, one per slot
  (`CUDA_VISIBLE_DEVICES`); each job preallocates on its own GPUs only;
- fewer GPUs than jobs: slot k takes GPU k mod #GPUs, and the jobs that share a GPU split its
  memory (`XLA_PYTHON_CLIENT_MEM_FRACTION` = 0.9 / jobs per GPU).

The GPUs are those of `CUDA_VISIBLE_DEVICES` where it is set, else every one the NVIDIA driver
lists (/proc/driver/nvidia/gpus). No GPU (CPU, TPU): nothing changes. `CNNLAB_JOB_DEVICES=off`
leaves the environment as it is.

The sweep's own process (`cnnlab train -m`) checks every job's config, which starts JAX there
too (tracing the models); it trains nothing, so it does not preallocate
(`spare_the_sweep_process`), and its jobs get the user's setting back (`assign`).
"""

import fcntl
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

DRIVER_GPUS = Path("/proc/driver/nvidia/gpus")
# Of a shared GPU's memory, what the jobs on it preallocate together (XLA's default is 0.75
# for one process; the rest is the CUDA context's and the driver's).
SHARED_MEMORY = 0.9

# The lock this worker process holds for its slot, for as long as it lives.
_held: dict[str, tuple[int, IO]] = {}


def visible_gpus(env: Mapping[str, str], driver: Path = DRIVER_GPUS) -> list[str]:
    """The GPU ids a process started with `env` would see."""
    if "CUDA_VISIBLE_DEVICES" in env:
        return [d.strip() for d in env["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
    return [str(i) for i in range(len(list(driver.iterdir())))] if driver.is_dir() else []


def job_env(slot: int, jobs: int, gpus: list[str]) -> dict[str, str]:
    """The environment variables of the job in `slot` of `jobs` parallel ones (see above)."""
    if not gpus or jobs <= 1:
        return {}
    if len(gpus) >= jobs:
        per = len(gpus) // jobs
        return {"CUDA_VISIBLE_DEVICES": ",".join(gpus[slot * per:(slot + 1) * per])}
    sharing = sum(1 for k in range(jobs) if k % len(gpus) == slot % len(gpus))
    return {"CUDA_VISIBLE_DEVICES": gpus[slot % len(gpus)],
            "XLA_PYTHON_CLIENT_MEM_FRACTION": f"{SHARED_MEMORY / sharing:.3f}"}


def claim_slot(folder: Path, jobs: int, held: dict[str, tuple[int, IO]] | None = None) -> int:
    """The lowest slot no other live process holds (its lock kept in `held`, by default this
    process's, so a worker keeps its slot for every job it runs); the first claim of a folder
    in a process is its slot for that folder."""
    held = _held if held is None else held
    if str(folder) in held:
        return held[str(folder)][0]
    folder.mkdir(parents=True, exist_ok=True)
    for slot in range(jobs):
        handle = (folder / f"slot{slot}.lock").open("a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            continue
        held[str(folder)] = (slot, handle)
        return slot
    # More live workers than n_jobs (a worker still exiting): share slot 0's devices.
    return 0


PREALLOCATE = "XLA_PYTHON_CLIENT_PREALLOCATE"
# The user's XLA_PYTHON_CLIENT_PREALLOCATE while the sweep process runs without it ("" if unset).
SWEEP_PREALLOCATE = "CNNLAB_SWEEP_PREALLOCATE"


def spare_the_sweep_process(env: dict[str, str] | None = None) -> None:
    """In the process that launches a sweep, before JAX starts: no GPU memory preallocated (the
    jobs, which inherit the environment, get the user's setting back in `assign`)."""
    env = os.environ if env is None else env
    if SWEEP_PREALLOCATE not in env:
        env[SWEEP_PREALLOCATE] = env.get(PREALLOCATE, "")
        env[PREALLOCATE] = "false"


def restore_preallocation(env: dict[str, str]) -> None:
    if SWEEP_PREALLOCATE in env:
        user = env.pop(SWEEP_PREALLOCATE)
        if user:
            env[PREALLOCATE] = user
        else:
            env.pop(PREALLOCATE, None)


def assign(sweep_dir: Path, jobs: int, job_num: int, env: dict[str, str] | None = None) -> dict:
    """Set this worker's devices in `env` (os.environ) before JAX starts; returns what it set."""
    env = os.environ if env is None else env
    restore_preallocation(env)
    if env.get("CNNLAB_JOB_DEVICES", "").lower() in ("off", "0", "false") or jobs <= 1:
        return {}
    gpus = visible_gpus(env)
    if not gpus:
        return {}
    slot = claim_slot(Path(sweep_dir) / ".job_devices", jobs)
    chosen = job_env(slot, jobs, gpus)
    env.update(chosen)
    log.info("job %d: worker slot %d of %d (process %d), %s", job_num, slot, jobs, os.getpid(),
             " ".join(f"{k}={v}" for k, v in chosen.items()))
    return chosen


def launcher_jobs(launcher: Mapping) -> int:
    """How many jobs the launcher runs at once on this node: joblib's n_jobs (-1: one per
    core), 1 for any other launcher (Slurm gives each task its own GPUs)."""
    if "joblib" not in str(launcher.get("_target_", "")).lower():
        return 1
    n_jobs = int(launcher.get("n_jobs") or 1)
    return os.cpu_count() or 1 if n_jobs < 0 else n_jobs
