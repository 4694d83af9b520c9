"""A signal in each phase of a run, through the real CLI in its own process (`python -m
cnnlab.cli train`): loading the data, compiling, evaluating and saving a checkpoint, and a second
Ctrl-C during a save. Each run ends in one line with the exit status of its signal, keeps what it
logged, and its rerun ends where an uninterrupted run ends, bit for bit.

The signal is timed by the lines the run prints (`loading fashion_mnist`, `compiling the training
step`, `step 10: evaluating test`), or, for a save (which prints nothing), by a hook on Orbax's
commit of checkpoint 5, held until the run waits for it at step 10
(tests/signal_during_save.py). The run is tests/test_faults.py's tiny ResNet-8 with an
evaluation every 5 steps; its compile cache is off, so that the compile the
signal is sent during is a real one.
"""

import gc
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

from cnnlab.runs.rundir import RunDir
from cnnlab.training.signals import Interrupted, StopOnSignal
from tests.helpers import REPO, TINY, train_tiny
from tests.test_faults import FAULTS, _events, _params

PHASES = [*FAULTS, "train.eval_every=5", "compile_cache_dir=null"]
CLI = ["train", *TINY, *PHASES, "logger.mode=disabled"]


def _env(data_dir: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_SERVICE")}
    return {**env, "TFDS_DATA_DIR": str(data_dir), "PYTHONPATH": str(REPO)}


def _signal_on_line(run_dir: Path, data_dir: Path, line: str, signum: int,
                    tmp_path: Path) -> tuple[subprocess.CompletedProcess, str]:
    """`cnnlab train` in a new process, sent `signum` as soon as it prints a line containing
    `line`; returns the finished process (stderr in it) and what it printed before the line."""
    err = tmp_path / "stderr.txt"
    with err.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "cnnlab.cli", *CLI, f"hydra.run.dir={run_dir}"],
            cwd=tmp_path, env=_env(data_dir), stdout=subprocess.PIPE, stderr=stderr, text=True)
        before = []
        for printed in process.stdout:
            if line in printed:
                process.send_signal(signum)
                break
            before.append(printed)
        else:
            process.wait()
            pytest.fail(f"the run never printed {line!r}: {err.read_text()[-3000:]}")
        rest = process.stdout.read()
        process.wait(timeout=600)
    return subprocess.CompletedProcess(CLI, process.returncode, rest, err.read_text()), "".join(
        before)


def _signal_during_save(run_dir: Path, data_dir: Path, signals: str,
                        tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "tests" / "signal_during_save.py"), "5", signals, *CLI,
         f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=_env(data_dir), capture_output=True,
        text=True, timeout=600)


def _last_line(result: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, fashion_dir) -> Path:
    """The uninterrupted run each interrupted one, rerun, must end as."""
    run_dir = tmp_path_factory.mktemp("straight")
    assert train_tiny(run_dir, fashion_dir, PHASES)["status"] == "finished"
    return run_dir


def _logged(run_dir: Path) -> list[tuple]:
    return [(e["step"], e["train/loss"], e.get("test/error")) for e in _events(run_dir)]


def _check_logged_so_far(run_dir: Path, straight: Path, last_step: int) -> None:
    """Every line of metrics.jsonl whole, and the same as the uninterrupted run's up to where
    the run stopped: nothing logged is lost or cut."""
    assert _logged(run_dir) == [e for e in _logged(straight) if e[0] <= last_step]


def _check_rerun_ends_as_straight(run_dir: Path, straight: Path, fashion_dir: Path,
                                  resumed_from: int | None) -> None:
    summary = train_tiny(run_dir, fashion_dir, PHASES)
    assert summary["status"] == "finished" and summary["resumed_from"] == resumed_from
    for a, b in zip(_params(straight, 20), _params(run_dir, 20), strict=True):
        np.testing.assert_array_equal(a, b)
    assert _logged(run_dir) == _logged(straight)
    assert summary["final/test/error"] == json.loads(
        (straight / "summary.json").read_text())["final/test/error"]


def _check_interrupted_at(result: subprocess.CompletedProcess, run_dir: Path, signum: int,
                          step: int) -> None:
    """One line saying the run stopped at `step` with a checkpoint, the exit status 128 + the
    signal's number, and the summary saying so."""
    name = signal.Signals(signum).name
    assert result.returncode == 128 + signum, result.stderr[-3000:]
    assert _last_line(result) == (f"cnnlab: interrupted by {name} at step {step}; checkpoint "
                                  f"saved, resume with the same command (run directory: "
                                  f"{run_dir})")
    summary = RunDir(run_dir).read_summary()
    assert (summary["status"], summary["signal"], summary["final_step"]) == (
        "interrupted", signum, step)
    assert RunDir(run_dir).checkpoint_steps()[-1] == step


def test_a_signal_while_the_data_loads_ends_at_once_and_the_rerun_starts_clean(
        tmp_path, fashion_dir, straight):
    run_dir = tmp_path / "run"
    result, _ = _signal_on_line(run_dir, fashion_dir, "loading fashion_mnist", signal.SIGTERM,
                                tmp_path)
    # Nothing trained, nothing to save: it ends before the first step, in one line.
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-3000:]
    assert _last_line(result) == "cnnlab: error: interrupted by SIGTERM before the first step"
    assert "compiling" not in result.stdout
    assert not RunDir(run_dir).checkpoint_steps()
    assert not (run_dir / "metrics.jsonl").exists()
    assert RunDir(run_dir).read_summary()["status"] == "interrupted"
    _check_rerun_ends_as_straight(run_dir, straight, fashion_dir, resumed_from=None)


