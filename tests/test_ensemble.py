"""`cnnlab eval` (cnnlab/training/ensemble.py) on real runs: final, best, EMA and snapshot weights,
ensembles, and the one-line errors; the EMA of a real run's trajectory by hand."""

import csv
import json
import math
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from omegaconf import OmegaConf

from cnnlab.cli import main as cli
from cnnlab.config import load as config_load
from cnnlab.data.device import device_split
from cnnlab.models import build_model
from cnnlab.runs.weights import ema_variables
from cnnlab.training import steps
from tests.helpers import run_cli, saved_state, train_tiny
from tests.test_evaluate import plain_softmax

# 4 steps of one step per compiled chunk (the fastest to compile), a checkpoint after each, so
# the parameter trajectory is on disk: with cyclic_cosine, 2 cycles of 2 steps.
STEPS = 4
RUN = [f"train.steps={STEPS}", "train.steps_per_call=1", "train.log_every=2",
       "checkpoint.every=1", f"checkpoint.keep={STEPS}"]
EMA_DECAY = 0.5


def _train_run(run_dir: Path, data_dir: Path, overrides: list[str]) -> None:
    assert train_tiny(run_dir, data_dir, [*RUN, *overrides])["status"] == "finished"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, fashion_dir):
    """Two TINY runs of different seeds; the first with EMA weights and 2 cosine cycles."""
    root = tmp_path_factory.mktemp("runs")
    _train_run(root / "a", fashion_dir, ["seed=0", f"eval.ema_decay={EMA_DECAY}",
                                         "schedule=cyclic_cosine", "schedule.cycles=2"])
    _train_run(root / "b", fashion_dir, ["seed=1"])
    return root / "a", root / "b"


def _restore(run_dir: Path, step: int, folder: str = "checkpoints") -> dict:
    """A saved state as Orbax wrote it (nested dicts), without cnnlab's restore code."""
    return saved_state(run_dir / folder / str(step))


def test_ema_of_a_real_run_is_the_bias_corrected_recurrence_over_its_trajectory(runs):
    run_a, _ = runs
    trajectory = [_restore(run_a, t) for t in range(1, STEPS + 1)]
    d = EMA_DECAY
    # By hand: m_0 = 0, m_t = d m_{t-1} + (1 - d) w_t over the weights and BN statistics after
    # each step, reported as m_k / (1 - d^k) (Kingma & Ba 2015, sec. 7.2).
    leaves = [jax.tree.leaves({"batch_stats": s["batch_stats"], "params": s["params"]})
              for s in trajectory]
    m = [np.zeros(np.shape(x), np.float64) for x in leaves[0]]
    for w_t in leaves:
        m = [d * a + (1 - d) * np.asarray(x, np.float64) for a, x in zip(m, w_t, strict=True)]
    expected = [a / (1 - d ** STEPS) for a in m]

    final = trajectory[-1]
    assert int(final["ema"]["count"]) == STEPS
    ema = steps.ema_transform(d).init({"params": final["params"],
                                       "batch_stats": final["batch_stats"]})
    ema = ema._replace(count=jnp.asarray(final["ema"]["count"]), ema=final["ema"]["ema"])
    params, batch_stats = ema_variables(ema, d)
    got = jax.tree.leaves({"batch_stats": batch_stats, "params": params})
    assert len(got) == len(expected) == len(leaves[-1])
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_allclose(np.asarray(a), b, rtol=2e-5, atol=1e-6)
    # Not merely the last weights: the average differs from them.
    assert max(np.max(np.abs(np.asarray(a) - np.asarray(b)))
               for a, b in zip(got, leaves[-1], strict=True)) > 1e-4


_DATASETS: dict[str, object] = {}


def _dataset(cfg: OmegaConf) -> object:
    """The run's dataset, read once for runs that share the dataset and preprocessing configs."""
    from cnnlab.training.build import load_data

    key = OmegaConf.to_yaml({"dataset": cfg.dataset, "preprocess": cfg.preprocess})
    if key not in _DATASETS:
        _DATASETS[key] = load_data(cfg)
    return _DATASETS[key]


def _hand_flip_probs(run_dir: Path, step: int) -> tuple[np.ndarray, np.ndarray]:
    """A run's flip-TTA probabilities from its raw checkpoint files: the mean of the softmaxes
    on the test images and on their mirror images; and the labels."""

    cfg = config_load.load_run_config(run_dir)
    dataset = _dataset(cfg)
    state = _restore(run_dir, step)
    model = build_model(cfg, dataset.num_classes)
    split = device_split(dataset.test, dataset.preprocess)
    images = dataset.test.images
    softmax = plain_softmax(model, state["params"], state["batch_stats"], split)
    probs = (softmax(images) + softmax(images[:, :, ::-1])) / 2
    return probs, dataset.test.labels


