"""The periodic actions of the training loop (cnnlab/training/loop.py), each a small object with
its state.

After every compiled chunk the loop hands a `Tick` to each action in turn. An action acts when
it is due (`due`: every N steps and at the last step), adds to the tick's event (what is logged
at this step) or asks the loop to stop. What must survive a restart is gathered in `LoopState`
and saved with each checkpoint, so a resumed run decides exactly as an uninterrupted one would.
"""

import dataclasses
import logging
import math
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np
from omegaconf import DictConfig

from cnnlab import progress
from cnnlab.errors import ConfigError, require
from cnnlab.runs.rundir import BEST, PROFILE, SNAPSHOTS, RunDir
from cnnlab.runs.tracking import RunTracker
from cnnlab.training import diagnostics, steps
from cnnlab.training.optim import cycle_length
from cnnlab.training.selection import EarlyStopping, Plateau

log = logging.getLogger(__name__)


def due(step: int, every: int, last: bool) -> bool:
    return last or (every > 0 and step % every == 0)


def evaluations_due(step: int, total: int, every: int) -> int:
    """How many of the steps after `step`, up to `total`, are `due` to evaluate."""
    if step >= total:
        return 0
    periodic = total // every - step // every if every > 0 else 0
    return periodic + (0 if every > 0 and total % every == 0 else 1)


@dataclasses.dataclass
class LoopState:
    """Saved in each checkpoint's metadata (JSON): the stateful actions' own states."""

    wall_time: float = 0.0
    best: dict[str, float] = dataclasses.field(default_factory=dict)
    selected: dict[str, float] = dataclasses.field(default_factory=dict)
    stopping: dict[str, Any] | None = None
    plateau: dict[str, Any] | None = None
    # The training metrics' sums since the last log line (TrainMetrics.window), so that a run
    # resumed between two log lines logs the same averages as an uninterrupted one. Device
    # arrays until the checkpoint is handed to Orbax (`to_meta`; Checkpointer.flush reads them).
    train_window: dict[str, Any] | None = None

    @classmethod
    def from_json(cls, meta: dict[str, Any]) -> "LoopState":
        return cls(**meta)

    def to_meta(self) -> dict[str, Any]:
        """A checkpoint's metadata: a deep copy, but for `train_window`'s arrays, which a
        copy would read back from the device at once."""
        window = self.train_window
        meta = dataclasses.asdict(dataclasses.replace(self, train_window=None))
        meta["train_window"] = window
        return meta


@dataclasses.dataclass
class Tick:
    """One step boundary: the state after a chunk of `steps` steps ending at `step`."""

    step: int
    steps: int
    last: bool
    state: steps.TrainState
    sums: dict[str, jax.Array]
    # The lr multiplier the chunk ran with (reduce-on-plateau may lower it during this tick).
    lr_scale: float = 1.0
    event: dict[str, float] = dataclasses.field(default_factory=dict)
    # Why the loop stops after this tick: (kind, reason), kind one of diverged, interrupted,
    # early_stopped.
    stop: tuple[str, str] | None = None

    @property
    def diverged(self) -> bool:
        return self.stop is not None and self.stop[0] == "diverged"


class Clock:
    """Wall time of the run across resumes."""

    def __init__(self, previous: float) -> None:
        self._offset = previous - time.perf_counter()

    def __call__(self) -> float:
        return self._offset + time.perf_counter()


