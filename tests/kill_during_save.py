"""A tiny run (tests/test_faults.py's) killed by SIGKILL while its step-15 checkpoint is being
written in the background: Orbax's commit of that checkpoint (the rename of its temporary
folder, once the files are written) kills the process instead. Run by
tests/test_async_checkpoint.py:

    python tests/kill_during_save.py DATA_DIR RUN_DIR
"""

import os
import signal
import sys
from pathlib import Path

from orbax.checkpoint._src.checkpointers import async_checkpointer

from tests.helpers import train_tiny
from tests.test_faults import FAULTS

commit = async_checkpointer._on_commit_callback


def kill_at_commit_of_15(tmpdir, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN201
    if tmpdir.get_final().name == "15" and tmpdir.get_final().parent.name == "checkpoints":
        Path(sys.argv[2], "killed_while_saving_15").write_text(
            "\n".join(p.name for p in tmpdir.get_final().parent.iterdir()))
        os.kill(os.getpid(), signal.SIGKILL)
    return commit(tmpdir, *args, **kwargs)


async_checkpointer._on_commit_callback = kill_at_commit_of_15
train_tiny(Path(sys.argv[2]), Path(sys.argv[1]), FAULTS)
