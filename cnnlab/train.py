"""`train(cfg, run_dir)`: one complete run, from data loading to the final summary.

The host loop only dispatches compiled chunks of `train.steps_per_call` steps and hands each step
boundary to the periodic actions of cnnlab/actions.py (metrics, evaluation and model selection,
logging, progress, checkpoints, snapshots).
"""

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cnnlab import actions
from cnnlab.run import Run, build, use_compile_cache
from cnnlab.rundir import CURVES, RunDir
from cnnlab.tracking import RunTracker

log = logging.getLogger(__name__)


def finished_summary(run_dir: RunDir, total_steps: int) -> dict[str, Any] | None:
    """The summary of a run that already ended (all steps done, or stopped early), else None;
    read from its files alone, before any data is read or anything compiled."""
    saved = run_dir.checkpoint_steps()
    summary = run_dir.read_summary()
    if not saved or summary is None:
        return None
    if saved[-1] >= total_steps or summary.get("early_stopped_at") == saved[-1]:
        return summary
    return None


def train(cfg: DictConfig, run_dir: Path, group: str | None = None,
          tags: list[str] | None = None) -> dict[str, Any]:
    """Train as `cfg` says, writing logs and checkpoints to `run_dir`; returns the summary.

    `group` and `tags` label the W&B run (a sweep's runs share them). The summary's `status`
    is finished, diverged (training loss non-finite or above train.divergence_threshold;
    `failure` says when), failed or interrupted.
    """
    run_dir = RunDir(run_dir)
    if (previous := finished_summary(run_dir, cfg.train.steps)) is not None:
        log.info("%s already finished; nothing to do", run_dir)
        return previous
    use_compile_cache(cfg.compile_cache_dir)
    run = build(cfg)
    checkpoint = actions.Checkpoint(cfg, run_dir)
    state, loop = checkpoint.restore(run.state)
    resumed_from = int(state.step) if int(state.step) else None
    tracker = RunTracker(run_dir, OmegaConf.to_container(cfg, resolve=True), cfg.logger, group,
                         resumed_from, tags)
    summary: dict[str, Any] = {
        "status": "running", "model": cfg.model.name, "dataset": run.dataset.name,
        "params": run.num_params, "macs": run.macs, "steps": cfg.train.steps,
        "seed": cfg.seed, "resumed_from": resumed_from,
    }
    tracker.write_summary(summary)
    clock = actions.Clock(loop.wall_time)
    metrics = actions.TrainMetrics(cfg.train)
    keep_best = (cfg.early_stopping.keep_best and cfg.checkpoint.enabled
                 and run.dataset.val is not None)
    evaluation = actions.Evaluation(cfg, run.evaluator, run_dir, keep_best, loop)
    record = actions.Record(tracker, run.schedule, run.steps_per_epoch, clock)
    progress = actions.Progress(cfg, int(state.step))

    def loop_state() -> actions.LoopState:
        saved = actions.LoopState(wall_time=clock())
        evaluation.save_into(saved)
        return saved

    checkpoint.loop_state = loop_state
    periodic = [metrics, evaluation, record, progress, checkpoint]
    if cfg.schedule.name == "cyclic_cosine" and cfg.checkpoint.enabled:
        periodic.append(actions.Snapshots(cfg, run_dir))
    status = "finished"
    try:
        state, stop = _loop(run, state, periodic, metrics, lambda: evaluation.lr_scale)
        if stop is not None and stop[0] == "diverged":
            status, summary["failure"] = "diverged", f"diverged: {stop[1]}"
        elif stop is not None:
            summary["early_stopped_at"] = progress.step
            log.info("step %d: %s; stopping early", progress.step, stop[1])
    except KeyboardInterrupt:
        status, summary["failure"] = "interrupted", f"interrupted at step {progress.step}"
        raise
    except BaseException as error:
        status, summary["failure"] = "failed", failure_reason(error)
        raise
    finally:
        for action in periodic:
            if hasattr(action, "close"):
                action.close()
        summary.update(
            status=status, final_step=progress.step, wall_time=clock(),
            images_per_sec=actions.median(metrics.throughput),
            **{f"final/{k}": v for k, v in record.last.items() if "/" in k},
            **{f"best/{k}": v for k, v in evaluation.best.items()},
            **{f"selected/{k}": v for k, v in evaluation.selected.items()},
        )
        tracker.write_summary(summary)
        _log_curves(tracker, run_dir, progress.step)
        tracker.finish(failed=status != "finished")
    return summary


def _loop(run: Run, state: Any, periodic: list, metrics: actions.TrainMetrics,
          lr_scale: Callable[[], float]) -> tuple:
    """Chunks of steps until the last step or a stop; returns (state, stop)."""
    total, per_call = run.cfg.train.steps, run.cfg.train.steps_per_call
    step = int(state.step)
    while step < total:
        num_steps = min(per_call, total - step)
        state, sums = run.train_chunk(state, run.train_data, num_steps)
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


def failure_reason(error: BaseException) -> str:
    """One line saying why a run failed, for summary.json and sweep reports."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _log_curves(tracker: RunTracker, run_dir: RunDir, step: int) -> None:
    """The run's train/test error curves as `curves.png` and a W&B image; never fails the run."""
    try:
        from cnnlab.plots import plot_run

        path = plot_run(run_dir, run_dir / CURVES)
        if path is not None:
            tracker.log_image(step, "curves", path)
    except Exception as error:  # a plot is a convenience: a broken one must not lose the run
        log.warning("could not plot the curves of %s: %s", run_dir, error)

