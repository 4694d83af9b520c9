"""Faults a run must survive: kills at chosen points (through a test hook, not timing races),
signals, cut and corrupted files, two processes, changed settings, a full disk, bad values.

Each test names the case of issue 13 it covers. A run here is a tiny ResNet-8 (width 4) on
1,024 offline fashion_mnist images, 20 steps of 5 per compiled call, a checkpoint every 5.
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cnnlab.cli import preflight
from cnnlab.errors import ConfigError
from cnnlab.runs.checkpoint import NoUsableCheckpoint
from cnnlab.runs.rundir import RunDir, RunDirBusy
from cnnlab.training import actions
from tests.helpers import TINY, run_cli, saved_state, train_tiny

FAULTS = ["train.steps=20", "train.steps_per_call=5", "train.log_every=5",
          "checkpoint.every=5", "checkpoint.keep=10"]
CLI = [*TINY, *FAULTS, "logger.mode=disabled"]


def _signal_at(monkeypatch: pytest.MonkeyPatch, step: int, signum: int) -> None:
    """Deliver `signum` to this process once the run has logged `step` (a test hook)."""
    original = actions.Record.__call__

    def record_then_signal(self: actions.Record, tick: actions.Tick) -> None:
        original(self, tick)
        if tick.step == step:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(actions.Record, "__call__", record_then_signal)


def _params(run_dir: Path, step: int) -> list[np.ndarray]:
    state = saved_state(run_dir / "checkpoints" / str(step))
    return [np.asarray(x) for x in jax.tree.leaves(state["params"])]


def _events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, fashion_dir) -> Path:
    """The uninterrupted run every faulty one is compared with."""
    run_dir = tmp_path_factory.mktemp("straight")
    assert train_tiny(run_dir, fashion_dir, FAULTS)["status"] == "finished"
    return run_dir


@pytest.fixture(scope="module")
def interrupted_template(tmp_path_factory, fashion_dir) -> Path:
    """A run stopped by SIGTERM after step 10: it checkpoints at the next boundary, 15."""
    run_dir = tmp_path_factory.mktemp("interrupted") / "run"
    with pytest.MonkeyPatch.context() as monkeypatch:
        _signal_at(monkeypatch, 10, signal.SIGTERM)
        summary = train_tiny(run_dir, fashion_dir, FAULTS)
    assert summary["status"] == "interrupted" and summary["signal"] == signal.SIGTERM
    assert summary["failure"] == "interrupted by SIGTERM at step 15"
    assert RunDir(run_dir).checkpoint_steps()[-1] == 15
    return run_dir


@pytest.fixture
def interrupted(interrupted_template, tmp_path) -> Path:
    """A copy of the interrupted run for one test to resume, corrupt or change."""
    return Path(shutil.copytree(interrupted_template, tmp_path / "run"))


def test_sigterm_checkpoints_and_the_resumed_run_equals_the_straight_one(
        interrupted, straight, fashion_dir):
    summary = train_tiny(interrupted, fashion_dir, FAULTS)
    assert summary["status"] == "finished" and summary["resumed_from"] == 15
    for a, b in zip(_params(straight, 20), _params(interrupted, 20), strict=True):
        np.testing.assert_array_equal(a, b)
    assert ([(e["step"], e["train/loss"]) for e in _events(interrupted)]
            == [(e["step"], e["train/loss"]) for e in _events(straight)])


def test_a_signal_read_at_the_last_step_stops_nothing(straight, tmp_path, fashion_dir,
                                                     monkeypatch):
    """Sent after step 15 is logged, SIGTERM is read at the next boundary, the last step: the
    run has finished there, so it is reported finished, exit 0 (it was reported interrupted at
    its last step, exit 143, and the signal handed on: submitit requeued a finished job)."""
    _signal_at(monkeypatch, 15, signal.SIGTERM)
    summary = train_tiny(tmp_path / "run", fashion_dir, FAULTS)
    finished = json.loads((straight / "summary.json").read_text())
    assert (summary["status"], summary["final_step"]) == ("finished", 20)
    assert "signal" not in summary and "failure" not in summary
    assert summary["final/test/error"] == finished["final/test/error"]
    assert RunDir(tmp_path / "run").checkpoint_steps()[-1] == 20


def test_case1_killed_after_the_final_checkpoint_is_completed_from_its_files(
        straight, tmp_path, fashion_dir):
    """Case 1: the summary still says `running` (a kill right after the last checkpoint)."""
    run_dir = tmp_path / "run"
    shutil.copytree(straight, run_dir)
    finished = json.loads((run_dir / "summary.json").read_text())
    RunDir(run_dir).write_summary({k: finished[k] for k in ("model", "dataset", "params")}
                                  | {"status": "running"})
    metrics_before = (run_dir / "metrics.jsonl").read_text()
    summary = train_tiny(run_dir, fashion_dir, FAULTS)
    assert summary["status"] == "finished" and summary["final_step"] == 20
    assert summary["final/test/error"] == finished["final/test/error"]
    assert summary["final/train/loss"] == finished["final/train/loss"]
    assert 0 < summary["wall_time"] <= finished["wall_time"]  # what the CLI's last line reports
    assert summary["images_per_sec"] > 0
    assert (run_dir / "metrics.jsonl").read_text() == metrics_before  # nothing retrained
    assert RunDir(run_dir).read_summary()["status"] == "finished"


def test_case3_a_cut_metrics_line_and_a_truncated_summary_still_resume(
        interrupted, straight, fashion_dir):
    with (interrupted / "metrics.jsonl").open("a") as f:
        f.write('{"step": 20, "train/lo')
    (interrupted / "summary.json").write_text('{"status": "runn')
    summary = train_tiny(interrupted, fashion_dir, FAULTS)
    assert summary["status"] == "finished"
    assert [e["step"] for e in _events(interrupted)] == [e["step"] for e in _events(straight)]


def test_case4_a_second_process_gets_one_line_naming_the_holder(tmp_path, fashion_dir):
    run_dir = RunDir(tmp_path / "run")
    with run_dir.lock():
        with pytest.raises(RunDirBusy, match=f"in use by process {os.getpid()} on"):
            train_tiny(run_dir.path, fashion_dir, FAULTS)
        result = run_cli(["train", *CLI, f"hydra.run.dir={run_dir.path}"], cwd=tmp_path,
                         data_dir=fashion_dir)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"cnnlab: error: {run_dir.path} is "
                                                             "in use by process")
    assert run_dir.read_summary() is None  # the holder's directory was not written to
    assert not run_dir.checkpoint_steps()


# Another process takes the run directory's lock the way a run does, says so, then sleeps.
HOLD_LOCK = ("import fcntl, os, sys, time\n"
             "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)\n"
             "fcntl.flock(fd, fcntl.LOCK_EX)\n"
             "os.pwrite(fd, f'process {os.getpid()} on elsewhere'.encode(), 0)\n"
             "print('locked', flush=True)\n"
             "time.sleep(600)\n")


def test_case4_a_lock_left_by_a_killed_process_does_not_block(tmp_path, fashion_dir):
    run_dir = RunDir(tmp_path / "run")
    run_dir.path.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_dir.path / ".lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirBusy, match=f"in use by process {holder.pid} on elsewhere"):
            with run_dir.lock():
                pass
    finally:
        holder.kill()
        holder.wait()
    # Killed without a chance to clean up: its text is still in the file, its lock is gone.
    assert str(holder.pid) in (run_dir.path / ".lock").read_text()
    assert train_tiny(run_dir.path, fashion_dir, FAULTS)["status"] == "finished"


def test_case5_a_changed_value_is_refused_then_recorded_when_allowed(interrupted, fashion_dir):
    with pytest.raises(ConfigError, match=r"trained to step 15 with other settings "
                                          r"\(optimizer.lr 0.1 -> 0.5\)"):
        train_tiny(interrupted, fashion_dir, [*FAULTS, "optimizer.lr=0.5"])
    summary = train_tiny(interrupted, fashion_dir,
                         [*FAULTS, "optimizer.lr=0.5", "resume.allow_changes=true"])
    assert summary["status"] == "finished"
    changes = [json.loads(line) for line in
               (interrupted / "changes.jsonl").read_text().splitlines()]
    assert changes == [{"step": 15, "changes": {"optimizer.lr": [0.1, 0.5]}}]
    assert RunDir(interrupted).start_config()["optimizer"]["lr"] == 0.1  # the original is kept


def test_case5_a_finished_run_is_not_answered_for_other_settings(straight, fashion_dir, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(straight, run_dir)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    for changed, allow in ((["model.width=8"], "false"), (["optimizer.lr=0.5"], "true")):
        with pytest.raises(ConfigError, match=r"already finished with other settings \((model."
                                              r"width 4 -> 8|optimizer.lr 0.1 -> 0.5)\)"):
            train_tiny(run_dir, fashion_dir, [*FAULTS, *changed, f"resume.allow_changes={allow}"])
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before
    same = train_tiny(run_dir, fashion_dir, [*FAULTS, "logger.mode=offline"])  # untracked key
    assert same == json.loads(before["summary.json"])
    # A key the first start did not have (cnnlab upgraded since) is not a change of settings.
    start = RunDir(run_dir).start_config()
    del start["train"]["stop_on_nan"]
    RunDir(run_dir).save_start_config(start, replace=True)
    assert train_tiny(run_dir, fashion_dir, FAULTS) == same


def test_case5_a_changed_shape_is_one_line_naming_the_key(interrupted, fashion_dir):
    with pytest.raises(ConfigError, match=r"do not fit .*\(changed: model.width 4 -> 8\)"):
        train_tiny(interrupted, fashion_dir,
                   [*FAULTS, "model.width=8", "resume.allow_changes=true"])


def _corrupt_truncate(step_dir: Path) -> None:
    data = max((p for p in (step_dir / "state").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])


def _corrupt_flip(step_dir: Path) -> None:
    data = max((p for p in (step_dir / "state").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    for i in range(len(raw) // 2, len(raw) // 2 + 64):
        raw[i] ^= 0xFF
    data.write_bytes(bytes(raw))


def _corrupt_meta(step_dir: Path) -> None:
    for path in (step_dir / "meta").rglob("*"):
        if path.is_file():
            path.write_text("{not json")


@pytest.mark.parametrize("corrupt", [_corrupt_truncate, _corrupt_flip, _corrupt_meta])
def test_case6_a_bad_latest_checkpoint_falls_back_to_the_previous(
        interrupted, straight, fashion_dir, corrupt, caplog):
    corrupt(interrupted / "checkpoints" / "15")
    summary = train_tiny(interrupted, fashion_dir, FAULTS)
    assert summary["status"] == "finished" and summary["resumed_from"] == 10
    assert "checkpoint 15 in" in caplog.text and "is unusable" in caplog.text
    assert (interrupted / "checkpoints" / "15.unusable").is_dir()
    for a, b in zip(_params(straight, 20), _params(interrupted, 20), strict=True):
        np.testing.assert_array_equal(a, b)


def test_case6_no_usable_checkpoint_is_said_not_silently_restarted(interrupted, fashion_dir):
    for step in RunDir(interrupted).checkpoint_steps():
        _corrupt_meta(interrupted / "checkpoints" / str(step))
    with pytest.raises(NoUsableCheckpoint, match="no usable checkpoint in .*move the folder"):
        train_tiny(interrupted, fashion_dir, FAULTS)


def test_case7_a_full_disk_stops_training_at_the_first_failed_save(
        tmp_path, fashion_dir, monkeypatch):
    def no_space(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ocp.CheckpointManager, "save", no_space)
    result = run_cli(["train", *CLI, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path,
                     data_dir=fashion_dir)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("cnnlab: error: could not save checkpoint 5") and "No space" in last
    assert "SweepReport" not in result.stderr  # a single run has no sweep to report
    summary = RunDir(tmp_path / "run").read_summary()
    assert summary["status"] == "failed" and summary["final_step"] == 5
    assert "No space left on device" in summary["failure"]


def test_sigint_from_the_cli_exits_130_with_one_line_and_a_checkpoint(
        tmp_path, fashion_dir, monkeypatch):
    _signal_at(monkeypatch, 10, signal.SIGINT)
    result = run_cli(["train", *CLI, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path,
                     data_dir=fashion_dir)
    assert result.returncode == 128 + signal.SIGINT
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        "cnnlab: interrupted by SIGINT at step 15; checkpoint saved")
    assert RunDir(tmp_path / "run").read_summary()["status"] == "interrupted"
    assert RunDir(tmp_path / "run").checkpoint_steps()[-1] == 15


@pytest.mark.parametrize("override, message", [
    ("augment.cutout=100", "augment.cutout=100 must be smaller than the 28x28 images"),
    ("augment.crop_pad=100", "augment.crop_pad=100 must be smaller than the 28x28 images"),
    ("norm.momentum=2", "norm.momentum=2.0 must be in [0, 1)"),
    (f"seed={2**40}", f"seed={2**40} must be in [0, 2**32)"),
    ("+train.stepz=100", "unknown key 'train.stepz'"),
    ("++train.stepz=5", "unknown key 'train.stepz'"),
    ("optimizer.lr=inf", "optimizer.lr=inf must be a finite number"),
    ("train.divergence_threshold=nan", "train.divergence_threshold=nan must be a finite number"),
    ("train.divergence_threshold=0", "train.divergence_threshold=0.0 must be positive"),
    ("dataset.cache_max_gb=0", "dataset.cache_max_gb=0.0 must be positive or null"),
])
def test_values_that_gave_silently_wrong_science_are_refused(override, message):
    with pytest.raises(ConfigError) as info:
        preflight.compose([override])
    assert message in str(info.value) and "\n" not in str(info.value)


def test_run_directory_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "run").write_text("")
    result = run_cli(["train", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"cnnlab: error: hydra.run.dir={tmp_path / 'run'} is a "
                                     "file; a run directory must be a folder")


def test_a_sweep_without_multirun_is_one_line(tmp_path):
    result = run_cli(["train", "model.depth=8,20", f"hydra.run.dir={tmp_path / 'run'}"],
                     cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == ("cnnlab: error: model.depth=8,20 is a sweep: add -m "
                                     "(--multirun) to run each value, or write a list as "
                                     "key=[a,b]")


def test_a_malformed_saved_config_is_one_line_in_compare_and_eval(straight, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(straight, run_dir)
    (run_dir / ".hydra" / "config.yaml").write_text("model: [unclosed\n")
    for command in (["compare", str(run_dir)], ["eval", str(run_dir)]):
        result = run_cli(command, cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("cnnlab: error: "), result.stderr
        assert "config.yaml" in lines[0]


# ------------------------------------------------- real filesystems: a full disk, a read-only one


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MB tmpfs of this test's own (root with CAP_SYS_ADMIN); skipped where none can be made.

    Real ENOSPC and EROFS errors come from the kernel, through every layer (Orbax, W&B, our own
    writes), which the write hook of the test above cannot show."""

    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if made.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip() or made.returncode}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def _fill(disk: Path) -> Path:
    """Write to `disk` until the kernel says it is full; returns the filler file."""
    filler = disk / "filler"
    with filler.open("wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def _fill_at(monkeypatch: pytest.MonkeyPatch, step: int, disk: Path) -> None:
    """Fill the disk once the run has logged `step` (a test hook): the save at `step` fails."""
    original = actions.Record.__call__

    def record_then_fill(self: actions.Record, tick: actions.Tick) -> None:
        original(self, tick)
        if tick.step == step:
            _fill(disk)

    monkeypatch.setattr(actions.Record, "__call__", record_then_fill)


@pytest.mark.can_skip  # mounting a tmpfs needs CAP_SYS_ADMIN
def test_case7_a_really_full_disk_ends_in_one_line_and_resumes_once_freed(
        small_disk, straight, tmp_path, fashion_dir, monkeypatch):
    run_dir = small_disk / "run"
    _fill_at(monkeypatch, 10, small_disk)
    result = run_cli(["train", *CLI, f"hydra.run.dir={run_dir}"], cwd=tmp_path,
                     data_dir=fashion_dir)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("cnnlab: error: could not save checkpoint 10") and "No space" in last
    # What was logged before the disk filled is whole, and what the uninterrupted run logged;
    # the checkpoint before it is usable.
    logged = (run_dir / "metrics.jsonl").read_text()
    assert ([(e["step"], e["train/loss"]) for e in _events(run_dir)]
            == [(e["step"], e["train/loss"]) for e in _events(straight)][:2])
    assert RunDir(run_dir).checkpoint_steps() == [5]

    # Still full: the next start says so before Hydra or training write anything.
    monkeypatch.undo()
    again = run_cli(["train", *CLI, f"hydra.run.dir={run_dir}"], cwd=tmp_path,
                    data_dir=fashion_dir)
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert again.stderr.strip().splitlines()[-1] == (
        f"cnnlab: error: hydra.run.dir={run_dir} cannot be written: No space left on device "
        f"({run_dir})")
    assert (run_dir / "metrics.jsonl").read_text() == logged

    (small_disk / "filler").unlink()
    summary = train_tiny(run_dir, fashion_dir, FAULTS)
    assert summary["status"] == "finished" and summary["resumed_from"] == 5
    for a, b in zip(_params(straight, 20), _params(run_dir, 20), strict=True):
        np.testing.assert_array_equal(a, b)
    assert ([(e["step"], e["train/loss"]) for e in _events(run_dir)]
            == [(e["step"], e["train/loss"]) for e in _events(straight)])


@pytest.mark.can_skip  # mounting a tmpfs needs CAP_SYS_ADMIN
def test_a_read_only_run_directory_is_one_line_and_stays_as_it_was(
        small_disk, interrupted, tmp_path, fashion_dir):
    run_dir = small_disk / "run"
    shutil.copytree(interrupted, run_dir)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    for target in (run_dir, small_disk / "new_run"):
        result = run_cli(["train", *CLI, f"hydra.run.dir={target}"], cwd=tmp_path,
                         data_dir=fashion_dir)
        assert result.returncode in (1, 2), result.stderr[-2000:]
        assert "Traceback" not in result.stderr
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("cnnlab: error:") and "Read-only file system" in last
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
