"""`train(cfg, run_dir)`: one complete run, from data loading to the final summary.

The host loop only dispatches compiled chunks of `train.steps_per_call` steps and hands each step
boundary to the periodic actions of cnnlab/training/actions.py (metrics, evaluation and model
selection,
logging, progress, checkpoints, snapshots).
"""

import logging
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cnnlab import host_memory, parallel
from cnnlab.errors import ConfigError
from cnnlab.models import count_params
from cnnlab.progress import CompileTimer, duration
from cnnlab.runs.checkpoint import NoUsableCheckpoint
from cnnlab.runs.resume import (
    check_changes,
    check_finished_unchanged,
    finished_summary,
    unfit_state_message,
)
from cnnlab.runs.rundir import CURVES, FollowerRunDir, RunDir
from cnnlab.runs.tracking import RunTracker
from cnnlab.training import actions, diagnostics
from cnnlab.training.build import Run, build, input_stats, use_compile_cache
from cnnlab.training.signals import Interrupted, StopOnSignal

log = logging.getLogger(__name__)


def train(cfg: DictConfig, run_dir: Path, group: str | None = None,
          tags: list[str] | None = None, name: str | None = None) -> dict[str, Any]:
    """Train as `cfg` says, writing logs and checkpoints to `run_dir`; returns the summary.

    `group`, `tags` and `name` label the W&B run (a sweep's runs share group and tags;
    `logger.name` overrides `name`). The summary's `status`
    is finished, diverged (training loss non-finite or above train.divergence_threshold;
    `failure` says when), failed or interrupted (`signal`: the signal's number).
    """
    # Before anything touches a device: a multi-host job's processes must meet first.
    parallel.initialize_distributed(cfg.train.distributed)
    run_dir = RunDir(run_dir) if parallel.is_primary() else FollowerRunDir(run_dir)
    with run_dir.lock():
        config = OmegaConf.to_container(cfg, resolve=True)
        if (previous := finished_summary(run_dir, cfg.train.steps)) is not None:
            check_finished_unchanged(run_dir, config)
            log.info("%s already finished; nothing to do", run_dir)
            return previous
        saved = run_dir.checkpoint_steps()
        if saved:
            check_changes(run_dir, config, cfg.resume.allow_changes, saved[-1])
        else:  # nothing trained yet: this start is the first
            run_dir.save_start_config(config, replace=True)
        use_compile_cache(cfg.compile_cache_dir)
        # From here a signal ends the run in one line (Interrupted): loading the data and
        # restoring come before any step that could be saved; the loop then stops at a boundary.
        signals = StopOnSignal()
        try:
            return _build_and_train(cfg, run_dir, saved, config, signals, (group, tags, name))
        finally:
            signals.close()


def _build_and_train(cfg: DictConfig, run_dir: RunDir, saved: list[int], config: dict,
                     signals: StopOnSignal, labels: tuple) -> dict[str, Any]:
    """The run built (data, model, restored state) and trained; `labels`: the W&B run's group,
    tags and name."""
    run = build(cfg, with_source=not saved)
    signals.raise_pending()  # a signal while the data loaded ends the run here at the latest
    # What `cnnlab eval` and `viz` normalize with, so that they need not read the training set.
    run_dir.save_input_stats(input_stats(run.dataset))
    checkpoint = actions.Checkpoint(cfg, run_dir)
    try:
        state, loop = checkpoint.restore(run.state)
    except NoUsableCheckpoint:
        checkpoint.close()
        if run_dir.start_config() != config:
            raise ConfigError(unfit_state_message(run_dir, config)) from None
        raise
    # One W&B run and one event file per run, from process 0.
    logger = (cfg.logger if run_dir.writes
              else OmegaConf.merge(cfg.logger, {"mode": "disabled", "tensorboard": False}))
    group, tags, name = labels
    tracker = RunTracker(run_dir, config, logger, group, int(state.step), tags, name)
    try:
        return _train(run, run_dir, state, loop, checkpoint, tracker, signals)
    finally:
        run.close()


