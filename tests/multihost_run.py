"""One process of a 2-process "Slurm job" on this machine, started twice by `launch` (tests of
tests/test_parallel.py and tests/test_multihost.py): the environment is what `srun --ntasks=2`
gives each task (job id, node list, process id), so `train.distributed=auto` finds it and
jax.distributed.initialize() reads it as on a cluster. Each process has 2 forced host devices:
the run is data parallel over 4 devices in 2 processes, in one shared run directory.

    XLA_FLAGS=--xla_force_host_platform_device_count=2 SLURM_JOB_ID=... SLURM_NTASKS=2 \\
        SLURM_PROCID=0 ... python tests/multihost_run.py DATA_DIR RUN_DIR [OVERRIDES...]

It prints one JSON line: how the run ended and what this process read and put on its devices
(training rows decoded from the stream, training rows its devices hold, calls of JAX's
cross-process equality check, which all-gathers every process's copy). With
CNNLAB_TEST_SIGNAL=STEP:NAME, process 1 (only) sends itself that signal once it has trained to
STEP; a Python handler of SIGUSR2 (as submitit installs) records in RUN_DIR/forwarded-<process>.json
what the run directory held when the run handed the signal on.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from cnnlab import host_pool  # noqa: E402
from tests.helpers import train_tiny  # noqa: E402
from tests.sharded_runs import COMMON  # noqa: E402


def launch(args: list[str], delay: float = 0.0, script: str = "multihost_run.py",
           env: dict | None = None, cwd: Path = REPO, timeout: float = 600) -> list[tuple]:
    """Run `script args` (or, script="-m", `python -m args`) as both processes of a 2-task
    Slurm job, process 1 started `delay` seconds after process 0; [(returncode, stdout,
    stderr)] by process."""
    job = {"SLURM_JOB_ID": str(40000 + (os.getpid() * 7 + int(time.time())) % 20000),
           "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": "2",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "PYTHONPATH": str(REPO),
           **(env or {})}
    command = [sys.executable, *(["-m"] if script == "-m" else [str(REPO / "tests" / script)])]
    tasks = []
    for i in range(2):
        if i and delay:
            time.sleep(delay)
        task_env = {**os.environ, **job, "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i)}
        host_pool.size_host_pool(task_env)  # as `cnnlab` does for its forced host devices
        tasks.append(subprocess.Popen(
            [*command, *args], env=task_env,
            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        outputs = [task.communicate(timeout=timeout) for task in tasks]
    finally:
        for task in tasks:
            if task.poll() is None:
                task.kill()
    return [(task.returncode, out, err) for task, (out, err) in zip(tasks, outputs, strict=True)]


def report(output: tuple) -> dict:
    """The JSON line a process of `launch` printed last; fails with its stderr if it failed."""
    code, out, err = output
    assert code == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


class Counts:
    """What this process read and put on its devices while training."""

    def __init__(self) -> None:
        from jax.experimental import multihost_utils

        from cnnlab import parallel
        from cnnlab.data import stream, tfds_reader

        self.decoded_rows = 0
        self.decoded = {}  # TFDS split -> images decoded from it (the on-device path's reads)
        self.placed_rows = 0
        self.placed_bytes = 0
        self.equality_checks = 0
        batches, check = stream.train_batches, multihost_utils.assert_equal
        read = tfds_reader._read_data_source

        def counted_batches(*args: object, **kwargs: object) -> object:
            for images, labels in batches(*args, **kwargs):
                self.decoded_rows += len(labels)
                yield images, labels

        def counted_read(builder: object, split: str, *args: object, **kwargs: object) -> tuple:
            images, labels = read(builder, split, *args, **kwargs)
            self.decoded[split] = self.decoded.get(split, 0) + len(images)
            return images, labels

        def counted_check(*args: object, **kwargs: object) -> object:
            # device_put's check of a host value put with a global sharding (barriers such as
            # sync_global_devices check their name with it too: not counted).
            caller = sys._getframe(1).f_code.co_filename
            self.equality_checks += caller.endswith(os.path.join("_src", "dispatch.py"))
            return check(*args, **kwargs)

        def counted(put: object) -> object:
            def counted_put(placement: object, data: object, *args: object) -> object:
                placed = put(placement, data, *args)
                shards = placed.images.addressable_shards
                # Images, whatever the leading axes: (rows, ...) of a split, (steps, rows, ...)
                # of a streamed chunk.
                self.placed_rows += sum(math.prod(s.data.shape[:-3]) for s in shards)
                self.placed_bytes += sum(s.data.nbytes for s in shards)
                return placed
            return counted_put

        stream.train_batches = counted_batches
        tfds_reader._read_data_source = counted_read
        multihost_utils.assert_equal = counted_check
        for name in ("put_rows", "put_local_rows", "put_batches"):
            setattr(parallel.Placement, name, counted(getattr(parallel.Placement, name)))


def _signal_at(step: int, signum: int) -> None:
    """Process 1 sends itself `signum` once it has trained to `step` (after the tick's
    StopOnSignal (training/signals.py) has looked, as a signal arriving during the next chunk
    would)."""
    from cnnlab.training import actions

    progress = actions.Progress.__call__

    def call(self: actions.Progress, tick: actions.Tick) -> None:
        progress(self, tick)
        if tick.step == step:
            os.kill(os.getpid(), signum)

    actions.Progress.__call__ = call


def _record_forwarded(run_dir: Path) -> None:
    """A handler of SIGUSR2 as submitit's job environment installs one: here it records what
    the run directory held when the run handed the signal on."""

    def handler(signum: int, frame: object) -> None:
        summary = json.loads((run_dir / "summary.json").read_text())
        record = {"signal": signum, "summary_status": summary.get("status"),
                  "checkpoints": sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir()
                                        if p.name.isdigit())}
        (run_dir / f"forwarded-{jax.process_index()}.json").write_text(json.dumps(record))

    signal.signal(signal.SIGUSR2, handler)


def main(data_dir: Path, run_dir: Path, overrides: list[str]) -> None:
    counts = Counts()
    if (spec := os.environ.get("CNNLAB_TEST_SIGNAL")) and os.environ["SLURM_PROCID"] == "1":
        step, name = spec.split(":")
        _signal_at(int(step), signal.Signals[name])
    _record_forwarded(run_dir)
    summary = train_tiny(run_dir, data_dir, [*COMMON, "train.distributed=auto", *overrides])
    print(json.dumps({"process": jax.process_index(), "processes": jax.process_count(),
                      "devices": jax.device_count(), "status": summary["status"],
                      "final_step": summary.get("final_step"), "signal": summary.get("signal"),
                      "summary_devices": summary.get("devices"),
                      "decoded_rows": counts.decoded_rows, "decoded": counts.decoded,
                      "placed_rows": counts.placed_rows,
                      "placed_bytes": counts.placed_bytes,
                      "equality_checks": counts.equality_checks}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:])