class TrainMetrics:
    """Training loss/error and images/s at logging steps; stops a run whose loss diverged.

    Divergence is read from the previous chunk's sums, after the next chunk is queued, so the
    device never waits for the host (and at the last step from the last chunk).
    """

    def __init__(self, tc: DictConfig) -> None:
        self.tc = tc
        self.window = steps.zero_metrics()
        self._previous: tuple[int, dict] | None = None
        self._timer: float | None = None  # started after the first (compiling) chunk
        self._timed_steps = 0
        self.throughput: list[float] = []

    def divergence(self, step: int, sums: dict) -> str | None:
        if not self.tc.stop_on_nan:
            return None
        loss = steps.summarize(jax.device_get(sums))["loss"]
        threshold = self.tc.divergence_threshold
        if not math.isfinite(loss) or (threshold is not None and loss > threshold):
            return f"train/loss reached {loss:.4g} by step {step}"
        return None

    def __call__(self, tick: Tick) -> None:
        checks = [self._previous] if self._previous else []
        if tick.last:
            checks.append((tick.step, tick.sums))
        self._previous = (tick.step, tick.sums)
        self.window = jax.tree.map(jnp.add, self.window, tick.sums)
        for step, sums in checks:
            if reason := self.divergence(step, sums):
                tick.stop = ("diverged", reason)
                break
        if self._timer is None:
            jax.block_until_ready(tick.sums)
            self.restart_clock()
        else:
            self._timed_steps += tick.steps
        if tick.diverged or due(tick.step, self.tc.log_every, tick.last):
            self._log(tick)

    def _log(self, tick: Tick) -> None:
        tick.event.update({f"train/{k}": v for k, v in
                           steps.summarize(jax.device_get(self.window)).items()})
        if self._timed_steps:
            rate = self._timed_steps * self.tc.batch_size / (time.perf_counter() - self._timer)
            tick.event["images_per_sec"] = rate
            self.throughput.append(rate)
        self.window = steps.zero_metrics()

    def resume_window(self, saved: dict[str, Any] | None) -> None:
        """The sums since the last log line as a checkpoint saved them (none: from zero)."""
        if saved:
            zero = steps.zero_metrics()
            self.window = {k: jnp.asarray(saved[k], zero[k].dtype) for k in zero}

    def restart_clock(self) -> None:
        """After host work (evaluation, saving), which throughput must not count."""
        self._timer, self._timed_steps = time.perf_counter(), 0


class Evaluation:
    """Evaluates at `train.eval_every` and the last step; keeps the best errors, reduces the lr
    on a plateau, selects the model on `early_stopping.metric` (saving it to `best/`) and stops
    early when that metric stalls."""

    def __init__(self, cfg: DictConfig, evaluate: Callable[[Any, str], dict], run_dir: RunDir,
                 keep_best: bool, loop: LoopState) -> None:
        self.every, self.evaluate = cfg.train.eval_every, evaluate
        sched = cfg.schedule
        self.plateau_metric = sched.metric
        self.plateau = (Plateau(sched.factor, sched.patience, sched.threshold,
                                sched.max_reductions) if sched.name == "plateau" else None)
        self.stopping = EarlyStopping(cfg.early_stopping.patience)
        self.metric = cfg.early_stopping.metric
        self.best, self.selected = loop.best, loop.selected
        if self.plateau is not None and loop.plateau is not None:
            self.plateau.load(loop.plateau)
        if loop.stopping is not None:
            self.stopping.load(loop.stopping)
        self.best_checkpoints = run_dir.checkpointer(BEST, keep=1) if keep_best else None
        self.seconds = 0.0  # spent evaluating and saving the best weights: not training speed
        self.latest_seconds: float | None = None  # the last evaluation's, compile-free once seen
        self.last_step: int | None = None  # of the latest evaluation in this process

    @property
    def lr_scale(self) -> float:
        return self.plateau.scale if self.plateau is not None else 1.0

    def __call__(self, tick: Tick) -> None:
        if tick.diverged or not due(tick.step, self.every, tick.last):
            return
        # Once the chunk has run (the evaluation needs its state anyway): its steps are not
        # evaluation time.
        jax.block_until_ready(tick.sums)
        start = time.perf_counter()
        self._evaluate(tick)
        self.latest_seconds = time.perf_counter() - start
        self.seconds += self.latest_seconds

    def seconds_to_come(self, step: int, total: int) -> float:
        """The evaluations still due after `step` (the last step's included) at the latest one's
        duration: the first includes the evaluation's compile, later ones are the steady cost.
        Nothing before any evaluation has run, since nothing is known of them yet."""
        if self.latest_seconds is None:
            return 0.0
        return evaluations_due(step, total, self.every) * self.latest_seconds

    def _evaluate(self, tick: Tick) -> None:
        event = self.evaluate(tick.state, f"step {tick.step:,}")
        self.last_step = tick.step
        tick.event.update(event)
        for key in ("test/error", "val/error"):
            if key in event:
                self.best[key] = min(self.best.get(key, math.inf), event[key])
        if self.plateau is not None and self.plateau.observe(event[self.plateau_metric]):
            # From the next step. Placed as the value it replaces (replicated over the run's
            # devices): a scalar on one device would be a new input sharding, and on several
            # devices the chunk would compile again.
            tick.state = tick.state.replace(lr_scale=jax.device_put(
                np.float32(self.plateau.scale), tick.state.lr_scale.sharding))
            log.info("step %d: %s stalled; lr scaled by %g", tick.step, self.plateau_metric,
                     self.plateau.scale)
        if self.metric in event:
            self._select(tick, event)

    def _select(self, tick: Tick, event: dict[str, float]) -> None:
        improved, stop = self.stopping.observe(tick.step, event[self.metric])
        if improved:
            self.selected = {"step": tick.step, **{k: v for k, v in event.items()
                                                   if k.startswith(("val/", "test/"))}}
            if self.best_checkpoints is not None:
                self.best_checkpoints.save(tick.step, tick.state, {"selected": self.selected})
        if stop and not tick.last:
            tick.stop = ("early_stopped", f"{self.metric} has not improved for "
                         f"{self.stopping.patience} evaluations")

    def save_into(self, loop: LoopState) -> None:
        loop.best, loop.selected = self.best, self.selected
        loop.stopping = self.stopping.state()
        loop.plateau = self.plateau.state() if self.plateau is not None else None

    def close(self) -> None:
        if self.best_checkpoints is not None:
            self.best_checkpoints.close()


