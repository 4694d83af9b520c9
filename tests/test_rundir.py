"""RunDir: the run directory's files, read and written in one place."""

import errno
import json
import math
import subprocess
import sys

import pytest

from cnnlab.runs.rundir import RunDir, find_run_dirs


def test_summary_round_trips_non_finite_values_and_leaves_no_temporary(tmp_path):
    run = RunDir(tmp_path / "run")
    written = run.write_summary({"status": "diverged", "final/train/loss": math.inf})
    assert written["final/train/loss"] == "inf"  # JSON has no inf
    assert run.read_summary() == {"status": "diverged", "final/train/loss": math.inf}
    assert sorted(p.name for p in run.path.iterdir()) == ["summary.json"]


def test_an_unreadable_summary_is_a_failed_run_not_a_crash(tmp_path):
    (tmp_path / "summary.json").write_text('{"status": "runn')
    summary = RunDir(tmp_path).read_summary()
    assert summary["status"] == "failed" and "unreadable summary.json" in summary["failure"]
    assert RunDir(tmp_path / "none").read_summary() is None


def test_metrics_are_appended_merged_by_step_and_a_cut_last_line_is_skipped(tmp_path):
    run = RunDir(tmp_path)
    run.append_metrics(10, {"train/error": 5.0})
    run.append_metrics(10, {"test/error": math.nan})
    run.append_metrics(20, {"train/error": 4.0})
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 30, "train/err')  # a kill in mid-write
    events = run.read_metrics()
    assert [e["step"] for e in events] == [10, 20]
    assert events[0]["train/error"] == 5.0 and math.isnan(events[0]["test/error"])


def test_resume_drops_later_events_and_the_cut_line_atomically(tmp_path):
    run = RunDir(tmp_path)
    for step in (10, 20, 30):
        run.append_metrics(step, {"train/loss": float(step)})
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 40, "tr')
    run.drop_metrics_after(20)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [10, 20]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


@pytest.mark.parametrize("write", ["summary", "metrics rewrite"])
def test_a_write_that_dies_half_way_leaves_the_old_file_whole(tmp_path, write):
    """A process whose write stops part-way (killed, or out of space, mid-file) must leave the
    file as it was: in another process limited to files of 100 bytes (RLIMIT_FSIZE, which
    needs no root), the rewrite fails after writing 100 bytes of the new content."""
    run = RunDir(tmp_path)
    for step in range(1, 31):
        run.append_metrics(step, {"train/loss": step / 7})
    run.write_summary({"status": "running", "note": "x" * 300})
    before = {name: (tmp_path / name).read_text() for name in ("metrics.jsonl", "summary.json")}
    action = ("run.drop_metrics_after(25)" if write == "metrics rewrite"
              else "run.write_summary({'status': 'finished', 'note': 'y' * 300})")
    script = (
        "import resource, sys\n"
        "from cnnlab.runs.rundir import RunDir\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100))\n"
        f"run = RunDir({str(tmp_path)!r})\n"
        f"try:\n    {action}\nexcept OSError as e:\n    sys.exit(e.errno)\n"
    )
    died = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert died.returncode == errno.EFBIG, died.stderr  # the write did fail part-way
    assert {name: (tmp_path / name).read_text() for name in before} == before
    assert [e["step"] for e in run.read_metrics()] == list(range(1, 31))


def test_checkpoint_steps_are_complete_folders_only(tmp_path):
    for name in ("10", "20", "30.orbax-checkpoint-tmp-123"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
    assert RunDir(tmp_path).checkpoint_steps() == [10, 20]
    assert RunDir(tmp_path).checkpoint_steps("best") == []


def test_run_dirs_are_found_in_job_number_order(tmp_path):
    for job in ("10_seed=1", "2_seed=0", "1_seed=2"):
        (tmp_path / job / ".hydra").mkdir(parents=True)
        (tmp_path / job / ".hydra" / "config.yaml").write_text("seed: 0\n")
    assert [p.name for p in find_run_dirs(tmp_path)] == ["1_seed=2", "2_seed=0", "10_seed=1"]
    assert find_run_dirs(tmp_path / "2_seed=0") == [tmp_path / "2_seed=0"]


def test_the_wandb_id_is_kept_across_resumes(tmp_path):
    run = RunDir(tmp_path)
    assert run.wandb_id("abcd") == "abcd"
    assert run.wandb_id("efgh") == "abcd"