def test_a_signal_during_the_compile_stops_after_the_first_chunk(tmp_path, fashion_dir, straight):
    run_dir = tmp_path / "run"
    result, before = _signal_on_line(run_dir, fashion_dir, "compiling the training step",
                                     signal.SIGINT, tmp_path)
    assert "compiled the training step" not in before
    # The compile is not thrown away: its first chunk runs and is saved.
    _check_interrupted_at(result, run_dir, signal.SIGINT, 5)
    _check_logged_so_far(run_dir, straight, 5)
    _check_rerun_ends_as_straight(run_dir, straight, fashion_dir, resumed_from=5)


def test_a_signal_during_an_evaluation_keeps_it_and_stops_at_the_next_boundary(
        tmp_path, fashion_dir, straight):
    run_dir = tmp_path / "run"
    result, _ = _signal_on_line(run_dir, fashion_dir, "step 10: evaluating test", signal.SIGTERM,
                                tmp_path)
    _check_interrupted_at(result, run_dir, signal.SIGTERM, 15)
    assert "step 10: evaluated test" in result.stdout  # the evaluation under way was finished
    _check_logged_so_far(run_dir, straight, 15)
    _check_rerun_ends_as_straight(run_dir, straight, fashion_dir, resumed_from=15)


def test_a_signal_during_a_checkpoint_save_completes_it_and_saves_the_stop(
        tmp_path, fashion_dir, straight):
    run_dir = tmp_path / "run"
    result = _signal_during_save(run_dir, fashion_dir, "SIGTERM", tmp_path)
    # Received at step 10, waiting for save 5: that save completes, the steps to 15 run.
    _check_interrupted_at(result, run_dir, signal.SIGTERM, 15)
    assert RunDir(run_dir).checkpoint_steps() == [5, 10, 15]
    _check_logged_so_far(run_dir, straight, 15)
    _check_rerun_ends_as_straight(run_dir, straight, fashion_dir, resumed_from=15)


def _folders(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def test_a_second_ctrl_c_during_a_save_exits_at_once_without_a_half_written_checkpoint(
        tmp_path, fashion_dir, straight):
    run_dir = tmp_path / "run"
    result = _signal_during_save(run_dir, fashion_dir, "SIGINT,SIGINT", tmp_path)
    assert result.returncode == 128 + signal.SIGINT, result.stderr[-3000:]
    # Both at step 10, waiting for save 5: the run ends there, its last logged step 5.
    assert _last_line(result) == "cnnlab: error: interrupted by SIGINT at step 5"
    summary = RunDir(run_dir).read_summary()
    assert (summary["status"], summary["signal"], summary["final_step"]) == (
        "interrupted", signal.SIGINT, 5)
    # The save the second Ctrl-C interrupted was completed on the way out and no other was
    # started: every folder is a whole checkpoint that restores.
    assert _folders(run_dir) == ["5"]
    manager = ocp.CheckpointManager(run_dir / "checkpoints")
    assert manager.all_steps() == [5]
    manager.close()
    _check_logged_so_far(run_dir, straight, 5)
    _check_rerun_ends_as_straight(run_dir, straight, fashion_dir, resumed_from=5)


def test_a_second_sigterm_is_reported_as_sigterm(tmp_path, fashion_dir):
    """A second signal of another kind than Ctrl-C (Slurm's repeated SIGTERM) interrupts at once
    too, and is named and exits as itself, not as a Ctrl-C."""
    run_dir = tmp_path / "run"
    result = _signal_during_save(run_dir, fashion_dir, "SIGTERM,SIGTERM", tmp_path)
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-3000:]
    assert _last_line(result) == "cnnlab: error: interrupted by SIGTERM at step 5"
    assert RunDir(run_dir).read_summary()["signal"] == signal.SIGTERM
    assert _folders(run_dir) == ["5"]


def test_a_signal_whose_raise_python_drops_still_ends_the_run_before_training_silently(
        monkeypatch) -> None:
    """CI saw a SIGTERM sent while the data loaded run its handler inside jax's garbage-
    collection callback, whose exceptions Python only prints: the run trained on and exited
    with 0, and later (with `raise_pending`) ended right but printed a traceback above its one
    line. A signal in a gc callback here; the handler keeps it, Python's report of the dropped
    raise is not printed, and the run ends before any step all the same (`raise_pending` after
    the data is built, at the latest `start`). Other dropped exceptions are still reported."""
    reported = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)
    handler = StopOnSignal()

    def collecting(phase: str, info: dict) -> None:
        if phase == "start":
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs here; its raise is dropped

    def failing(phase: str, info: dict) -> None:
        if phase == "start":
            raise ValueError("a callback's own bug")

    gc.callbacks.append(collecting)
    try:
        gc.collect()  # no Interrupted gets out, and none is reported
        gc.callbacks.remove(collecting)
        assert reported == []
        gc.callbacks.append(failing)
        gc.collect()
        gc.callbacks.remove(failing)
        assert [type(r.exc_value) for r in reported] == [ValueError]
        with pytest.raises(Interrupted, match="by SIGTERM before the first step"):
            handler.raise_pending()
        with pytest.raises(Interrupted):
            handler.start()
        assert not handler.started
    finally:
        for callback in (collecting, failing):
            if callback in gc.callbacks:
                gc.callbacks.remove(callback)
        handler.close()
    assert sys.unraisablehook == reported.append  # given back