class Diagnostics:
    """Per-layer diagnostics (cnnlab/training/diagnostics.py) every `diagnostics.every` steps and
    at the
    last step, into the tick's event (metrics.jsonl, W&B) and as W&B histograms across layers.

    `diagnose(state)` runs the separate jitted function; the host waits for it here, at
    diagnostics steps only. Its time (its compile included) is host work, like evaluations.
    """

    def __init__(self, every: int, diagnose: Callable[[steps.TrainState], dict],
                 tracker: RunTracker) -> None:
        self.every, self.diagnose, self.tracker = every, diagnose, tracker
        self.seconds = 0.0

    def __call__(self, tick: Tick) -> None:
        if tick.diverged or not due(tick.step, self.every, tick.last):
            return
        jax.block_until_ready(tick.sums)  # the chunk's steps are not diagnostics time
        start = time.perf_counter()
        values = jax.device_get(self.diagnose(tick.state))
        tick.event.update(diagnostics.scalars(values))
        self.tracker.log_histograms(tick.step, diagnostics.histograms(values))
        self.seconds += time.perf_counter() - start


class Record:
    """Logs the tick's event with lr, epoch and wall time to metrics.jsonl and W&B."""

    def __init__(self, tracker: RunTracker, schedule: Callable, steps_per_epoch: int,
                 clock: Clock) -> None:
        self.tracker, self.schedule = tracker, schedule
        self.steps_per_epoch, self.clock = steps_per_epoch, clock
        self.last: dict[str, float] = {}

    def __call__(self, tick: Tick) -> None:
        if not tick.event:
            return
        tick.event.update(epoch=tick.step / self.steps_per_epoch, wall_time=self.clock())
        if not tick.diverged:
            tick.event["lr"] = float(self.schedule(tick.step - 1)) * tick.lr_scale
        self.tracker.log(tick.step, tick.event)
        self.last.update(tick.event)


