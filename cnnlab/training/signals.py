"""Stopping a run on a signal, at the next step boundary, and in a multi-host job at the same
step on every process (an action of the training loop, cnnlab/training/actions.py)."""

import signal
import sys
import threading
from typing import Any

import jax

from cnnlab import parallel
from cnnlab.training.actions import Tick


class Interrupted(KeyboardInterrupt):
    """The run ends at once on signal `signum`: a second signal, or one before training started
    (nothing to save yet). `step`: the last step the loop had finished (None: before the
    first)."""

    def __init__(self, signum: int, step: int | None = None) -> None:
        self.signum, self.step = int(signum), step
        where = "before the first step" if step is None else f"at step {step}"
        super().__init__(f"interrupted by {signal.Signals(signum).name} {where}")


class StopOnSignal:
    """SIGTERM (Slurm's time limit, `kill`), SIGUSR2 (submitit's warning) and SIGINT (Ctrl-C)
    stop the run at the next step boundary, after a checkpoint; a second signal interrupts at
    once (`Interrupted`), as does one before `start` (loading the data: nothing is trained yet),
    unless a Python handler was there before (submitit's), which then gets it as it would have.
    A signal at the last step stops nothing: the run has finished. In a multi-host job (a signal
    may reach one process only) each process's signal is reduced over the processes after every
    chunk, unwaited, and read at the next boundary: all stop at one step and save together.
    `forward` then hands the signal to the handler it displaced (submitit's requeues the job)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous = {}
        self.started = False
        # cnnlab/parallel.py's Placement, where its mesh spans processes (set by `start`).
        self.placement: Any = None
        self._agreed: jax.Array | None = None  # queued after the previous chunk
        self._unraisable_hook = None
        if threading.current_thread() is threading.main_thread():  # handlers: main thread only
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
            self._unraisable_hook = sys.unraisablehook
            sys.unraisablehook = self._unraisable

    def _unraisable(self, unraisable: Any) -> None:
        """Python's report of an exception it could not raise, less our own `Interrupted`: a
        handler that lands in a callback whose exceptions Python only prints (jax's garbage-
        collection callback, seen in CI) would otherwise print a traceback above the run's one
        line, though the signal is not lost (`raise_pending` raises it again)."""
        if not isinstance(unraisable.exc_value, Interrupted):
            self._unraisable_hook(unraisable)

    def start(self, placement: Any = None) -> None:
        """From now on a signal stops the run at the next step boundary (the training loop is
        about to run: its first chunk compiles, then runs and is saved)."""
        self.raise_pending()
        self.placement = placement if placement is not None and placement.spans_processes else None
        self.started = True

    def raise_pending(self) -> None:
        """`Interrupted` for a signal before `start` whose raise was lost: Python only prints
        an exception raised in some callbacks, and a handler runs in whatever code the signal
        lands in (CI saw one land in jax's garbage-collection callback while the data loaded:
        the run trained on and exited with 0)."""
        if not self.started and self.received is not None:
            raise Interrupted(self.received)

    def _handle(self, signum: int, frame: Any) -> None:
        if not self.started and self._forward(signum, frame):
            return
        first = self.received is None
        self.received = signum  # kept if the raise below is lost (`raise_pending`)
        if not first or not self.started:
            raise Interrupted(signum)

    def __call__(self, tick: Tick) -> None:
        signum = self.received if self.placement is None else self._agree(tick)
        if signum and tick.stop is None and not tick.last:
            self.received = signum
            name = signal.Signals(signum).name
            tick.stop = ("interrupted", f"interrupted by {name} at step {tick.step}")

    def _agree(self, tick: Tick) -> int:
        """The largest signal any process had received by the previous tick (0: none).

        Why a chunk late, by design: the reduction is a collective on the devices, queued
        behind the chunk that ends at this tick. Reading it now would wait for that chunk to
        finish before the next one is queued, every chunk: the device would idle while the host
        dispatches (the per-chunk sync the loop no longer has). Read at the next tick it costs
        nothing: by then the loop waits for that chunk anyway (the progress display and the
        divergence check read each chunk's metrics one chunk late). The price is
        `train.steps_per_call` more steps before the stop, all processes at the same step,
        well inside the grace a preemption gives (Slurm's KillWait, 30 s by default;
        submitit's SIGUSR2 comes minutes before the limit). A host-side agreement would avoid
        the device but not the wait: JAX's preemption sync point (what Orbax uses) handles
        SIGTERM only, and a key-value barrier through the coordinator each chunk puts a round
        trip to process 0 on every chunk of every process."""
        agreed, self._agreed = self._agreed, parallel.max_over_processes(
            self.received or 0, self.placement, tick.state.step)
        return int(agreed) if agreed is not None else 0

    def forward(self) -> None:
        """The signal to the handler it displaced, if a Python function (submitit's)."""
        self._forward(self.received, None)

    def _forward(self, signum: int | None, frame: Any) -> bool:
        previous = self._previous.get(signum)
        if callable(previous) and previous is not signal.default_int_handler:
            previous(signum, frame)
            return True
        return False

    def close(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        if self._unraisable_hook is not None and sys.unraisablehook == self._unraisable:
            sys.unraisablehook = self._unraisable_hook
