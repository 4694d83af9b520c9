"""One process of a 2-process job (tests/multihost_run.py's `launch`, tests/test_multihost.py)
that saves, as a run with `train.keep_best` does, into two checkpoint folders at the same steps:
each save of `checkpoints/` is still being written in the background when the one of `best/`
starts. Prints one JSON line: the steps each folder holds at the end.

    SLURM_... python tests/multihost_saves.py RUN_DIR STEPS
"""

import json
import sys
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from cnnlab import parallel  # noqa: E402
from cnnlab.runs.checkpoint import Checkpointer  # noqa: E402


def main(run_dir: Path, steps: int) -> None:
    parallel.initialize_distributed("auto")
    folders = [Checkpointer(run_dir / "checkpoints", keep=None),
               Checkpointer(run_dir / "best", keep=None)]
    # Replicated over the job's 4 devices, as a run's state is.
    replicated = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), PartitionSpec())
    for step in range(1, steps + 1):
        w = jax.make_array_from_callback((4,), replicated, lambda _, s=step: np.full(4, s, "f4"))
        for saver in folders:  # no wait between: the two background saves overlap
            saver.save(step, {"w": w}, {"step": step})
    for saver in folders:
        saver.close()
    print(json.dumps({"process": jax.process_index(), "processes": jax.process_count(),
                      "steps": [saver.all_steps() for saver in folders]}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
