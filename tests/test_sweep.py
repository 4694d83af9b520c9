"""Real multiruns through the CLI: failed jobs recorded while the sweep goes on, W&B groups and
tags, `cnnlab compare` on the result, and the launcher/sweeper plugins."""

import csv
import io
import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.helpers import TINY, run_cli, wandb_run_contents

# A tiny ResNet-8 on 512 fashion_mnist images, 8 steps: each job takes seconds.
SMALL = [o for o in TINY if not o.startswith(("train.steps=", "dataset.max_examples="))] + [
    "dataset.max_examples=512", "train.steps=8", "train.steps_per_call=2", "train.log_every=2",
    "train.eval_every=4", "checkpoint.enabled=false"]


def run_sweep(tmp_path: Path, data_dir: Path, *args: str):
    """`cnnlab train -m ARGS` into tmp_path/sweep; returns the process and the sweep folder."""
    sweep_dir = tmp_path / "sweep"
    result = run_cli(["train", "-m", *args, f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path,
                     data_dir=data_dir)
    return result, sweep_dir


def summaries(sweep_dir: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sweep_dir.glob("*/summary.json")}


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_sweep_with_a_diverging_job_then_compare(fashion_dir, tmp_path):
    # 3 learning rates x 2 seeds; lr=1e6 blows the weights up in its first steps.
    result, sweep_dir = run_sweep(tmp_path, fashion_dir, *SMALL, "norm=none",
                                  "optimizer.lr=0.02,0.05,1e6", "seed=0,1", "logger.tags=[study]")
    # Hydra exits 1 when jobs failed, after running every job; cnnlab tallies the sweep.
    assert result.returncode == 1, result.stderr[-3000:]
    assert "sweep of 6 jobs: 2 diverged, 4 finished" in result.stderr
    assert "diverged: train/loss reached" in result.stderr

    jobs = summaries(sweep_dir)
    # Job folders are named by what the sweep varies, not by the fixed settings.
    assert sorted(jobs) == sorted(f"{n}_optimizer.lr={lr},seed={s}" for n, (lr, s) in enumerate(
        (lr, s) for lr in ("0.02", "0.05", "1000000.0") for s in (0, 1)))
    for name, summary in jobs.items():
        if "1000000.0" in name:
            assert summary["status"] == "diverged"
            assert summary["failure"].startswith("diverged: train/loss reached")
            # Stopped at the first check (one compiled call late), not after all 8 steps.
            assert summary["final_step"] <= 4
        else:
            assert summary["status"] == "finished" and summary["final_step"] == 8, summary

    # W&B: one group for the sweep, the same tags on every run, the flattened config.
    contents = {name: wandb_run_contents(sweep_dir / name) for name in jobs}
    groups = set().union(*(c["groups"] for c in contents.values()))
    assert len(groups) == 1 and next(iter(groups))
    for name, wb in contents.items():
        assert wb["config"]["optimizer.lr"] == float(name.split("lr=")[1].split(",")[0])
        assert wb["summary"]["status"] == jobs[name]["status"]
        for key in ("params", "macs", "final/train/error", "wall_time"):
            assert wb["summary"][key] == jobs[name][key]
    tag_sets = {tuple(sorted(_tags(sweep_dir / name))) for name in jobs}
    assert tag_sets == {("study",)}

    out = tmp_path / "compare"
    shown = run_cli(["compare", str(sweep_dir), f"compare.output={out}"], cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr[-3000:]
    width, height = png_size(out / "curves.png")
    assert width > 400 and height > 300

    rows = list(csv.DictReader(io.StringIO((out / "table.csv").read_text())))
    # One column per config key the sweep varies; statistics to 6 significant digits.
    assert [r["optimizer.lr"] for r in rows] == ["0.02", "0.05", "1000000.0"]
    for row in rows:
        lr = row["optimizer.lr"]
        runs = [s for n, s in jobs.items() if f"lr={lr}," in n and s["status"] == "finished"]
        assert int(row["n"]) == len(runs) and int(row["runs"]) == 2
        for column, key in (("final_test_error", "final/test/error"),
                            ("best_test_error", "best/test/error"),
                            ("final_train_error", "final/train/error"),
                            ("wall_time", "wall_time"), ("images_per_sec", "images_per_sec")):
            values = [s[key] for s in runs]
            if not values:
                assert row[f"{column}_mean"] == ""
                continue
            assert math.isclose(float(row[f"{column}_mean"]), np.mean(values), rel_tol=1e-5)
            assert math.isclose(float(row[f"{column}_std"]), np.std(values, ddof=1),
                                rel_tol=1e-5, abs_tol=1e-9)
        if runs:
            assert int(float(row["params_mean"])) == runs[0]["params"]
            assert int(float(row["macs_mean"])) == runs[0]["macs"]

    failed = list(csv.DictReader(io.StringIO((out / "failed.csv").read_text())))
    assert len(failed) == 2
    for row in failed:
        summary = jobs[Path(row["run"]).name]
        assert row["status"] == "diverged" and row["reason"] == summary["failure"]
        assert int(row["step"]) == summary["final_step"]
    assert "| 0.05 | 2/2 |" in shown.stdout.replace("  ", " ")


def _tags(run_dir: Path) -> list[str]:
    from tests.helpers import read_wandb_records

    file = next(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    return [tag for record in read_wandb_records(file)
            if record.WhichOneof("record_type") == "run" for tag in record.run.tags]


def test_a_bad_config_found_at_run_time_fails_only_its_job(fashion_dir, tmp_path):
    """A batch larger than the data is only known once the data is loaded: that job fails with
    its reason, and the other job of the sweep runs."""
    result, sweep_dir = run_sweep(tmp_path, fashion_dir, *SMALL, "train.batch_size=32,4096",
                                  "logger.mode=disabled")
    assert result.returncode == 1
    jobs = summaries(sweep_dir)
    assert jobs["0_train.batch_size=32"]["status"] == "finished"
    failed = jobs["1_train.batch_size=4096"]
    assert failed["status"] == "failed"
    assert failed["failure"].startswith("config: train.batch_size=4096 exceeds the 512")
    assert "sweep of 2 jobs: 1 failed, 1 finished" in result.stderr


def test_joblib_launcher_runs_jobs_in_parallel_processes(fashion_dir, tmp_path, monkeypatch):
    from tests.test_job_devices import assert_each_worker_took_its_own_gpu

    # Two GPUs declared (the CPU backend ignores them): each worker process takes its own.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    result, sweep_dir = run_sweep(tmp_path, fashion_dir, "hydra/launcher=parallel", *SMALL,
                                  "seed=0,1", "logger.mode=disabled")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in result.stderr + result.stdout
    jobs = summaries(sweep_dir)
    assert sorted(jobs) == ["0_seed=0", "1_seed=1"]
    assert all(s["status"] == "finished" for s in jobs.values())
    # Different seeds, different runs.
    assert jobs["0_seed=0"]["final/train/loss"] != jobs["1_seed=1"]["final/train/loss"]
    assert_each_worker_took_its_own_gpu(sweep_dir, "5,7")


def test_optuna_search_records_a_failed_trial_and_goes_on(fashion_dir, tmp_path):
    # Seeded TPE starts with random trials; with seed 0 the first three draw both values.
    result, sweep_dir = run_sweep(tmp_path, fashion_dir, "hydra/sweeper=search",
                                  "hydra.sweeper.n_trials=3", "optimizer.lr=choice(0.05,1e6)",
                                  *SMALL, "norm=none", "dataset.val_size=128",
                                  "logger.mode=disabled")
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = summaries(sweep_dir)
    by_lr = {yaml.safe_load((sweep_dir / n / ".hydra/config.yaml").read_text())["optimizer"]["lr"]:
             s for n, s in jobs.items()}
    assert len(jobs) == 3 and {s["status"] for s in jobs.values()} == {"diverged", "finished"}
    assert by_lr[1e6]["status"] == "diverged" and by_lr[0.05]["status"] == "finished"
    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert best["best_params"] == {"optimizer.lr": 0.05}
    # The objective is the validation error, never the test error.
    assert best["best_value"] == by_lr[0.05]["final/val/error"]


def test_slurm_launcher_config_is_ready(tmp_path):
    result = run_cli(["train", "hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                      "--cfg", "hydra", "-p", "hydra.launcher"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    launcher = yaml.safe_load(result.stdout)
    assert launcher["_target_"] == (
        "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher")
    assert launcher["partition"] == "gpu" and launcher["gpus_per_node"] == 1
    assert launcher["timeout_min"] > 0 and launcher["max_num_timeout"] > 0


@pytest.mark.slow
def test_submitit_runs_the_jobs_it_would_send_to_slurm(fashion_dir, tmp_path):
    """submitit's local executor: the same pickled job and per-job processes as on Slurm."""
    result, sweep_dir = run_sweep(tmp_path, fashion_dir, "hydra/launcher=submitit_local",
                                  *SMALL, "seed=0,1", "logger.mode=disabled")
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = summaries(sweep_dir)
    assert sorted(jobs) == ["0_seed=0", "1_seed=1"]
    assert all(s["status"] == "finished" for s in jobs.values())


def test_a_sweep_declared_in_a_config_is_checked_before_it_starts(tmp_path):
    """The studies set hydra.mode: MULTIRUN and their sweep in hydra.sweeper.params: every job
    of it is validated up front, as a command-line sweep is."""
    result = run_cli(["train", "-m", "experiment=smoke/init_study",
                      "hydra.sweeper.params.init='he_normal,bogus'"], cwd=tmp_path)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "unknown init 'bogus'" in result.stderr
    assert not (tmp_path / "multirun").exists()


def test_a_study_without_m_is_refused_with_its_size(tmp_path):
    refused = run_cli(["train", "experiment=resnet_vs_plain"], cwd=tmp_path)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert refused.stderr.startswith(
        "cnnlab: error: experiment=resnet_vs_plain is a study of 24 runs of 64,000 steps: run it "
        "with -m")
    assert not (tmp_path / "multirun").exists() and not (tmp_path / "outputs").exists()


def test_the_sweep_report_counts_its_jobs_in_words(tmp_path):
    from cnnlab.cli.sweep import report
    from cnnlab.runs.rundir import RunDir

    for n in range(2):
        job = tmp_path / f"{n}_seed={n}"
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "config.yaml").write_text(f"seed: {n}\n")  # what Hydra writes
        RunDir(job).write_summary({"status": "finished"})
        line, all_finished = report(tmp_path)
        jobs = "1 job" if n == 0 else "2 jobs"
        assert line.startswith(f"sweep of {jobs}: {n + 1} finished;") and all_finished
