"""One process of a 2-process "Slurm job" on this machine, run twice by tests/test_parallel.py:
the environment is what `srun --ntasks=2` gives each task (job id, node list, process id), so
`train.distributed=auto` finds it and jax.distributed.initialize() reads it as on a cluster.
Each process has 2 forced host devices: the run is data parallel over 4 devices in 2 processes,
in one shared run directory.

    XLA_FLAGS=--xla_force_host_platform_device_count=2 SLURM_JOB_ID=... SLURM_NTASKS=2 \\
        SLURM_PROCID=0 ... python tests/multihost_run.py DATA_DIR RUN_DIR
"""

import json
import sys
from pathlib import Path

import jax

from tests.helpers import train_tiny
from tests.sharded_runs import COMMON


def main(data_dir: Path, run_dir: Path) -> None:
    summary = train_tiny(run_dir, data_dir, [*COMMON, "train.distributed=auto"])
    print(json.dumps({"process": jax.process_index(), "processes": jax.process_count(),
                      "devices": jax.device_count(), "status": summary["status"],
                      "summary_devices": summary.get("devices")}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
