"""The chunk loop off the host's back (cnnlab/training/loop.py, cnnlab/data/order.py): the step
count kept on the host, one permutation per epoch with the batches of `batch_indices`, and the
scan rolled on GPU/TPU."""

import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnlab.data.device import DeviceSplit, batch_indices
from cnnlab.data.order import EpochOrders, OrderedSplit, epochs_spanned
from cnnlab.data.preprocess import PreprocessStats
from cnnlab.training import loop, steps
from cnnlab.training.build import Run
from tests.helpers import train_tiny
from tests.test_faults import FAULTS, _events, _params, _signal_at


def test_epochs_spanned_is_the_most_epochs_any_window_touches():
    for per_epoch in (1, 2, 3, 6, 10):
        for length in range(1, 25):
            most = max(len({s // per_epoch for s in range(start, start + length)})
                       for start in range(3 * per_epoch))
            assert epochs_spanned(length, per_epoch) == most, (per_epoch, length)


@pytest.mark.parametrize("per_call", [1, 4, 7, 13])
def test_chunks_get_the_batches_of_batch_indices_with_one_draw_per_epoch(per_call):
    n, batch = 50, 8  # 6 steps per epoch, 2 examples left over
    key = jax.random.PRNGKey(3)
    # The labels are the example indices, so a batch's labels are its indices.
    split = DeviceSplit(images=jnp.zeros((n, 1, 1, 1), jnp.uint8),
                        labels=jnp.arange(n, dtype=jnp.int32), mask=jnp.ones(n, bool),
                        stats=PreprocessStats())
    orders = EpochOrders(key, n, batch)
    pick = jax.jit(lambda data, step: data.batch(step, batch)[1])
    wanted = set()
    for start in range(0, 40, per_call):
        data = orders(split, start, per_call)
        assert isinstance(data, OrderedSplit)
        wanted.update(int(data.first) + i for i in range(len(data.orders)))
        for step in range(start, start + per_call):
            np.testing.assert_array_equal(pick(data, jnp.int32(step)),
                                          batch_indices(key, jnp.int32(step), n, batch))
    # Each epoch drawn once, at most one ahead of the last step trained.
    assert orders.draws == len(wanted) <= (step // 6 + 1) + 1


def _tiny_step(state: steps.TrainState, data: dict) -> tuple:
    return state.replace(step=state.step + 1), {**steps.zero_metrics(),
                                                "loss_sum": data["x"].sum()}


def _tiny_state() -> steps.TrainState:
    return steps.TrainState(step=jnp.int32(0), params={}, batch_stats={}, opt_state=(),
                            rng=jax.random.PRNGKey(0))


@pytest.mark.parametrize(("platform", "rolled"),
                         [("cpu", False), ("gpu", True), ("cuda", True), ("tpu", True)])
def test_the_chunk_is_unrolled_on_cpu_only_as_its_devices_say(platform, rolled):
    """Traced for devices of `platform` (`cnnlab compile`'s targets: only their platform is
    asked), the chunk is a rolled loop off CPU; outside, this process's CPU devices decide."""
    from types import SimpleNamespace

    from cnnlab import parallel

    chunk = steps.make_train_chunk(_tiny_step)
    with parallel.compiling_for([SimpleNamespace(platform=platform)]):
        assert parallel.platform() == ("gpu" if platform == "cuda" else platform)
        text = chunk.lower(_tiny_state(), {"x": jnp.ones(3)}, num_steps=4).as_text()
    assert ("stablehlo.while" in text) == rolled
    assert parallel.platform() == "cpu"


def test_dispatching_a_chunk_reads_nothing_back_from_the_device(fashion_dir):
    """The host counts the steps: dispatching chunks after the first (compiled) one moves no
    array from the device to the host (reading `state.step` used to, which waits for the
    previous chunk to finish)."""
    from cnnlab.cli import preflight
    from cnnlab.progress import CompileTimer
    from cnnlab.training.build import build
    from tests.helpers import TINY

    cfg = preflight.compose([*TINY, "logger.mode=disabled", f"dataset.data_dir={fashion_dir}"])
    run: Run = build(cfg)
    compiles = CompileTimer()
    state, _ = loop._chunk(run, run.state, 0, 5, compiles)
    with jax.transfer_guard_device_to_host("disallow"):
        for step in (5, 10, 15):
            state, sums = loop._chunk(run, state, step, 5, compiles)
    assert int(state.step) == 20 and int(sums["count"]) == 5 * cfg.train.batch_size


MID_EPOCH = [*FAULTS, "dataset.max_examples=256"]  # 8 steps per epoch, chunks of 5


def _straight_and_resumed_at_15(tmp_path, fashion_dir, monkeypatch, overrides):
    """Two runs of `overrides` (FAULTS: 20 steps in chunks of 5): straight, and one sent
    SIGTERM after step 10 (so stopped with a checkpoint at 15), then resumed to the end."""
    straight = tmp_path / "straight"
    assert train_tiny(straight, fashion_dir, overrides)["status"] == "finished"
    stopped = tmp_path / "stopped"
    with monkeypatch.context() as patch:
        _signal_at(patch, 10, signal.SIGTERM)
        assert train_tiny(stopped, fashion_dir, overrides)["status"] == "interrupted"
    summary = train_tiny(stopped, fashion_dir, overrides)
    assert summary["status"] == "finished" and summary["resumed_from"] == 15
    return straight, stopped


def test_a_run_resumed_mid_epoch_equals_the_straight_one_and_the_per_step_order(
        tmp_path, fashion_dir, monkeypatch):
    """Stopped at step 15 (epoch 1, its 8th step; the chunk 15-20 crosses into epoch 2): the
    resumed run ends as the uninterrupted one, and both as a run drawing each step's
    permutation (`batch_indices`, the order before epoch orders)."""
    straight, stopped = _straight_and_resumed_at_15(tmp_path, fashion_dir, monkeypatch, MID_EPOCH)
    per_step = tmp_path / "per_step"
    monkeypatch.setattr(Run, "chunk_data", lambda self, step, num_steps: self.train_data)
    assert train_tiny(per_step, fashion_dir, MID_EPOCH)["status"] == "finished"
    for other in (stopped, per_step):
        for a, b in zip(_params(straight, 20), _params(other, 20), strict=True):
            np.testing.assert_array_equal(a, b)
        assert ([(e["step"], e["train/loss"]) for e in _events(other)]
                == [(e["step"], e["train/loss"]) for e in _events(straight)])


def test_a_run_resumed_between_two_log_lines_logs_what_the_straight_one_does(
        tmp_path, fashion_dir, monkeypatch):
    """Logged every 10 steps, stopped at step 15 (a checkpoint between two log lines): the
    resumed run's step-20 line averages steps 11-20 as the uninterrupted run's does, not only
    the 5 steps after the checkpoint (the window's sums are saved with the checkpoint)."""
    straight, stopped = _straight_and_resumed_at_15(
        tmp_path, fashion_dir, monkeypatch, [*FAULTS, "train.log_every=10"])
    logged = [[(e["step"], e["train/loss"], e["train/error"]) for e in _events(run)
               if "train/loss" in e] for run in (straight, stopped)]
    assert [step for step, *_ in logged[0]] == [10, 20]
    assert logged[1] == logged[0]
