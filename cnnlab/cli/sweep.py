"""What became of a multirun's jobs: a Hydra callback that reports failures as they happen,
and the tally `cnnlab train` prints when the sweep ends (however its launcher ran the jobs)."""

import logging
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from cnnlab.runs.rundir import RunDir, find_run_dirs

log = logging.getLogger(__name__)

class SweepReport(Callback):
    """Registered in conf/config.yaml (hydra.callbacks)."""

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        # A single run reports its own failure (and has no job number).
        if job_return.status != JobStatus.FAILED or config.hydra.mode != RunMode.MULTIRUN:
            return
        try:
            error: BaseException = job_return.return_value  # a failed job's raises its error
        except Exception as raised:  # noqa: BLE001 (any error a job raised is reported)
            error = raised
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        log.error("job %s_%s failed: %s", config.hydra.job.num,
                  config.hydra.job.override_dirname, reason)


def tally(sweep_dir: Path) -> dict[str, list[Path]]:
    """Job folders by the status in their summary.json (`failed` when there is none)."""
    by_status: dict[str, list[Path]] = {}
    for job in find_run_dirs(Path(sweep_dir)):
        status = (RunDir(job).read_summary() or {}).get("status", "failed")
        by_status.setdefault(status, []).append(job)
    return by_status


def job_count(n: int) -> str:
    """'1 job', '3 jobs': how the sweep lines count jobs."""
    return "1 job" if n == 1 else f"{n} jobs"


def report(sweep_dir: Path) -> tuple[str, bool]:
    """One line on how the sweep went, and whether every job finished."""
    counts = tally(sweep_dir)
    total = sum(len(jobs) for jobs in counts.values())
    parts = ", ".join(f"{len(jobs)} {status}" for status, jobs in sorted(counts.items()))
    all_finished = set(counts) <= {"finished"}
    return (f"sweep of {job_count(total)}: {parts}; tables and plots: cnnlab compare "
            f"{sweep_dir}", all_finished)
