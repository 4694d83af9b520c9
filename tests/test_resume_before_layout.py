"""A run directory written before cnnlab's modules moved into folders resumes with today's code.

tests/data/run_before_layout was made by cnnlab at commit 951eef9 (the flat package) with the
faults tests' tiny run (`cnnlab train TINY FAULTS logger.mode=disabled`, the tests' XLA flags),
stopped by SIGTERM after step 10 and so checkpointed at step 15; only that checkpoint is kept.
"""

import json
import shutil
from pathlib import Path

import jax
import numpy as np

from tests.helpers import REPO, saved_state, train_tiny
from tests.test_faults import CLI, FAULTS

BEFORE = REPO / "tests" / "data" / "run_before_layout"


def _params(run_dir: Path, step: int) -> list[np.ndarray]:
    state = saved_state(run_dir / "checkpoints" / str(step))
    return [np.asarray(x) for x in jax.tree.leaves(state["params"])]


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(e["step"], e["train/loss"]) for e in events if "train/loss" in e]


def test_a_run_written_before_the_layout_change_resumes_to_the_straight_runs_end(
        tmp_path, fashion_dir):
    from tests.helpers import run_cli

    run_dir = Path(shutil.copytree(BEFORE, tmp_path / "run"))
    assert json.loads((run_dir / "summary.json").read_text())["final_step"] == 15
    result = run_cli(["train", *CLI, f"hydra.run.dir={run_dir}"], cwd=tmp_path,
                     data_dir=fashion_dir)
    assert result.returncode == 0, result.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["resumed_from"] == 15
    straight = tmp_path / "straight"
    assert train_tiny(straight, fashion_dir, FAULTS)["status"] == "finished"
    for a, b in zip(_params(straight, 20), _params(run_dir, 20), strict=True):
        np.testing.assert_array_equal(a, b)
    assert _losses(run_dir) == _losses(straight)  # steps 5-15 from before, 20 from today
