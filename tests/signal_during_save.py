"""`cnnlab train ARGS` in this process with signals sent while checkpoint STEP is being saved in
the background. Run by tests/test_signals_phases.py:

    python tests/signal_during_save.py STEP SIGNAL[,SIGNAL2] train ARGS...

Orbax's commit of checkpoint STEP (the rename of its finished temporary folder) is held until
the main thread waits for that save (the next save is due), then the signal is sent and handled
there; a second signal (a second Ctrl-C) is sent once the first is handled, and the commit goes
on only once the main thread has left its wait: the second signal lands in the middle of the
save.
"""

import os
import signal
import sys
import threading
import time
from collections.abc import Callable

from orbax.checkpoint._src.checkpointers import async_checkpointer

from cnnlab.cli.main import main

commit = async_checkpointer._on_commit_callback
STEP = sys.argv[1]
SIGNALS = [signal.Signals[name] for name in sys.argv[2].split(",")]


def _main_thread_waits_for_a_save() -> bool:
    frame = sys._current_frames().get(threading.main_thread().ident)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "wait" and code.co_filename.endswith(os.path.join("runs",
                                                                              "checkpoint.py")):
            return True
        frame = frame.f_back
    return False


def _until(condition: Callable[[], bool], what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the main thread never {what}")
        time.sleep(0.01)


def signal_at_commit(tmpdir, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN201
    final = tmpdir.get_final()
    if final.name == STEP and final.parent.name == "checkpoints":
        _until(_main_thread_waits_for_a_save, "waited for the save")
        handler = signal.getsignal(SIGNALS[0]).__self__  # training/signals.py's StopOnSignal
        os.kill(os.getpid(), SIGNALS[0])
        _until(lambda: handler.received is not None, "handled the signal")
        if len(SIGNALS) > 1:
            os.kill(os.getpid(), SIGNALS[1])
            _until(lambda: not _main_thread_waits_for_a_save(), "left the wait")
    return commit(tmpdir, *args, **kwargs)


async_checkpointer._on_commit_callback = signal_at_commit
main(sys.argv[3:])
