"""Reduce-on-plateau and early stopping: the rules by hand, against PyTorch, and in real runs."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnlab.cli.preflight import validate
from cnnlab.errors import ConfigError
from cnnlab.training.loop import train
from cnnlab.training.selection import EarlyStopping, Plateau
from tests.helpers import TINY, compose_config, saved_state
from tests.test_train import flat, load_params, read_jsonl, with_overrides

# Validation errors in percent; each row: (values, patience, threshold, max_reductions,
# the indices of the evaluations that reduce, written out by hand from the rule).
PLATEAU_CASES = [
    # patience 2: the third stalled evaluation in a row reduces, then the count restarts.
    ([50, 40, 40, 41, 40.5, 39, 39, 39, 39, 39, 39], 2, 0.0, 3, [4, 8]),
    # patience 0: every evaluation that does not improve reduces, up to max_reductions.
    ([10, 11, 12, 9, 9, 9, 9], 0, 0.0, 3, [1, 2, 4]),
    # An improvement smaller than the threshold (absolute) counts as stalled.
    ([10, 9.5, 9.45, 8.0, 7.9, 7.8], 1, 0.6, 5, [2, 5]),
    # max_reductions 0: never.
    ([1, 2, 3, 4], 0, 0.0, 0, []),
]


@pytest.mark.parametrize("values,patience,threshold,max_reductions,expected", PLATEAU_CASES)
def test_plateau_reduces_exactly_when_the_rule_says(values, patience, threshold,
                                                    max_reductions, expected):
    plateau = Plateau(0.1, patience, threshold, max_reductions)
    reduced = [i for i, v in enumerate(values) if plateau.observe(v)]
    assert reduced == expected
    assert plateau.scale == pytest.approx(0.1 ** len(expected))


@pytest.mark.parametrize("values,patience,threshold,max_reductions,expected", PLATEAU_CASES)
def test_plateau_matches_torch_reduce_lr_on_plateau(values, patience, threshold,
                                                    max_reductions, expected):
    torch = pytest.importorskip("torch")
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    # torch has no cap on the number of reductions: min_lr stops it after max_reductions.
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="min", factor=0.1, patience=patience, threshold=threshold,
        threshold_mode="abs", cooldown=0, min_lr=0.1 ** max_reductions * (1 - 1e-7))
    ours = Plateau(0.1, patience, threshold, max_reductions)
    for value in values:
        sched.step(value)
        ours.observe(value)
        assert ours.scale == pytest.approx(opt.param_groups[0]["lr"], rel=1e-3)


def test_plateau_state_round_trips_through_json():
    a = Plateau(0.1, 1, 0.0, 3)
    for v in (5.0, 6.0, 7.0, 4.0, 4.0):
        a.observe(v)
    b = Plateau(0.1, 1, 0.0, 3)
    b.load(json.loads(json.dumps(a.state())))
    for v in (4.0, 4.0, 3.0, 3.0, 3.0):
        assert a.observe(v) == b.observe(v)
    assert a.state() == b.state()
    fresh = Plateau(0.1, 1, 0.0, 3)
    fresh.load(json.loads(json.dumps(fresh.state())))  # inf best stored as null
    assert fresh.best == float("inf")


def test_early_stopping_stops_after_patience_stalled_evaluations():
    stopping = EarlyStopping(patience=3)
    decisions = [stopping.observe(step, v) for step, v in
                 zip(range(10, 80, 10), [30, 20, 25, 20, 19, 19, 19], strict=True)]
    assert [d[0] for d in decisions] == [True, True, False, False, True, False, False]
    assert [d[1] for d in decisions] == [False] * 7  # two stalls, then a new best, then two
    assert stopping.observe(80, 19) == (False, True)  # third evaluation without improvement
    assert (stopping.best, stopping.best_step) == (19, 50)
    never = EarlyStopping(patience=0)
    assert not any(never.observe(s, 1.0)[1] for s in range(100))


def test_lr_scale_multiplies_the_step_like_a_smaller_lr():
    """A state's lr_scale of 1/2 gives the same parameters as the optimizer with lr / 2,
    momentum and weight decay included (lr is the last factor of every update)."""
    from cnnlab.data.augment.pipeline import make_augment
    from cnnlab.data.device import DeviceSplit
    from cnnlab.data.preprocess import PreprocessStats
    from cnnlab.models import build_model
    from cnnlab.training.build import init_state
    from cnnlab.training.optim import make_optimizer, make_schedule
    from cnnlab.training.steps import make_train_step

    cfg = compose_config(with_overrides(TINY, optimizer="momentum", augment="none"))
    rng = np.random.default_rng(0)
    data = DeviceSplit(images=rng.integers(0, 256, (64, 28, 28, 1), dtype=np.uint8),
                       labels=rng.integers(0, 10, 64).astype(np.int32), mask=np.ones(64, bool),
                       stats=PreprocessStats(mean=np.float32([0.3]), std=np.float32([0.3])))
    model = build_model(cfg, 10)

    def run(lr: float, scale: float) -> dict:
        tx = make_optimizer(cfg.optimizer, make_schedule(cfg.schedule, lr, 100))
        step = jax.jit(make_train_step(model, tx, make_augment(cfg.augment), 16,
                                       cfg.regularization, scale_lr=True))
        state = init_state(cfg, model, tx, (28, 28, 1))
        state = state.replace(lr_scale=jnp.asarray(scale, jnp.float32))
        for _ in range(3):
            state, _ = step(state, data)
        return flat(state.params)

    halved, scaled, full = run(0.05, 1.0), run(0.1, 0.5), run(0.1, 1.0)
    for key in halved:
        np.testing.assert_allclose(scaled[key], halved[key], rtol=1e-5, atol=1e-7, err_msg=key)
    assert any(not np.allclose(full[k], halved[k]) for k in full)


SELECTION_RUN = with_overrides(TINY, dataset__val_size=256, train__steps=20,
                               train__log_every=5, train__eval_every=5, checkpoint__every=5,
                               checkpoint__keep=10, logger__mode="disabled")


def test_plateau_run_logs_the_reduced_lr_and_resumes_identically(fashion_dir, tmp_path):
    # threshold 100 (percent): no evaluation after the first counts as an improvement, so with
    # patience 0 the evaluations at steps 10 and 15 reduce, and max_reductions stops the third.
    args = with_overrides(SELECTION_RUN, schedule="plateau", schedule__patience=0,
                          schedule__threshold=100, schedule__max_reductions=2,
                          early_stopping__keep_best=False)
    cfg = compose_config(args + [f"dataset.data_dir={fashion_dir}"])
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(cfg, straight)
    events = read_jsonl(straight / "metrics.jsonl")
    assert [(e["step"], e["lr"]) for e in events] == [
        (5, 0.1), (10, 0.1), (15, pytest.approx(0.01)), (20, pytest.approx(0.001))]

    # Interrupted after step 10 (its checkpoint kept, later ones lost): the resumed run
    # restores the plateau's counters and ends with the same parameters.
    shutil.copytree(straight, resumed)
    for step in ("15", "20"):
        shutil.rmtree(resumed / "checkpoints" / step)
    (resumed / "summary.json").unlink()
    summary = train(cfg, resumed)
    assert summary["resumed_from"] == 10
    a, b = flat(load_params(straight, 20)), flat(load_params(resumed, 20))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_early_stopping_keeps_the_best_checkpoint_and_stays_stopped(fashion_dir, tmp_path):
    # lr 1e-12 and no batch norm: the weights cannot move (below float32's resolution), so the
    # validation error never improves after the first evaluation and patience 2 stops at 15.
    args = with_overrides(SELECTION_RUN, norm="none", optimizer="sgd", optimizer__lr=1e-12,
                          early_stopping__patience=2)
    cfg = compose_config(args + [f"dataset.data_dir={fashion_dir}"])
    summary = train(cfg, tmp_path)
    assert summary["status"] == "finished"
    assert summary["early_stopped_at"] == 15 and summary["final_step"] == 15
    assert summary["selected/step"] == 5
    events = read_jsonl(tmp_path / "metrics.jsonl")
    assert [e["step"] for e in events] == [5, 10, 15]
    assert summary["selected/val/error"] == events[0]["val/error"]
    assert summary["selected/test/error"] == events[0]["test/error"]
    assert sorted(p.name for p in (tmp_path / "best").iterdir() if p.name.isdigit()) == ["5"]
    # The kept weights are the state of step 5, as the rolling checkpoint of that step has it.
    rolling, kept = flat(load_params(tmp_path, 5)), flat(_restore_best(tmp_path, 5))
    assert rolling.keys() == kept.keys()
    for key in rolling:
        np.testing.assert_array_equal(rolling[key], kept[key], err_msg=key)

    # Running the same command again finds the run stopped and trains nothing.
    before = (tmp_path / "metrics.jsonl").read_text()
    again = train(cfg, tmp_path)
    assert again["early_stopped_at"] == 15 and (tmp_path / "metrics.jsonl").read_text() == before


def _restore_best(run_dir, step: int) -> dict:
    return saved_state(run_dir / "best" / str(step))


@pytest.mark.parametrize("overrides,message", [
    (["schedule=plateau"], "dataset.val_size > 0"),
    (["schedule=plateau", "dataset.val_size=100", "train.eval_every=0"], "train.eval_every"),
    (["schedule=plateau", "dataset.val_size=100", "schedule.metric=test/error"],
     "valid choices: val/error, val/loss"),
    (["schedule=plateau", "dataset.val_size=100", "schedule.factor=1.5"], "schedule.factor"),
    (["early_stopping.patience=3"], "dataset.val_size > 0"),
    (["early_stopping.patience=-1"], "early_stopping.patience=-1"),
    (["early_stopping.metric=train/loss"], "early_stopping.metric='train/loss'"),
])
def test_selection_config_errors_are_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as error:
        validate(compose_config(overrides))
    assert "\n" not in str(error.value)
