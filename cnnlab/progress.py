"""What a person watching a run sees: one line per phase (loading, compiling, evaluating) and the
progress of training at its steady-state speed.

Compiling a ResNet takes a minute or more before the first step runs, and an evaluation can
take as long; without a word on screen either looks like a hang, and a rate or ETA that counts
the compile is wrong for the rest of the run. So:

* `CompileTimer` times the first call of a jitted function per shape: under JAX's asynchronous
  dispatch that call returns once tracing and compiling are done and the computation is queued,
  so its duration is the compile's, not the computation's.
* `StepClock` measures seconds per step from the end of the first chunk on, less host work
  (evaluations, later compiles): the rate and ETA both modes show.
* `Bar` (on a terminal: tqdm) and `LogLines` (elsewhere: a plain line now and then, no carriage
  returns in Slurm/CI log files) display it; `console_log` shows cnnlab's lines where Hydra does
  not set up logging (`cnnlab eval`).
"""

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Hashable, Iterator
from typing import Any, TextIO

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

log = logging.getLogger(__name__)

Clock = Callable[[], float]


def duration(seconds: float) -> str:
    """`41.2 s`, `5 min 12 s`, `2 h 05 min`: short enough for a log line, exact enough to plan."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes = int(round(seconds)) // 60
    if minutes < 60:
        return f"{minutes} min {int(round(seconds)) % 60:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


class CompileTimer:
    """Calls jitted functions, timing the first call per `key` (an argument shape): that call
    compiles, and returns as soon as the computation is queued."""

    def __init__(self, clock: Clock = time.perf_counter) -> None:
        self.clock = clock
        self.seconds = 0.0  # all compiles so far
        self._seen: set[Hashable] = set()

    def is_new(self, key: Hashable) -> bool:
        return key not in self._seen

    def call(self, key: Hashable, fn: Callable, *args: Any, **kwargs: Any) -> tuple[Any, float]:
        """`fn(*args, **kwargs)` and the seconds it took if it compiled (0.0 when it did not)."""
        if key in self._seen:
            return fn(*args, **kwargs), 0.0
        start = self.clock()
        out = fn(*args, **kwargs)
        took = self.clock() - start
        self._seen.add(key)
        self.seconds += took
        return out, took


class StepClock:
    """Steady-state seconds per step: from `start` (after the first chunk, so the compile does
    not count) to now, less the host work that `excluded` adds up (evaluations, compiles)."""

    def __init__(self, clock: Clock = time.perf_counter,
                 excluded: Callable[[], float] = lambda: 0.0) -> None:
        self.clock, self.excluded = clock, excluded
        self._start: tuple[int, float, float] | None = None  # step, time, excluded then

    @property
    def started(self) -> bool:
        return self._start is not None

    def start(self, step: int) -> None:
        self._start = (step, self.clock(), self.excluded())

    def seconds_per_step(self, step: int) -> float | None:
        if self._start is None or step <= self._start[0]:
            return None
        first, since, excluded = self._start
        busy = self.clock() - since - (self.excluded() - excluded)
        return max(busy, 0.0) / (step - first)

    def eta(self, step: int, total: int) -> float | None:
        """Seconds of training until `total` at the steady-state speed (the caller adds the host
        work still to come, such as evaluations)."""
        per_step = self.seconds_per_step(step)
        return None if per_step is None else per_step * (total - step)


def status(step: int, total: int, images_per_sec: float | None, loss: float | None,
           error: float | None, eta: float | None) -> str:
    """`1,830 images/s, loss 0.512, error 17.3%, ETA 4 min 12 s`: what is known so far."""
    parts = []
    if images_per_sec is not None:
        parts.append(f"{images_per_sec:,.0f} images/s")
    if loss is not None and error is not None:
        parts.append(f"loss {loss:.3f}, error {error:.1f}%")
    if eta is not None and step < total:
        parts.append(f"ETA {duration(eta)}")
    return ", ".join(parts)


class Bar:
    """On a terminal: tqdm's bar in steps, created once training runs at full speed (after the
    compile), with cnnlab's own rate and ETA in place of tqdm's (which would count pauses)."""

    FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"

    def __init__(self, total: int, name: str, stream: TextIO) -> None:
        self.total, self.name, self.stream = total, name, stream
        self.bar: tqdm | None = None
        self._redirect = contextlib.ExitStack()

    def update(self, step: int, text: str) -> None:
        if self.bar is None:
            self.bar = tqdm(total=self.total, initial=step, desc=self.name, unit="step",
                            file=self.stream, dynamic_ncols=True, bar_format=self.FORMAT)
            # Log lines (evaluations) printed over the bar would break it; through tqdm they
            # are printed above it.
            self._redirect.enter_context(logging_redirect_tqdm())
        self.bar.set_postfix_str(text, refresh=False)  # drawn by update, at most 10 times a second
        self.bar.update(step - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self._redirect.close()


class LogLines:
    """Off a terminal (Slurm, CI, a pipe): a log line at most every `fraction` of the steps and
    `min_seconds`, whichever comes later, and at the last step; no carriage returns."""

    def __init__(self, total: int, emit: Callable[[str], None], clock: Clock = time.perf_counter,
                 fraction: float = 0.1, min_seconds: float = 30.0) -> None:
        self.total, self.emit, self.clock = total, emit, clock
        self.every_steps, self.min_seconds = max(1, int(total * fraction)), min_seconds
        self._last: tuple[int, float] | None = None  # step and time of the last line

    def update(self, step: int, text: str) -> None:
        now = self.clock()
        if self._last is None and step < self.total:
            self._last = (step, now)  # training just got going: the first line an interval on
            return
        last_step, last_time = self._last or (step, now)
        if step >= self.total or (step - last_step >= self.every_steps
                                  and now - last_time >= self.min_seconds):
            self.emit(f"step {step:,}/{self.total:,}" + (f": {text}" if text else ""))
            self._last = (step, now)

    def close(self) -> None:
        pass


def is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


@contextlib.contextmanager
def console_log(stream: TextIO | None = None) -> Iterator[None]:
    """cnnlab's INFO lines on stderr, for commands that Hydra does not set logging up for."""
    logger = logging.getLogger("cnnlab")
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S"))
    previous = logger.level, logger.propagate
    logger.addHandler(handler)
    # Not also through the root logger: a library may give it a console handler (basicConfig).
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous[0])  # setLevel: loggers cache their effective level
        logger.propagate = previous[1]
