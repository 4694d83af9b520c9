"""Real runs through the CLI: real fashion_mnist, real W&B offline files, real Orbax resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from cnnlab import host_memory
from cnnlab.training.loop import train
from tests.helpers import TINY, compose_config, run_cli, saved_state, wandb_run_contents


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def with_overrides(base: list[str], **changes: object) -> list[str]:
    keys = {f"{k.replace('__', '.')}" for k in changes}
    kept = [o for o in base if o.split("=")[0] not in keys]
    return kept + [f"{k.replace('__', '.')}={v}" for k, v in changes.items()]


def test_short_real_run_learns_and_logs_everywhere(fashion_dir, tmp_path):
    args = with_overrides(TINY, train__steps=60, train__log_every=15, train__steps_per_call=5,
                          train__eval_every=30, checkpoint__every=30)
    result = run_cli(["train", *args, f"hydra.run.dir={tmp_path}"], cwd=tmp_path,
                     data_dir=fashion_dir, fresh_process=True)
    assert result.returncode == 0, result.stderr[-3000:]

    events = read_jsonl(tmp_path / "metrics.jsonl")
    assert [e["step"] for e in events] == [15, 30, 45, 60]
    assert events[-1]["train/loss"] < events[0]["train/loss"] - 0.2, events
    assert events[-1]["test/error"] < 60.0  # 10 classes: chance is 90%
    for event in events:
        assert {"train/loss", "train/error", "lr", "wall_time", "epoch"} <= event.keys()
    assert "test/loss" in events[1] and "test/loss" not in events[0]

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["final_step"] == 60
    # The command restarted itself with huge pages where that changes something (on Linux
    # with glibc and the kernel's THP mode `madvise`, as on CI's machines): cnnlab/host_memory.py.
    restarted = host_memory.command_tunables() is not None
    assert summary["host_huge_pages"] == (restarted or host_memory.huge_pages())
    assert summary["final/test/error"] == events[-1]["test/error"]
    assert summary["best/test/error"] == min(e["test/error"] for e in events if "test/error" in e)
    # ResNet-8, width 4, 1 input channel, 10 classes: stem 36 + 6 convs and the head.
    convs = [(1, 4), (4, 4), (4, 4), (4, 8), (8, 8), (8, 16), (16, 16)]
    expected = sum(9 * a * b + 2 * b for a, b in convs) + 16 * 10 + 10
    assert summary["params"] == expected
    # Multiply-adds per 28x28 image: each 3x3 conv costs 9*c_in*c_out per output position
    # (28x28, 14x14, 7x7 by stage), plus the classifier; zero-padded shortcuts cost none.
    sizes = [28, 28, 28, 14, 14, 7, 7]
    conv_macs = sum(9 * a * b * s * s for (a, b), s in zip(convs, sizes, strict=True))
    assert summary["macs"] == conv_macs + 16 * 10

    wb = wandb_run_contents(tmp_path)
    assert len(wb["files"]) == 1
    assert [row["_step"] for row in wb["history"]] == [15, 30, 45, 60]
    assert [row["train/loss"] for row in wb["history"]] == [e["train/loss"] for e in events]
    # Flattened, so that W&B's filters and parallel-coordinates panels see each key.
    assert wb["config"]["model.depth"] == 8 and wb["config"]["augment.name"] == "crop_flip"
    assert wb["summary"]["status"] == "finished"
    assert {k: wb["summary"][k] for k in summary if k != "status"} == {
        k: v for k, v in summary.items() if k != "status"}
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert wb["history"][-1]["curves/_type"] == "image-file"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["30", "60"]
    # Named by what sets it apart, with its job type, config and final checkpoint attached.
    # model=resnet20 with model.depth=8 trains a ResNet-8: the name says so.
    named = [a.replace("model=resnet20", "model=resnet8") for a in args]
    assert wb["names"] == {",".join(sorted(a for a in named if not a.startswith("progress=")))}
    assert wb["job_types"] == {"train"}
    artifacts = {kind: (name, files) for kind, name, files in wb["artifacts"]}
    # W&B keeps each logged wandb.Table (the per-class errors) as a run_table artifact.
    assert set(artifacts) == {"config", "model", "run_table"}
    assert wb["history"][-1]["per_class/test/_type"] == "table-file"
    assert artifacts["config"][1] == ["config.yaml"]
    checkpoint_files = sorted(str(p.relative_to(tmp_path / "checkpoints" / "60"))
                              for p in (tmp_path / "checkpoints" / "60").rglob("*") if p.is_file())
    assert artifacts["model"][1] == checkpoint_files
    folder = next((tmp_path / "wandb").glob("offline-run-*"))
    assert f"upload it with: wandb sync {folder}" in result.stdout + result.stderr
    # The console, as the run printed it, and system metrics go to W&B as well.
    assert "compiled the training step in" in (folder / "files" / "output.log").read_text()
    assert wb["stats"] and any("memory" in key for key in wb["stats"][0])

    # The same command again finds the run complete: nothing is retrained or overwritten.
    before = {f: (tmp_path / f).read_text() for f in ("metrics.jsonl", "summary.json")}
    again = run_cli(["train", *args, f"hydra.run.dir={tmp_path}"], cwd=tmp_path,
                    data_dir=fashion_dir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert before == {f: (tmp_path / f).read_text() for f in before}


def load_params(run_dir: Path, step: int) -> dict:
    restored = saved_state(run_dir / "checkpoints" / str(step))
    return restored


def flat(tree: dict) -> dict[str, np.ndarray]:
    import jax

    return {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_sigkill_and_resume_ends_with_identical_parameters(fashion_dir, tmp_path):
    args = with_overrides(TINY, train__steps=160, train__log_every=10, checkpoint__every=20,
                          checkpoint__keep=20)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    result = run_cli(["train", *args, "logger.mode=disabled", f"hydra.run.dir={straight}"],
                     cwd=tmp_path, data_dir=fashion_dir)
    assert result.returncode == 0, result.stderr[-3000:]

    # Its own W&B service, as a user's run has: a service shared with this process would keep
    # the killed run's id "in use".
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_SERVICE")}
    env["TFDS_DATA_DIR"] = str(fashion_dir)
    command = [sys.executable, "-m", "cnnlab.cli", "train", *args, f"hydra.run.dir={killed}"]
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "40").is_dir():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["status"] == "running"  # killed: nothing had a chance to clean up
    interrupted_at = max(int(p.name) for p in (killed / "checkpoints").iterdir()
                         if p.name.isdigit())
    assert interrupted_at < 160

    result = run_cli(["train", *args, f"hydra.run.dir={killed}"], cwd=tmp_path,
                     data_dir=fashion_dir, fresh_process=True)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["resumed_from"] == interrupted_at

    a, b = flat(load_params(straight, 160)), flat(load_params(killed, 160))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)  # bitwise, not allclose

    # The local log has every step once, with the values of the uninterrupted run.
    straight_events, killed_events = (read_jsonl(d / "metrics.jsonl") for d in (straight, killed))
    assert [e["step"] for e in killed_events] == [e["step"] for e in straight_events]
    for x, y in zip(straight_events, killed_events, strict=True):
        assert x["train/loss"] == y["train/loss"] and x["train/error"] == y["train/error"]

    # W&B keeps one run id; the resumed part continues after the checkpoint.
    wb = wandb_run_contents(killed)
    assert len({f.stem for f in wb["files"]}) == 1
    assert wb["history"][-1]["_step"] == 160


def test_multirun_of_two_configs_shares_a_group(fashion_dir, tmp_path):
    args = with_overrides(TINY, train__steps=10, train__log_every=5)
    result = run_cli(["train", "-m", *[a for a in args if not a.startswith("model=")],
                      "model=resnet20,plain20", f"hydra.sweep.dir={tmp_path}"],
                     cwd=tmp_path, data_dir=fashion_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(p for p in tmp_path.iterdir() if (p / "summary.json").exists())
    assert len(runs) == 2
    summaries = [json.loads((r / "summary.json").read_text()) for r in runs]
    assert {s["model"] for s in summaries} == {"resnet8", "plain8"}
    assert all(s["status"] == "finished" for s in summaries)
    groups = [wandb_run_contents(r)["groups"] for r in runs]
    assert groups[0] == groups[1] and len(groups[0]) == 1 and next(iter(groups[0]))


def test_cifar10_code_path_on_mock_data(mock_tfds, tmp_path):
    """CIFAR cannot be downloaded here: TFDS's own mock serves the same data_source path."""
    cfg = compose_config(with_overrides(TINY, dataset="cifar10", train__steps=10,
                                        train__log_every=5, logger__mode="disabled"))
    with mock_tfds(num_examples=96):
        summary = train(cfg, tmp_path)
    assert summary["status"] == "finished" and summary["dataset"] == "cifar10"
    assert OmegaConf.select(cfg, "augment.crop_pad") == 4
    # 3 input channels: the stem has 3x3x3x4 weights.
    assert summary["params"] == 4934 + 9 * 4 * 2