def _train(run: Run, run_dir: RunDir, state: Any, loop: actions.LoopState,
           checkpoint: actions.Checkpoint, tracker: RunTracker,
           signals: StopOnSignal) -> dict[str, Any]:
    """The periodic actions around `_loop`, and the summary however the loop ends."""
    cfg = run.cfg
    resumed_from = int(state.step) or None
    summary: dict[str, Any] = {
        "status": "running", "model": cfg.model.name, "dataset": run.dataset.name,
        "params": run.num_params, "macs": run.macs, "steps": cfg.train.steps,
        "seed": cfg.seed, "resumed_from": resumed_from, **run.placement.describe(),
        "precision": cfg.train.precision or "fp32",
        # CPU timings depend on it (cnnlab/host_memory.py), results do not.
        "host_huge_pages": host_memory.huge_pages(),
    }
    if run.transfer is not None:
        summary["transfer"] = _transfer_summary(run, tracker)
    tracker.write_summary(summary)
    clock = actions.Clock(loop.wall_time)
    metrics = actions.TrainMetrics(cfg.train)
    metrics.resume_window(loop.train_window)
    keep_best = (cfg.early_stopping.keep_best and cfg.checkpoint.enabled
                 and run.dataset.val is not None)
    evaluation = actions.Evaluation(cfg, run.evaluator, run_dir, keep_best, loop)
    record = actions.Record(tracker, run.schedule, run.steps_per_epoch, clock)
    compiles = CompileTimer()
    # Off by default: then no action, and nothing of it is ever traced or compiled.
    diagnosis = (actions.Diagnostics(cfg.diagnostics.every, run.diagnose, tracker)
                 if diagnostics.enabled(cfg) else None)
    # The rate and ETA leave out host work: evaluations, diagnostics and compiles (the last,
    # shorter chunk's).
    # The ETA adds back the evaluations still to come.
    progress = actions.Progress(cfg, int(state.step), excluded=lambda: (
        evaluation.seconds + compiles.seconds + (diagnosis.seconds if diagnosis else 0.0)),
        to_come=evaluation.seconds_to_come)

    def loop_state() -> actions.LoopState:
        saved = actions.LoopState(wall_time=clock(), train_window=metrics.window)
        evaluation.save_into(saved)
        return saved

    checkpoint.loop_state = loop_state
    signals.start(run.placement)
    # checkpoint.settle: the previous (background) save must be complete before the next.
    periodic = [signals, checkpoint.settle, metrics, evaluation,
                *([diagnosis] if diagnosis else []), record, progress, checkpoint]
    if cfg.schedule.name == "cyclic_cosine" and cfg.checkpoint.enabled:
        periodic.append(actions.Snapshots(cfg, run_dir))
    if (window := actions.profile_window(cfg.train.profile)) is not None:
        periodic.insert(0, actions.Profile(window, run_dir, int(state.step)))
    try:
        _, stop = _loop(run, state, periodic, metrics, lambda: evaluation.lr_scale, compiles)
        summary.update(_ending(stop, progress.step, signals.received))
    except KeyboardInterrupt as error:  # a second signal (Interrupted), or Ctrl-C elsewhere
        interrupted = Interrupted(getattr(error, "signum", signal.SIGINT), progress.step)
        summary.update(status="interrupted", signal=interrupted.signum, failure=str(interrupted))
        raise interrupted from None
    except BaseException as error:
        summary.update(status="failed", failure=failure_reason(error))
        raise
    finally:
        for action in periodic:
            if hasattr(action, "close"):
                action.close()
        summary.update(
            final_step=progress.step, wall_time=clock(),
            images_per_sec=actions.median(metrics.throughput), compile_time=compiles.seconds,
            **{f"final/{k}": v for k, v in record.last.items() if "/" in k},
            **{f"best/{k}": v for k, v in evaluation.best.items()},
            **{f"selected/{k}": v for k, v in evaluation.selected.items()},
        )
        _close(tracker, run_dir, summary, lambda: _log_confusions(
            tracker, run_dir, run, evaluation.last_step, summary["final_step"]))
    if summary["status"] == "interrupted":
        signals.forward()  # saved and summarized: submitit's handler may requeue the job
    return summary


def _ending(stop: tuple[str, str] | None, step: int, signum: int | None) -> dict[str, Any]:
    """How the summary records the way the loop ended."""
    if stop is None:
        return {"status": "finished"}
    kind, reason = stop
    if kind == "diverged":
        return {"status": "diverged", "failure": f"diverged: {reason}"}
    if kind == "interrupted":
        return {"status": "interrupted", "failure": reason, "signal": signum}
    log.info("step %d: %s; stopping early", step, reason)
    return {"status": "finished", "early_stopped_at": step}


def _close(tracker: RunTracker, run_dir: RunDir, summary: dict[str, Any],
           figures: Callable[[], None] = lambda: None) -> None:
    """Write the final summary, curves, `figures` and W&B run; a full disk must not hide why
    it ended."""
    status, step = summary.get("status", "failed"), summary["final_step"]
    if not run_dir.writes:
        return tracker.finish(status, step)
    try:
        tracker.write_summary(summary)
        _log_curves(tracker, run_dir, summary["final_step"])
        figures()
        saved = run_dir.checkpoint_steps()
        tracker.log_artifacts(run_dir / ".hydra" / "config.yaml",
                              run_dir / "checkpoints" / str(saved[-1]) if saved else None)
    except OSError as error:
        log.error("could not write the summary of %s: %s", run_dir, error)
    tracker.finish(status, step)


