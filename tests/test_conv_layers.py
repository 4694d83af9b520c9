"""benchmarks/conv_layers.py's timing: interleaved rounds whose order reverses, best of each."""

import numpy as np
import pytest

from benchmarks import conv_layers, suite


def test_the_order_reverses_each_round_so_no_name_always_follows_the_same_one():
    orders = suite.alternating_orders(["lax", "cnnlab", "torch"], 4)
    assert orders == [["lax", "cnnlab", "torch"], ["torch", "cnnlab", "lax"]] * 2
    sequence = [name for order in orders for name in order]
    for name in ("lax", "cnnlab", "torch"):
        before = {sequence[i - 1] for i in range(1, len(sequence)) if sequence[i] == name}
        assert before - {name} and len(before) >= 2, (name, before)


def test_a_call_slowed_by_the_one_before_it_still_gets_its_clean_time(monkeypatch):
    """A simulated clock: every call takes 1 s, 3 s right after `torch` (PyTorch's threads
    still busy). With the order fixed, `cnnlab` (always after `torch`) would keep 3 s."""
    log: list[str] = []

    def call(name: str):
        return lambda: log.append(name) or (3.0 if len(log) > 1 and log[-2] == "torch" else 1.0)

    monkeypatch.setattr(conv_layers, "_time", lambda c: c())
    table = {"lax": call("lax"), "torch": call("torch"), "cnnlab": call("cnnlab")}
    best = conv_layers.best_times({"forward": table}, reps=2)
    assert best == {"forward": {"lax": 1.0, "torch": 1.0, "cnnlab": 1.0}}
    # One untimed call each first (compiling), then the two rounds, the second reversed.
    assert log == ["lax", "torch", "cnnlab", "lax", "torch", "cnnlab", "cnnlab", "torch", "lax"]


def test_time_layer_times_every_pass_of_each_implementation_it_is_given():
    shape = ((2, 6, 6, 3), (3, 3, 3, 4), (1, 1), ((1, 1), (1, 1)))
    impls = conv_layers.jax_impls(["lax", "cnnlab"])
    best = conv_layers.time_layer(shape, impls, with_torch=False, reps=2)
    assert set(best) == set(conv_layers.PASSES)
    for times in best.values():
        assert set(times) == {"lax", "cnnlab"}
        assert all(np.isfinite(t) and t > 0 for t in times.values())


@pytest.mark.parametrize("bad", ["0", "-1", "two"])
def test_reps_must_be_a_whole_number_of_at_least_one(bad, capsys):
    with pytest.raises(SystemExit) as stop:
        conv_layers.main(["--reps", bad])
    assert stop.value.code == 2
    assert f"got {bad!r}" in capsys.readouterr().err