def test_missing_dataset_says_what_to_do(tmp_path):
    empty = tmp_path / "tfds"
    empty.mkdir()
    result = run_cli(["train", "dataset=cifar10", f"dataset.data_dir={empty}",
                      "dataset.download=false", f"hydra.run.dir={tmp_path / 'run'}"],
                     cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr
    assert "cifar10" in line and str(empty) in line


@pytest.mark.parametrize("bad", ["train.batch_size=100000"])
def test_batch_larger_than_dataset_is_a_config_error(fashion_dir, tmp_path, bad):
    result = run_cli(["train", *TINY, bad, f"hydra.run.dir={tmp_path}"], cwd=tmp_path,
                     data_dir=fashion_dir, timeout=120)
    assert result.returncode == 2
    assert "train.batch_size=100000 exceeds" in result.stderr.strip().splitlines()[-1]


def test_a_diverged_run_says_diverged_once(tmp_path, capsys):
    from cnnlab.cli import app
    from cnnlab.runs.rundir import RunDir

    summary = {"status": "diverged", "failure": "diverged: train/loss reached inf by step 3"}
    with pytest.raises(SystemExit) as info:
        app._report_end(summary, RunDir(tmp_path), multirun=False)
    assert info.value.code == 1
    assert capsys.readouterr().err == (
        f"cnnlab: run diverged: train/loss reached inf by step 3; run directory: {tmp_path}\n")


def test_tfds_opencv_advice_is_not_repeated_but_other_warnings_are(caplog):
    import logging

    from cnnlab.cli.app import quiet_library_logs

    quiet_library_logs()
    quiet_library_logs()  # idempotent: one filter
    absl = logging.getLogger("absl")
    with caplog.at_level(logging.WARNING):
        absl.warning("OpenCV is not installed. We recommend using OpenCV because it is faster")
        absl.warning("Variant folder X has no dataset_info.json")
    assert [r.getMessage() for r in caplog.records] == ["Variant folder X has no dataset_info.json"]