def test_cnnlab_eval_flip_ensemble_matches_numpy(runs, fashion_dir, tmp_path):
    out, folder = tmp_path / "eval.json", tmp_path / "confusion"
    result = run_cli(["eval", *map(str, runs), "eval.tta=flip", "eval.format=json",
                      f"eval.output={out}", f"eval.confusion_dir={folder}"], cwd=tmp_path,
                     data_dir=fashion_dir, fresh_process=True)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report == json.loads(out.read_text())
    assert (report["tta"], report["examples"], len(report["members"])) == ("flip", 1024, 2)

    member_probs, labels = [], None
    for run_dir, member in zip(runs, report["members"], strict=True):
        assert member["step"] == STEPS and member["weights"] == "final"
        probs, labels = _hand_flip_probs(run_dir, STEPS)
        member_probs.append(probs)
        assert member["error"] == pytest.approx(100 * np.mean(probs.argmax(1) != labels))
        assert member["top5_error"] == pytest.approx(_top5_error(probs, labels))
    mean = np.mean(member_probs, axis=0)
    ensemble = report["ensemble"]
    assert ensemble["members"] == 2
    assert ensemble["error"] == pytest.approx(100 * np.mean(mean.argmax(1) != labels))
    assert ensemble["loss"] == pytest.approx(
        -np.mean(np.log(mean[np.arange(len(labels)), labels])), rel=1e-4)
    assert report["top_k"] == 5
    assert ensemble["top5_error"] == pytest.approx(_top5_error(mean, labels))
    assert 0 < ensemble["top5_error"] < ensemble["error"]
    # The ensemble's confusion matrix and per-class errors, from its averaged softmax.
    expected = np.zeros((10, 10), int)
    np.add.at(expected, (labels, mean.argmax(1)), 1)
    table = list(csv.reader((folder / "confusion_test.csv").open()))
    assert table[0][1] == "T-shirt/top"
    np.testing.assert_array_equal([[int(c) for c in row[1:]] for row in table[1:]], expected)
    per_class = 100 * (1 - np.diag(expected) / expected.sum(1))
    np.testing.assert_allclose(ensemble["per_class_error"], per_class, atol=1e-9)
    assert (folder / "confusion_test.png").is_file() and (folder / "per_class_test.csv").is_file()


def _top5_error(probs: np.ndarray, labels: np.ndarray) -> float:
    """Top-5 by a stable sort of the probabilities (ties: the lower class first, as argmax)."""
    top5 = np.argsort(-probs, axis=1, kind="stable")[:, :5]
    return 100 * float(np.mean(~np.any(top5 == labels[:, None], axis=1)))


def test_snapshots_and_ema_weights_of_a_real_run(runs, capsys):
    run_a, _ = runs
    # 4 steps in 2 cycles: a snapshot at the end of each, beside the rotated checkpoints.
    assert sorted(p.name for p in (run_a / "snapshots").iterdir()) == ["2", "4"]
    events = [json.loads(line) for line in (run_a / "metrics.jsonl").read_text().splitlines()]
    # Logged at step 2: the lr of the cycle's last step, t = 1 of 2: lr0 / 2.
    assert events[0]["lr"] == pytest.approx(0.1 / 2 * (math.cos(math.pi * 1 / 2) + 1))
    # The last snapshot is the final state.
    for a, b in zip(jax.tree.leaves(_restore(run_a, 4, "snapshots")["params"]),
                    jax.tree.leaves(_restore(run_a, 4)["params"]), strict=True):
        np.testing.assert_array_equal(a, b)
    final = events[-1]
    assert {"test/error", "test_ema/error", "test_ema/loss"} <= final.keys()

    cli.main(["eval", str(run_a), "eval.weights=snapshots", "eval.format=json"])
    report = json.loads(capsys.readouterr().out)
    assert [m["step"] for m in report["members"]] == [2, 4]
    assert report["members"][1]["error"] == pytest.approx(final["test/error"])
    assert report["ensemble"]["members"] == 2

    cli.main(["eval", str(run_a), "eval.weights=ema"])
    table = capsys.readouterr().out
    row = next(line for line in table.splitlines() if line.startswith(str(run_a)))
    assert row.split()[1:5] == ["ema", str(STEPS), f"{final['test_ema/error']:.2f}",
                                f"{final['test_ema/top5_error']:.2f}"]
    assert "top-5 error %" in table
    assert "ensemble" not in table


def _eval_error(args: list[str], capsys: pytest.CaptureFixture) -> str:
    with pytest.raises(SystemExit) as info:
        cli.main(["eval", *args])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    # One line, after at most the lines that say what was read so far ("[12:00:01] loading").
    *progress, line = err.splitlines()
    assert line.startswith("cnnlab: error: ") and all(p.startswith("[") for p in progress)
    return line


def test_cnnlab_eval_refuses_bad_input_with_one_line(runs, tmp_path, capsys):
    run_a, run_b = runs
    assert "not a cnnlab run directory" in _eval_error([str(tmp_path)], capsys)
    assert "no best checkpoint" in _eval_error([str(run_b), "eval.weights=best"], capsys)
    assert "without eval.ema_decay" in _eval_error([str(run_b), "eval.weights=ema"], capsys)
    assert "no snapshots" in _eval_error([str(run_b), "eval.weights=snapshots"], capsys)
    assert "eval.tta='sideways'" in _eval_error([str(run_a), "eval.tta=sideways"], capsys)
    assert "eval.* overrides only" in _eval_error([str(run_a), "model=resnet56"], capsys)
    assert "eval.format=json" in _eval_error([str(run_a), "--json"], capsys)
    # Another test set (fewer examples) cannot join the ensemble.
    other = tmp_path / "other"
    shutil.copytree(run_b, other)
    cfg = OmegaConf.load(other / ".hydra" / "config.yaml")
    cfg.dataset.max_examples = 512
    OmegaConf.save(cfg, other / ".hydra" / "config.yaml")
    assert "do not share a test set" in _eval_error([str(run_a), str(other)], capsys)
