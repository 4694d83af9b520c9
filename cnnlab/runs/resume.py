"""What a run directory says to a run that starts in it: already ended, or resumable, and whether
its settings changed since the first start.

A run killed after its last checkpoint (a Slurm time limit, a kill during the final summary)
has all its work on disk: it is completed from its files, not trained again. A resumed run with
different settings is refused unless `resume.allow_changes=true`, and then the change is
recorded with the step it applies from; the first start's config is never overwritten.
"""

import math
import statistics
from typing import Any

from cnnlab.errors import ConfigError
from cnnlab.runs.rundir import RunDir
from cnnlab.runs.tracking import flatten

# Settings that say how a run is watched or stored, not what it computes: changing them on
# resume is not a change of the experiment.
UNTRACKED = ("logger.", "progress", "compile_cache_dir", "dataset.data_dir", "dataset.download",
             "dataset.cache_dir", "dataset.cache_max_gb", "resume.", "summary.", "eval.weights",
             "eval.format", "eval.output", "eval.batch_size", "checkpoint.keep", "diagnostics.",
             "train.profile",
             # Deterministic GPU ops: the same numbers up to the order of float sums.
             "train.deterministic",
             # The convolution's implementation on CPU: the same numbers up to float rounding.
             "train.conv_impl",
             # The library XLA:CPU runs convolutions in: the same numbers up to float rounding.
             "train.cpu_kernels",
             # Where it computes and how its data arrives (the same numbers up to the order of
             # float sums, the same batches): a run resumes on another device count or path.
             "train.devices", "train.distributed", "dataset.on_device", "dataset.stream_",
             "dataset.device_budget_gb",
             # Scanned or unrolled blocks: the same variables and numbers (not the same dropout
             # and stochastic-depth draws).
             "model.scan_blocks")


def finished_summary(run_dir: RunDir, total_steps: int) -> dict[str, Any] | None:
    """The summary of a run that already ended (all steps done, or stopped early), else None;
    from its files alone, before any data is read or anything compiled. A run whose last
    checkpoint is final but whose summary does not say so is completed here."""
    saved = run_dir.checkpoint_steps()
    if not saved:
        return None
    summary = run_dir.read_summary() or {}
    last = saved[-1]
    if last < total_steps and summary.get("early_stopped_at") != last:
        return None
    if summary.get("status") != "finished":
        summary = run_dir.write_summary(completed(run_dir, summary, last))
    return summary


def completed(run_dir: RunDir, summary: dict[str, Any], step: int) -> dict[str, Any]:
    """`summary` of a run that trained to `step` and was stopped before writing its end: the
    final and best values come from metrics.jsonl, which was appended as it trained."""
    events = [e for e in run_dir.read_metrics() if e["step"] <= step]
    final: dict[str, Any] = {}
    best: dict[str, float] = {}
    for event in events:
        final.update({f"final/{k}": v for k, v in event.items() if "/" in k})
        for key in ("test/error", "val/error"):
            if isinstance(event.get(key), float | int):
                best[f"best/{key}"] = min(best.get(f"best/{key}", math.inf), event[key])
    kept = {k: v for k, v in summary.items() if k not in ("failure", "status")}
    timing = {"wall_time": max([e["wall_time"] for e in events if "wall_time" in e], default=0.0)}
    if rates := [e["images_per_sec"] for e in events if "images_per_sec" in e]:
        timing["images_per_sec"] = statistics.median(rates)
    return {**kept, **final, **best, **timing, "status": "finished", "final_step": step,
            "completed_from_files": True}


# Keys added to cnnlab after some runs started, and what their absence from such a run's first
# config means (how it trained): resuming it with that value changes nothing.
IMPLIED = {"train.precision": "fp32", "train.grad_accum": 1, "transfer.adapt_input": "strict",
           "train.matmul_precision": "highest"}


def config_changes(start: dict[str, Any], now: dict[str, Any]) -> dict[str, list[Any]]:
    """{key: [first start's value, this start's value]} over the tracked settings."""
    after = flatten(now)
    before = {**{key: v for key, v in IMPLIED.items() if key in after}, **flatten(start)}
    return {key: [before.get(key), after.get(key)] for key in sorted(set(before) | set(after))
            if before.get(key) != after.get(key) and not key.startswith(UNTRACKED)}


def describe(changes: dict[str, list[Any]], limit: int = 4) -> str:
    shown = [f"{key} {old} -> {new}" for key, (old, new) in list(changes.items())[:limit]]
    more = f" and {len(changes) - limit} more" if len(changes) > limit else ""
    return ", ".join(shown) + more


def check_changes(run_dir: RunDir, config: dict[str, Any], allow: bool, step: int) -> None:
    """Compare this start's resolved config with the first start's; refuse a change unless
    `allow`, and record an allowed one in changes.jsonl."""
    start = run_dir.start_config()
    if start is None:
        run_dir.save_start_config(config)
        return
    changes = config_changes(start, config)
    if not changes:
        return
    if not allow:
        raise ConfigError(
            f"{run_dir} was trained to step {step} with other settings ({describe(changes)}); "
            "resume with resume.allow_changes=true to continue with the new ones (recorded in "
            "changes.jsonl), or train in another hydra.run.dir")
    run_dir.record_changes(step, changes)


def check_finished_unchanged(run_dir: RunDir, config: dict[str, Any]) -> None:
    """A finished run's results answer for its own settings only: a start with other ones (a
    sweep rerun into the same folder with another model, say) is refused, whatever
    `resume.allow_changes` says, rather than handed the old results as its own. Keys the first
    start did not have (added to cnnlab since) are not counted: a sweep rerun after an upgrade
    still finds its finished jobs."""
    start = run_dir.start_config()
    if start is None:
        return
    known = flatten(start)
    if changes := {k: v for k, v in config_changes(start, config).items() if k in known}:
        raise ConfigError(
            f"{run_dir} already finished with other settings ({describe(changes)}), so its "
            "results are not this config's; train in another hydra.run.dir (or "
            "hydra.sweep.dir)")


def unfit_state_message(run_dir: RunDir, config: dict[str, Any]) -> str:
    """Why a checkpoint does not fit this config's state, naming the keys that changed."""
    start = run_dir.start_config()
    changes = config_changes(start, config) if start is not None else {}
    what = f" (changed: {describe(changes)})" if changes else ""
    return (f"the checkpoints in {run_dir} do not fit this config's model or optimizer state"
            f"{what}; train in another hydra.run.dir")
