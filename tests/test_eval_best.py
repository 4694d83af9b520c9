"""`cnnlab eval RUN eval.weights=best` on a run trained with a validation split: the weights it
evaluates are those of the step with the lowest logged validation error, and its test error is
the one the run logged at that step (the same weights on the same test split).

The run: tests/test_faults.py's tiny ResNet-8 with 256 of its 1,024 training images held out,
evaluated every 5 of 20 steps, at a learning rate high enough that its validation error does not
fall at every evaluation (so the best step is not simply the last).
"""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from cnnlab.runs.rundir import BEST as BEST_FOLDER
from tests.helpers import run_cli, saved_state, train_tiny
from tests.test_faults import FAULTS, _events, _params

BEST = [*FAULTS, "dataset.val_size=256", "train.eval_every=5", "optimizer.lr=0.5"]


@pytest.fixture(scope="module")
def run_with_val(tmp_path_factory, fashion_dir) -> Path:
    run_dir = tmp_path_factory.mktemp("best") / "run"
    assert train_tiny(run_dir, fashion_dir, BEST)["status"] == "finished"
    return run_dir


def _evaluate(run_dir: Path, weights: str, tmp_path: Path, fashion_dir: Path) -> dict:
    result = run_cli(["eval", str(run_dir), f"eval.weights={weights}", "eval.format=json"],
                     cwd=tmp_path, data_dir=fashion_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["weights"] == weights and len(report["members"]) == 1
    return report["members"][0]


def test_eval_weights_best_evaluates_the_best_validation_steps_weights(
        run_with_val, tmp_path, fashion_dir):
    evaluated = [e for e in _events(run_with_val) if "val/error" in e]
    assert [e["step"] for e in evaluated] == [5, 10, 15, 20]
    # The first evaluation with the lowest validation error (a later tie is no improvement).
    best = min(evaluated, key=lambda e: (e["val/error"], e["step"]))
    assert best["step"] != 20, "the run's validation error fell at every evaluation"
    summary = json.loads((run_with_val / "summary.json").read_text())
    assert summary["selected/step"] == best["step"]
    assert summary["selected/val/error"] == best["val/error"]

    member = _evaluate(run_with_val, "best", tmp_path, fashion_dir)
    assert member["step"] == best["step"]
    assert member["error"] == pytest.approx(best["test/error"], abs=1e-9)
    # best/ holds the very weights of the regular checkpoint of that step.
    kept = saved_state(run_with_val / BEST_FOLDER / str(best["step"]))
    for a, b in zip(_params(run_with_val, best["step"]), jax.tree.leaves(kept["params"]),
                    strict=True):
        np.testing.assert_array_equal(a, b)

    final = _evaluate(run_with_val, "final", tmp_path, fashion_dir)
    last = evaluated[-1]
    assert final["step"] == 20
    assert final["error"] == pytest.approx(last["test/error"], abs=1e-9)
    assert final["error"] != member["error"] or last["val/error"] == best["val/error"]