class Progress:
    """Training progress at its steady-state speed: steps, images/s, the latest training loss
    and error, and the ETA. On a terminal (`stream.isatty()`) a tqdm bar; elsewhere a log line
    now and then (progress.LogLines); neither with `progress=false`.

    Its clock starts when the first chunk has run (after the compile), and `excluded` (seconds
    of host work so far: evaluations, later compiles) is taken out of the rate; the ETA is the
    remaining steps at that rate plus `to_come(step, total)`, the host work still ahead
    (evaluations).
    """

    def __init__(self, cfg: DictConfig, start: int, excluded: Callable[[], float] = lambda: 0.0,
                 stream: TextIO | None = None, clock: progress.Clock = time.perf_counter,
                 to_come: Callable[[int, int], float] = lambda step, total: 0.0) -> None:
        self.step, self.total = start, cfg.train.steps
        self.batch_size = cfg.train.batch_size
        self.loss: float | None = None
        self.error: float | None = None
        self.clock = progress.StepClock(clock, excluded)
        self.to_come = to_come
        self._previous: tuple[int, dict] | None = None
        stream = sys.stderr if stream is None else stream  # decided now: tests redirect stderr
        self.display: progress.Bar | progress.LogLines | None = None
        if cfg.progress and progress.is_terminal(stream):
            self.display = progress.Bar(self.total, cfg.model.name, stream)
        elif cfg.progress:
            self.display = progress.LogLines(self.total, log.info, clock)

    def __call__(self, tick: Tick) -> None:
        self.step = tick.step
        if "train/loss" in tick.event:
            self.loss, self.error = tick.event["train/loss"], tick.event["train/error"]
        if self.display is None:
            return
        done = self._completed(tick)
        if not self.clock.started:
            self.clock.start(done)
        per_step = self.clock.seconds_per_step(done)
        images = self.batch_size / per_step if per_step else None
        eta = self.clock.eta(done, self.total)
        if eta is not None:
            eta += self.to_come(done, self.total)
        self.display.update(done, progress.status(done, self.total, images, self.loss,
                                                  self.error, eta))

    def _completed(self, tick: Tick) -> int:
        """The last step known to have run. Chunks are queued ahead of the device, so a tick's
        step may not have run yet: unless it has (another action waited for it), this waits for
        the previous chunk, which keeps the device busy with this one; only the first (the
        clock starts after it) and the last wait for their own."""
        previous, self._previous = self._previous, (tick.step, tick.sums)
        ready = all(x.is_ready() for x in jax.tree.leaves(tick.sums))
        if previous is None or tick.last or ready:
            jax.block_until_ready(tick.sums)
            return tick.step
        jax.block_until_ready(previous[1])
        return previous[0]

    def close(self) -> None:
        if self.display is not None:
            self.display.close()


class Checkpoint:
    """Saves the state and `LoopState` every `checkpoint.every` steps, at the last step and
    before any stop but divergence; `restore` resumes from the newest usable one.

    Saves are asynchronous (cnnlab/runs/checkpoint.py): training goes on while a checkpoint is
    written. `settle`, called first at every tick, waits for the previous save when the next
    one is due, so a failed save stops the run before anything after it is logged; the last
    save (the run's end, or a stop) is waited for before the loop ends.
    """

    def __init__(self, cfg: DictConfig, run_dir: RunDir) -> None:
        self.enabled, self.every = cfg.checkpoint.enabled, cfg.checkpoint.every
        self.checkpoints = run_dir.checkpointer(keep=cfg.checkpoint.keep)
        self.loop_state: Callable[[], LoopState] = LoopState

    def restore(self, like: steps.TrainState) -> tuple[steps.TrainState, LoopState]:
        found = self.checkpoints.restore_latest(like)
        if found is None:
            return like, LoopState()
        _, state, meta = found
        return state, LoopState.from_json(meta)

    def _due(self, tick: Tick) -> bool:
        return self.enabled and not tick.diverged and (
            due(tick.step, self.every, tick.last) or tick.stop is not None)

    def settle(self, tick: Tick) -> None:
        """Every tick: the checkpoint queued at the tick before goes to Orbax (this tick's chunk
        is queued behind it, so the device does not wait while Orbax copies the state); where a
        save is due, the previous save must be complete (or fail) first."""
        self.checkpoints.flush()
        if self._due(tick):
            self.checkpoints.wait()

    def __call__(self, tick: Tick) -> None:
        if self._due(tick):
            # A failed save (disk full) raises CheckpointWriteError: training stops here (or,
            # for a queued checkpoint, at the next tick).
            meta = self.loop_state().to_meta()
            if tick.last or tick.stop is not None:
                self.checkpoints.save(tick.step, tick.state, meta)
                self.checkpoints.wait()
            else:
                self.checkpoints.snapshot(tick.step, tick.state, meta)

    def close(self) -> None:
        self.checkpoints.close()


