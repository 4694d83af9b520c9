"""Decisions taken on the validation metric between compiled chunks: reduce-on-plateau and early
stopping. Both are small host-side state machines fed one value per evaluation; their state is a
JSON-able dict saved in the checkpoint's metadata, so a resumed run decides exactly as an
uninterrupted one would.

Monitored metrics are errors or losses (lower is better). Only validation metrics are allowed:
choosing a learning rate or a stopping point on the test set would leak it into the result.
"""

import dataclasses
import math
from typing import Any

from omegaconf import DictConfig

from cnnlab.errors import require

MONITORED_METRICS = ("val/error", "val/loss")


@dataclasses.dataclass
class Plateau:
    """Multiply the lr by `factor` when the metric has not improved on its best by more than
    `threshold` (absolute) for more than `patience` evaluations in a row, at most
    `max_reductions` times; after a reduction the count starts again.

    These are the semantics of `torch.optim.lr_scheduler.ReduceLROnPlateau(mode="min",
    threshold_mode="abs", cooldown=0)`: with patience 2 the third stalled evaluation reduces.
    Krizhevsky et al. 2012 and He et al. 2016 divide by 10 "when the validation error stops
    improving"; `factor=0.1` is that rule.
    """

    factor: float
    patience: int
    threshold: float
    max_reductions: int
    best: float = math.inf
    stalled: int = 0
    reductions: int = 0
    scale: float = 1.0

    def observe(self, value: float) -> bool:
        """Record one evaluation; True when it reduced the lr (`scale` then holds the new one)."""
        if value < self.best - self.threshold:
            self.best, self.stalled = value, 0
            return False
        self.stalled += 1
        if self.stalled > self.patience and self.reductions < self.max_reductions:
            self.scale *= self.factor
            self.reductions += 1
            self.stalled = 0
            return True
        return False

    def state(self) -> dict[str, Any]:
        return {"best": _finite_or_none(self.best), "stalled": self.stalled,
                "reductions": self.reductions, "scale": self.scale}

    def load(self, state: dict[str, Any]) -> None:
        self.best = _inf_if_none(state["best"])
        self.stalled, self.reductions = state["stalled"], state["reductions"]
        self.scale = state["scale"]


@dataclasses.dataclass
class EarlyStopping:
    """Stop once the metric has not improved on its best for `patience` evaluations in a row
    (Keras' `EarlyStopping(min_delta=0)` semantics); patience 0 never stops. `best_step` is the
    step whose weights the run keeps as its selected model."""

    patience: int
    best: float = math.inf
    best_step: int | None = None
    stalled: int = 0

    def observe(self, step: int, value: float) -> tuple[bool, bool]:
        """Record one evaluation; returns (improved, stop)."""
        if value < self.best:
            self.best, self.best_step, self.stalled = value, step, 0
            return True, False
        self.stalled += 1
        return False, self.patience > 0 and self.stalled >= self.patience

    def state(self) -> dict[str, Any]:
        return {"best": _finite_or_none(self.best), "best_step": self.best_step,
                "stalled": self.stalled}

    def load(self, state: dict[str, Any]) -> None:
        self.best = _inf_if_none(state["best"])
        self.best_step, self.stalled = state["best_step"], state["stalled"]


def _finite_or_none(value: float) -> float | None:
    # JSON has no infinity; "no best yet" is stored as null.
    return value if math.isfinite(value) else None


def _inf_if_none(value: float | None) -> float:
    return math.inf if value is None else value


def validate(cfg: DictConfig) -> None:
    """Reduce-on-plateau and early stopping watch a validation metric at each evaluation."""
    sched, stopping = cfg.schedule, cfg.early_stopping
    watchers = []
    if sched.name == "plateau":
        watchers.append(("schedule.metric", sched.metric))
        require(0 < sched.factor < 1, f"schedule.factor={sched.factor} must be in (0, 1)")
        for key in ("patience", "threshold", "max_reductions"):
            require(sched[key] >= 0, f"schedule.{key}={sched[key]} must be >= 0")
    require(stopping.patience >= 0,
            f"early_stopping.patience={stopping.patience} must be >= 0 (0: off)")
    if stopping.patience > 0 or stopping.keep_best:
        watchers.append(("early_stopping.metric", stopping.metric))
    for key, metric in watchers:
        require(metric in MONITORED_METRICS, f"{key}='{metric}'; valid choices: "
                f"{', '.join(MONITORED_METRICS)} (selecting on the test set would leak it)")
    if sched.name == "plateau" or stopping.patience > 0:
        what = "schedule=plateau" if sched.name == "plateau" else "early_stopping.patience > 0"
        require(cfg.dataset.val_size > 0 or cfg.dataset.folds,
                f"{what} watches the validation split; set dataset.val_size > 0 (or "
                "dataset.folds)")
        require(cfg.train.eval_every > 0,
                f"{what} acts at evaluations; set train.eval_every > 0")
