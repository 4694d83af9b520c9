"""The Hydra application behind `cnnlab train`: one call per run (per job of a multirun).

In a multirun every job ends with a `summary.json` saying how it ended, and a job that fails
(diverged, bad config, crash) raises, so that Hydra records it as failed; the sweeper runs the
remaining jobs all the same (Optuna: `max_failure_rate` in conf/hydra/sweeper/).
"""

import dataclasses
import logging
import signal
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from cnnlab import parallel
from cnnlab.cli import job_devices
from cnnlab.cli.preflight import validate_for_training
from cnnlab.config.names import name_the_model
from cnnlab.config.presets import resolve_presets
from cnnlab.data.types import DatasetUnavailableError
from cnnlab.errors import ConfigError
from cnnlab.runs.rundir import RunDir, RunDirBusy


def _not_advice(record: logging.LogRecord) -> bool:
    # TFDS's advice to install OpenCV (faster PNG decoding): decoded splits are cached, so it
    # would repeat a suggestion that saves nothing on every run.
    return "OpenCV is not installed" not in record.getMessage()


def quiet_library_logs() -> None:
    """Orbax/TFDS (through absl) and JAX log routine steps at INFO; keep the terminal for the
    progress bar and cnnlab's own messages."""
    for noisy in ("absl", "jax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    absl = logging.getLogger("absl")
    if _not_advice not in absl.filters:
        absl.addFilter(_not_advice)


class RunFailed(RuntimeError):
    """A job that ran but did not finish (diverged); the message is the one-line reason."""


def sweep_group() -> str | None:
    """Runs of one multirun share a W&B group named after the sweep directory."""
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    return "sweep-" + "_".join(Path(hc.sweep.dir).parts[-2:])


def sweep_tags() -> list[str]:
    """The experiment a run belongs to tags it (W&B filters by tag across sweeps)."""
    experiment = HydraConfig.get().runtime.choices.get("experiment")
    return [experiment.replace("/", "-")] if experiment not in (None, "null") else []


def run_name(cfg: DictConfig) -> str:
    """The W&B run's name: the overrides that set it apart, as Hydra names a multirun job's
    folder (`model=plain20,seed=0`), or `MODEL-DATASET` for a run of the defaults."""
    overrides = name_the_model(HydraConfig.get().job.override_dirname, cfg.model.name)
    return overrides or f"{cfg.model.name}-{cfg.dataset.name}"


def objective(summary: dict) -> float | None:
    """What a sweeper minimizes: the final validation error when there is a validation split.

    Tuning on the test error would leak the test set into the choice of hyperparameters.
    """
    for key in ("final/val/error", "final/test/error"):
        if summary.get(key) is not None:
            return summary[key]
    return None


def record_failure(run_dir: RunDir, cfg: DictConfig, reason: str,
                   status: str = "failed") -> None:
    """Make sure the job's summary.json says it failed and why (train() writes its own once
    training has started; earlier failures, such as a bad config, end up here). Never fails:
    the directory may be unwritable, which is then the reason being reported."""
    try:
        summary = run_dir.read_summary()
        if summary is None or summary.get("status") == "running":
            run_dir.write_summary({**(summary or {}), "status": status, "failure": reason,
                                   "model": cfg.model.name, "dataset": cfg.dataset.name,
                                   "seed": cfg.seed})
    except OSError:
        pass


# What a single run prints and exits with when it ends on one of these, and whether its
# summary.json records it (another process's lock: the directory is not ours to write).
@dataclasses.dataclass(frozen=True)
class Outcome:
    errors: tuple[type[BaseException], ...]
    prefix: str
    exit_code: int
    record: bool = True


OUTCOMES = (
    Outcome((RunDirBusy,), "", 2, record=False),
    Outcome((ConfigError, DatasetUnavailableError), "config: ", 2),
    Outcome((OSError,), "", 1),
    # The signal's exit status (128 + its number): cnnlab/training/signals.py's Interrupted
    # carries it; a bare KeyboardInterrupt is Ctrl-C's.
    Outcome((KeyboardInterrupt,), "", 128 + signal.SIGINT),
)


def _reason_and_code(outcome: Outcome, error: BaseException) -> tuple[str, int]:
    if isinstance(error, KeyboardInterrupt):
        signum = getattr(error, "signum", signal.SIGINT)
        return (str(error) or f"interrupted by {signal.Signals(signum).name}", 128 + signum)
    return outcome.prefix + (str(error).splitlines()[0] if str(error) else ""), outcome.exit_code


def _fail(run_dir: RunDir, cfg: DictConfig, error: BaseException, multirun: bool) -> None:
    """A known way for a run to end early: one line and an exit code (a sweep records it)."""
    outcome = next(o for o in OUTCOMES if isinstance(error, o.errors))
    reason, exit_code = _reason_and_code(outcome, error)
    if outcome.record:
        status = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
        record_failure(run_dir, cfg, reason, status)
    if multirun and not isinstance(error, KeyboardInterrupt):
        raise error  # Hydra records the failed job and the sweep goes on
    print(f"cnnlab: error: {reason.removeprefix('config: ')}", file=sys.stderr)
    raise SystemExit(exit_code) from None


def _report_end(summary: dict, run_dir: RunDir, multirun: bool) -> None:
    """A run that trained but did not finish: one line, and the exit code that says how."""
    status, reason = summary["status"], summary.get("failure", "")
    if status == "interrupted":
        print(f"cnnlab: {reason}; checkpoint saved, resume with the same command "
              f"(run directory: {run_dir})", file=sys.stderr)
        raise SystemExit(128 + int(summary.get("signal") or signal.SIGINT))
    if multirun:
        raise RunFailed(reason or status)
    # The reason may already start with the status ("diverged: train/loss reached ...").
    print(f"cnnlab: run {status}: {reason.removeprefix(f'{status}: ')}; run directory: "
          f"{run_dir}", file=sys.stderr)
    raise SystemExit(1)


def _preflighted() -> bool:
    """Whether the CLI composed and checked this sweep job before the sweep started: every job
    of the basic sweeper is listed there; a search's continuous ranges (Optuna's interval(...))
    are drawn only here."""
    return HydraConfig.get().sweeper._target_.endswith("BasicSweeper")


def train_job(cfg: DictConfig) -> float | None:
    """A job of a sweep, as Hydra's launcher composed it where it runs; returns the objective
    (for sweepers that optimize it)."""
    # Before JAX starts in this worker: several local jobs must not share every GPU.
    hc = HydraConfig.get()
    job_devices.assign(Path(hc.sweep.dir), job_devices.launcher_jobs(hc.launcher), hc.job.num)
    resolve_presets(cfg)
    return train_checked(cfg, check=not _preflighted())


def train_checked(cfg: DictConfig, check: bool = False) -> float | None:
    """Train one configuration that cnnlab/cli/preflight.py composed and checked (or, `check`,
    one it could not list); inside a Hydra job (HydraConfig set)."""
    from cnnlab.training.loop import failure_reason, train

    quiet_library_logs()
    run_dir = RunDir(HydraConfig.get().runtime.output_dir)
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        # A multi-host job's processes meet before anything touches a device (a no-op where the
        # preflight's check already did, in this process).
        parallel.initialize_distributed(cfg.train.distributed)
        if check:
            validate_for_training(cfg)
        summary = train(cfg, run_dir.path, group=cfg.logger.group or sweep_group(),
                        tags=sweep_tags(), name=run_name(cfg))
    except tuple(e for o in OUTCOMES for e in o.errors) as e:
        _fail(run_dir, cfg, e, multirun)
    except Exception as e:
        record_failure(run_dir, cfg, failure_reason(e))
        raise
    if summary["status"] != "finished":
        _report_end(summary, run_dir, multirun)
    error = summary.get("final/test/error")
    if error is not None:
        print(f"{summary['model']} on {summary['dataset']}: test error {error:.2f}% "
              f"(accuracy {100 - error:.2f}%) at step {summary['final_step']}, "
              f"{summary['wall_time']:.0f} s; run directory: {run_dir}")
    return objective(summary)