def profile_window(spec: str | None) -> tuple[int, int] | None:
    """`train.profile`'s "START:STOP" as (start, stop); None when off. Validated by
    `validate_profile`."""
    if spec is None:
        return None
    start, stop = (int(part) for part in str(spec).split(":"))
    return start, stop


def validate_profile(spec: str | None, train: DictConfig) -> None:
    """START:STOP, whole numbers with 0 <= START < STOP <= train.steps, at chunk boundaries
    (multiples of train.steps_per_call): the trace starts and stops between compiled calls."""
    if spec is None:
        return
    try:
        start, stop = profile_window(spec)
    except ValueError:
        raise ConfigError(f"train.profile={spec!r} must be START:STOP (steps), e.g. "
                          f"{train.steps_per_call * 2}:{train.steps_per_call * 4}") from None
    require(0 <= start < stop <= train.steps,
            f"train.profile={spec} must satisfy 0 <= START < STOP <= train.steps={train.steps}")
    per_call = train.steps_per_call
    require(start % per_call == 0 and stop % per_call == 0,
            f"train.profile={spec}: START and STOP must be multiples of "
            f"train.steps_per_call={per_call} (the trace starts and stops between calls)")


class Profile:
    """`train.profile=START:STOP`: a JAX profiler trace of the steps from START to STOP in
    <run_dir>/profile (open it in Perfetto, ui.perfetto.dev, or TensorBoard's profile tab).

    The trace starts at the step boundary START, before the next chunk is dispatched, and stops
    once the chunk ending at STOP has finished on the device, so it holds whole compiled calls
    and the host work between them (the periodic actions, evaluations included if due)."""

    def __init__(self, window: tuple[int, int], run_dir: RunDir, step: int) -> None:
        self.start, self.stop = window
        self.folder = run_dir / PROFILE
        self.active = False
        if self.start <= step < self.stop:  # START=0, or resumed inside the window
            self._begin(step)

    def _begin(self, step: int) -> None:
        log.info("profiling steps %d to %d into %s", step, self.stop, self.folder)
        jax.profiler.start_trace(str(self.folder), create_perfetto_trace=True)
        self.active = True

    def __call__(self, tick: Tick) -> None:
        if not self.active and self.start <= tick.step < self.stop and not tick.last:
            self._begin(tick.step)
        elif self.active and (tick.step >= self.stop or tick.last or tick.stop is not None):
            jax.block_until_ready(tick.state)
            self.close()

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
            log.info("profile written to %s", self.folder)


class Snapshots:
    """Snapshot ensembles (Huang et al. 2017): the weights at the end of every cyclic_cosine
    cycle, all kept (checkpoint.keep does not apply)."""

    def __init__(self, cfg: DictConfig, run_dir: RunDir) -> None:
        self.every = cycle_length(cfg.train.steps, cfg.schedule.cycles)
        self.checkpoints = run_dir.checkpointer(SNAPSHOTS, keep=None)

    def __call__(self, tick: Tick) -> None:
        # A resumed run may redo the end of a cycle it already saved.
        if (not tick.diverged and due(tick.step, self.every, tick.last)
                and tick.step not in self.checkpoints.all_steps()):
            self.checkpoints.save(tick.step, tick.state, {"cycle": -(-tick.step // self.every)})

    def close(self) -> None:
        self.checkpoints.close()


def median(values: list[float]) -> float | None:
    return float(np.median(values)) if values else None
