"""`cnnlab lr_find`: the learning-rate range test (Smith 2017, "Cyclical learning rates", sec.
3.3; the notes' "learning rate: too high? too low?").

The model, data, optimizer and augmentation are `cnnlab train`'s for the same overrides (built
by cnnlab.training.build.build); only the schedule differs: lr_i = start * (end / start)^(i /
(steps - 1))
for step i = 0 .. steps - 1, an optax schedule that replaces `schedule`. The loss recorded at
step i is the training loss `cnnlab train` logs (cross entropy on the batch) of the weights
before step i's update. The test stops early once the smoothed loss exceeds `diverge` x its
lowest value so far (or is not finite): past that point the lr is too high.

The suggested lr is where the smoothed loss falls fastest against log(lr) (the steepest
descent, after the first tenth of the steps and at or before the smoothed loss's minimum).
Also reported: the lr at the minimum and a tenth of it, the other common rule of thumb.
"""

import dataclasses
import json
import logging
import math
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import optax
from omegaconf import DictConfig

from cnnlab.errors import require

log = logging.getLogger(__name__)

PNG, JSON = "lr_find.png", "lr_find.json"


def validate(cfg: DictConfig) -> None:
    """The `lr_find` keys, one line each."""
    require(cfg.start > 0, f"lr_find.start={cfg.start} must be positive")
    require(cfg.end > cfg.start, f"lr_find.end={cfg.end} must be larger than "
            f"lr_find.start={cfg.start}")
    require(cfg.steps >= 2, f"lr_find.steps={cfg.steps} must be >= 2")
    require(cfg.diverge > 1, f"lr_find.diverge={cfg.diverge} must be > 1 (a factor over the "
            "lowest smoothed loss)")
    require(0 <= cfg.smoothing < 1, f"lr_find.smoothing={cfg.smoothing} must be in [0, 1)")


def exponential_schedule(start: float, end: float, steps: int) -> optax.Schedule:
    """lr_i = start * (end / start)^(i / (steps - 1)): start at step 0, end at step steps - 1."""
    return optax.exponential_decay(start, transition_steps=steps - 1, decay_rate=end / start)


def smooth(losses: list[float], beta: float) -> np.ndarray:
    """Bias-corrected exponential moving average: a_i = beta a_{i-1} + (1 - beta) x_i, a_-1 = 0,
    divided by 1 - beta^(i + 1) (fastai's LR finder), so early values are not pulled to 0."""
    out, average = [], 0.0
    for i, loss in enumerate(losses):
        average = beta * average + (1 - beta) * loss
        out.append(average / (1 - beta ** (i + 1)))
    return np.asarray(out)


def suggest(lrs: np.ndarray, smoothed: np.ndarray) -> dict[str, float]:
    """The steepest descent of the smoothed loss against log(lr) between the first tenth of the
    steps (skipped: the moving average is still settling there, as fastai's skip_start) and the
    smoothed loss's minimum; the lr at the minimum and a tenth of it."""
    lowest = int(np.nanargmin(smoothed))
    skip = min(max(1, len(lrs) // 10), lowest)
    if lowest - skip < 1:  # the loss never fell after the start: no descent to point at
        steepest = lowest
    else:
        window = slice(skip, lowest + 1)
        slopes = np.gradient(smoothed[window], np.log(lrs[window]))
        steepest = skip + int(np.nanargmin(slopes))
    return {"suggested_lr": float(lrs[steepest]), "lr_at_min": float(lrs[lowest]),
            "lr_at_min_over_10": float(lrs[lowest]) / 10}


@dataclasses.dataclass
class Result:
    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    stopped_early: bool
    suggestion: dict[str, float]

    def as_json(self) -> dict[str, Any]:
        def finite(values: list[float]) -> list[float | None]:  # JSON has no NaN: null
            return [v if math.isfinite(v) else None for v in values]

        return {"lr": self.lrs, "loss": finite(self.losses),
                "smoothed_loss": finite(self.smoothed),
                "stopped_early": self.stopped_early, **self.suggestion,
                "rule": "suggested_lr: steepest descent of the smoothed loss vs log(lr), "
                        "at or before its minimum"}


def _diverged(loss: float, smoothed: float, lowest: float, factor: float) -> bool:
    return not math.isfinite(loss) or smoothed > factor * lowest


def range_test(cfg: DictConfig) -> Result:
    """Train cfg's run for lr_find.steps steps at the exponential lrs (one compiled step per
    call, so every step's loss is read)."""
    from cnnlab.training.build import build

    lf = cfg.lr_find
    schedule = exponential_schedule(lf.start, lf.end, lf.steps)
    # A transfer run's test starts from its source's weights, its frozen layers frozen.
    run = build(cfg, with_source=True, schedule=schedule)
    state, data = run.state, run.train_data
    lrs, losses = [], []
    lowest, stopped = math.inf, False
    for i in range(lf.steps):
        state, sums = run.train_chunk(state, data, num_steps=1)
        loss = float(sums["loss_sum"]) / max(int(sums["count"]), 1)
        lrs.append(float(schedule(i)))
        losses.append(loss)
        smoothed = smooth(losses, lf.smoothing)
        lowest = min(lowest, smoothed[-1])
        if _diverged(loss, smoothed[-1], lowest, lf.diverge):
            stopped = True
            log.info("lr_find: stopped at step %d (lr %.3g): loss %.4g > %g x lowest %.4g",
                     i, lrs[-1], smoothed[-1], lf.diverge, lowest)
            break
    finite = np.where(np.isfinite(smoothed), smoothed, np.nan)
    return Result(lrs, losses, [float(s) for s in smoothed], stopped,
                  suggest(np.asarray(lrs), finite))


def plot(result: Result, path: Path, title: str = "") -> Path:
    """Loss against lr (log x): raw per-step losses thin, the smoothed loss bold, the
    suggested lr dashed."""
    from matplotlib.figure import Figure

    from cnnlab.analysis.plots import save_figure

    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(result.lrs, result.losses, lw=0.8, alpha=0.4, color="C0", label="loss per step")
    ax.plot(result.lrs, result.smoothed, lw=2.0, color="C0", label="smoothed")
    lr = result.suggestion["suggested_lr"]
    ax.axvline(lr, ls="--", color="C3", lw=1.0, label=f"suggested lr {lr:.2g}")
    ax.set_xscale("log")
    finite = [s for s in result.smoothed if math.isfinite(s)]
    if finite:  # the explosion at the end would flatten the useful part of the curve
        low, first = min(finite), finite[0]
        ax.set_ylim(low - 0.05 * (first - low + 1e-9), max(first, low) * 1.5 + 1e-9)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title(textwrap.shorten(title or "LR range test", 90), fontsize=8)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def write(result: Result, out_dir: Path, title: str = "") -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / JSON
    json_path.write_text(json.dumps(result.as_json(), indent=1) + "\n")
    return [plot(result, out_dir / PNG, title), json_path]


def report(result: Result) -> str:
    s = result.suggestion
    end = (f"stopped early at lr {result.lrs[-1]:.3g} (loss diverging)" if result.stopped_early
           else f"ran all {len(result.lrs)} steps")
    return (f"suggested lr: {s['suggested_lr']:.3g} (steepest descent of the smoothed loss)\n"
            f"lowest smoothed loss {np.nanmin(result.smoothed):.4g} at lr {s['lr_at_min']:.3g} "
            f"(a tenth: {s['lr_at_min_over_10']:.3g}); {end}\n")