def _loop(run: Run, state: Any, periodic: list, metrics: actions.TrainMetrics,
          lr_scale: Callable[[], float], compiles: CompileTimer) -> tuple:
    """Chunks of steps until the last step or a stop; returns (state, stop)."""
    total, per_call = run.cfg.train.steps, run.cfg.train.steps_per_call
    # Read once: the loop counts the steps itself, so no chunk waits for the previous one.
    step = int(state.step)
    while step < total:
        num_steps = min(per_call, total - step)
        state, sums = _chunk(run, state, step, num_steps, compiles)
        step += num_steps
        tick = actions.Tick(step, num_steps, step == total, state, sums, lr_scale())
        for action in periodic:
            action(tick)
        state = tick.state
        if tick.stop is not None:
            return state, tick.stop
        if tick.event:
            metrics.restart_clock()
    return state, None


def _chunk(run: Run, state: Any, step: int, num_steps: int, compiles: CompileTimer) -> tuple:
    """One compiled chunk from `step` (the host's count: reading `state.step` would wait for
    the previous chunk); the first of each length (and phase: two_phase transfer) compiles,
    which is said and timed (the call returns once the chunk is compiled and queued, before it
    runs)."""
    phase, chunk = run.phase_at(step), run.chunk_at(step)
    data = run.chunk_data(step, num_steps)
    key = (phase, num_steps)
    if not compiles.is_new(key):
        return chunk(state, data, num_steps)
    what = "the linear-probe step" if phase == "probe" else "the training step"
    log.info("compiling %s (%s, %d steps per call)", what, run.cfg.model.name, num_steps)
    out, took = compiles.call(key, chunk, state, data, num_steps)
    log.info("compiled %s in %s", what, duration(took))
    return out


def _transfer_summary(run: Run, tracker: RunTracker) -> dict[str, Any]:
    """The transfer run's plan (and, at a fresh start, what was loaded) for summary.json; the
    first start's record is kept when a resumed run does not read its source again."""
    plan = run.transfer.plan
    record = {"mode": plan.mode, "source": run.cfg.transfer.source,
              "frozen": list(plan.with_role("frozen")),
              "trainable_params": count_params({k: v for k, v in run.state.params.items()
                                                if plan.roles.get(k) != "frozen"})}
    if run.transfer.loaded is not None:
        record.update(run.transfer.loaded.summary())
    else:
        previous = (tracker.run_dir.read_summary() or {}).get("transfer", {})
        record.update({k: v for k, v in previous.items() if k not in record})
    return record


def failure_reason(error: BaseException) -> str:
    """One line saying why a run failed, for summary.json and sweep reports."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _log_curves(tracker: RunTracker, run_dir: RunDir, step: int) -> None:
    """The run's train/test error curves as `curves.png` and a W&B image; never fails the run."""
    try:
        from cnnlab.analysis.plots import plot_run

        path = plot_run(run_dir, run_dir / CURVES)
        if path is not None:
            tracker.log_image(step, "curves", path)
    except Exception as error:  # a plot is a convenience: a broken one must not lose the run
        log.warning("could not plot the curves of %s: %s", run_dir, error)



def _log_confusions(tracker: RunTracker, run_dir: RunDir, run: Run, evaluated: int | None,
                    step: int) -> None:
    """The last evaluation's confusion matrices (one per split and variant) as CSV and PNG files
    and per-class error tables, also as W&B image and table panels at the run's last `step`;
    nothing when the run never evaluated, and never fails the run."""
    if evaluated is None:
        return
    try:
        import jax

        from cnnlab.analysis import confusion

        # One transfer for all splits, once per run: the counts stayed on the device till now.
        names = run.dataset.class_names
        for split, counts in jax.device_get(run.evaluator.confusions).items():
            error = 100 * (1 - counts.trace() / max(counts.sum(), 1))
            title = (f"{run.cfg.model.name} on {run.dataset.name}, {split} split, "
                     f"step {evaluated:,}: error {error:.2f}%")
            paths = confusion.write_confusion(run_dir.path, split, counts, names, title)
            tracker.log_image(step, f"confusion/{split}", paths["png"])
            rows = confusion.per_class_rows(counts, confusion.class_labels(len(counts), names))
            tracker.log_table(step, f"per_class/{split}", confusion.PER_CLASS_COLUMNS, rows)
    except Exception as error:  # files for reading: a broken one must not lose the run
        log.warning("could not write the confusion matrices of %s: %s", run_dir, error)
