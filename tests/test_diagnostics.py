"""Training diagnostics (cnnlab/training/diagnostics.py): each figure against a direct computation,
and a
real run that logs them (or, off, does not, with the training chunk unchanged)."""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from cnnlab.cli.preflight import validate
from cnnlab.data.augment.pipeline import make_augment
from cnnlab.data.device import batch_indices
from cnnlab.data.preprocess import preprocess
from cnnlab.errors import ConfigError
from cnnlab.models.layers import Recorded
from cnnlab.training import diagnostics, steps
from tests.helpers import TINY, TinyStep, compose_config, tiny_step, train_tiny, wandb_run_contents

# SGD without momentum, weight decay or schedule: the applied update is exactly -lr * g.
SGD = ["optimizer=sgd", "optimizer.lr=0.05", "optimizer.weight_decay=0.0",
       "schedule=constant", "augment=none"]
BATCH = 16


def diagnose(s: TinyStep, state: steps.TrainState | None = None) -> dict:
    fn = diagnostics.make_diagnose(s.model, s.tx, make_augment(s.cfg.augment), BATCH)
    return jax.device_get(fn(s.state if state is None else state, s.data))


def per_layer_norms(tree: dict) -> dict[str, float]:
    """By hand, in float64: the norm of each module's parameters together."""
    squares: dict[str, float] = {}
    for path, leaf in traverse_util.flatten_dict(jax.device_get(tree)).items():
        name = ".".join(path[:-1])
        squares[name] = squares.get(name, 0.0) + float(np.sum(np.asarray(leaf, np.float64) ** 2))
    return {name: float(np.sqrt(total)) for name, total in squares.items()}


def next_batch(s: TinyStep, state: steps.TrainState) -> tuple[jax.Array, jax.Array]:
    """The batch the next step trains on (augment=none), preprocessed."""
    data_key, _ = jax.random.split(state.rng)
    idx = batch_indices(data_key, state.step, s.data.labels.shape[0], BATCH)
    return preprocess(s.data.images[idx], s.data.stats), s.data.labels[idx]


@pytest.fixture(scope="module")
def sgd() -> TinyStep:
    s = tiny_step(SGD)
    # A step in: the ratios of a trained state, not only of the initialization.
    chunk = steps.make_train_chunk(steps.make_train_step(s.model, s.tx,
                                                         make_augment(s.cfg.augment), BATCH))
    s.state, _ = chunk(s.state, s.data, 1)
    return s


def test_grad_norm_is_that_of_jax_grad_of_the_loss(sgd):
    x, labels = next_batch(sgd, sgd.state)

    def loss(params):
        logits, _ = sgd.model.apply({"params": params, "batch_stats": sgd.state.batch_stats}, x,
                                    train=True, mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    expected = per_layer_norms(jax.grad(loss)(sgd.state.params))
    got = diagnose(sgd)["grad_norm"]
    assert set(got) == set(expected) and "stage1_block1.conv1" in got and "head" in got
    for layer, value in expected.items():
        np.testing.assert_allclose(got[layer], value, rtol=2e-4, err_msg=layer)


def test_update_ratio_is_lr_times_update_over_weight_for_sgd(sgd):
    values = diagnose(sgd)
    weights = per_layer_norms(sgd.state.params)
    # By hand: plain SGD moves each layer by lr * g.
    for layer, grad_norm in values["grad_norm"].items():
        np.testing.assert_allclose(values["update_ratio"][layer],
                                   0.05 * grad_norm / weights[layer], rtol=1e-5, err_msg=layer)
    # And it is the update the next training step really applies.
    step = jax.jit(steps.make_train_step(sgd.model, sgd.tx, make_augment(sgd.cfg.augment), BATCH))
    after, _ = step(sgd.state, sgd.data)
    moved = per_layer_norms(jax.tree.map(jnp.subtract, after.params, sgd.state.params))
    for layer, norm in moved.items():
        np.testing.assert_allclose(values["update_ratio"][layer], norm / weights[layer],
                                   rtol=2e-3, err_msg=layer)


def _direct_stats(y: np.ndarray) -> dict[str, float]:
    y = np.asarray(y, np.float64)
    return {"act_mean": y.mean(), "act_std": y.std(),
            "dead_share": float(np.mean(np.all(y == 0, axis=0)))}


def test_activation_stats_and_dead_relus_match_a_direct_computation(sgd):
    # Kill every unit after stage1_block1's first norm: a bias far below any normalized input.
    params = traverse_util.flatten_dict(jax.device_get(sgd.state.params))
    bias = ("stage1_block1", "norm1", "BatchNorm_0", "bias")
    params[bias] = np.full_like(params[bias], -100.0)
    # And half of stage2_block1's first-norm channels.
    half = ("stage2_block1", "norm1", "BatchNorm_0", "bias")
    params[half] = np.where(np.arange(params[half].size) % 2 == 0, -100.0, 0.0).astype(np.float32)
    state = sgd.state.replace(params=traverse_util.unflatten_dict(params))
    values = diagnose(sgd, state)

    assert values["dead_share"]["stage1_block1.act1"] == 1.0
    assert values["act_mean"]["stage1_block1.act1"] == 0.0
    # Half the units, and those of the other half that no example of the batch activates.
    assert 0.5 <= values["dead_share"]["stage2_block1.act1"] < 0.6
    assert values["dead_share"]["stage3_block1.act1"] < 0.1
    # Directly: Flax captures module outputs; a block's output is its last activation, and
    # relu of its first norm's output its first.
    x, _ = next_batch(sgd, state)
    _, captured = sgd.model.apply({"params": state.params, "batch_stats": state.batch_stats}, x,
                                  train=True, capture_intermediates=True,
                                  mutable=["batch_stats", "intermediates"])
    for block in ("stage1_block1", "stage2_block1", "stage3_block1"):
        outputs = captured["intermediates"][block]
        for name, y in ((f"{block}.act2", outputs["__call__"][0]),
                        (f"{block}.act1", np.maximum(outputs["norm1"]["__call__"][0], 0))):
            for metric, value in _direct_stats(y).items():
                np.testing.assert_allclose(values[metric][name], value, rtol=1e-4, atol=1e-6,
                                           err_msg=f"{metric} {name}")
    # The stem's activation, applied by the model itself.
    assert set(values["act_mean"]) == {"act1", *(f"stage{i}_block1.act{k}"
                                                 for i in (1, 2, 3) for k in (1, 2))}


def test_off_the_training_chunk_is_unchanged():
    """The activation hook traces nothing into the step: its program equals one built from
    the bare activation."""
    s = tiny_step([])
    bare = s.model.clone(layers=dataclasses.replace(s.model.layers, act=s.model.layers.act.fn))
    assert isinstance(s.model.layers.act, Recorded)

    def lowered(model) -> str:
        chunk = steps.make_train_chunk(steps.make_train_step(model, s.tx,
                                                             make_augment(s.cfg.augment), BATCH))
        return chunk.lower(s.state, s.data, 2).as_text()

    assert lowered(s.model) == lowered(bare)
    # Off, the chunk keeps its length; on, it ends at every diagnostics step.
    assert compose_config(TINY).train.steps_per_call == 5
    assert compose_config([*TINY, "diagnostics.every=2"]).train.steps_per_call == 1


def test_diagnostics_every_is_checked():
    with pytest.raises(ConfigError, match="diagnostics.every=-1 must be a non-negative"):
        validate(compose_config([*TINY, "diagnostics.every=-1"]))
    assert compose_config([*TINY, "diagnostics.every=0"]).train.steps_per_call == 5
    assert compose_config([*TINY, "diagnostics.every=10"]).train.steps_per_call == 5


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


RUN = ["train.steps=4", "train.steps_per_call=2", "train.log_every=2", "checkpoint.every=2",
       "logger.mode=offline", "logger.artifacts=false", "logger.system_metrics=false",
       "logger.console=off"]


def test_a_run_logs_diagnostics_to_metrics_and_wandb_and_resumes(fashion_dir, tmp_path):
    summary = train_tiny(tmp_path, fashion_dir, [*RUN, "diagnostics.every=2"])
    assert summary["status"] == "finished"
    # Resumed for two more steps: diagnostics keep no state.
    summary = train_tiny(tmp_path, fashion_dir, [*RUN, "diagnostics.every=2", "train.steps=6",
                                                 "resume.allow_changes=true"])
    assert summary["status"] == "finished" and summary["resumed_from"] == 4
    events = read_jsonl(tmp_path / "metrics.jsonl")
    assert [e["step"] for e in events] == [2, 4, 6]
    for event in events:
        keys = {k for k in event if k.startswith("diag/")}
        for metric in (*diagnostics.PARAM_METRICS, *diagnostics.ACTIVATION_METRICS):
            assert any(k.startswith(f"diag/{metric}/") for k in keys), (metric, event["step"])
        assert {"diag/grad_norm/stage1_block1.conv1", "diag/update_ratio/head",
                "diag/dead_share/stage3_block1.act2"} <= keys
        assert all(np.isfinite(event[k]) for k in keys)
    history = wandb_run_contents(tmp_path)["history"]
    logged = [row for row in history if "diag/grad_norm/head" in row]
    assert [row["_step"] for row in logged] == [2, 4, 6]
    assert logged[0]["diag/grad_norm/head"] == events[0]["diag/grad_norm/head"]
    # Histograms across layers, in the same rows (W&B stores them as nested keys).
    for row in logged:
        for name in ("log10_grad_norm", "log10_update_ratio", "act_mean", "act_std",
                     "dead_share"):
            assert row[f"diag/hist/{name}/_type"] == "histogram", (name, row["_step"])
    counts = logged[0]["diag/hist/log10_grad_norm/values"]
    assert sum(counts) == sum(k.startswith("diag/grad_norm/") for k in events[0])


def test_a_run_without_diagnostics_logs_none(fashion_dir, tmp_path):
    train_tiny(tmp_path, fashion_dir, RUN)
    events = read_jsonl(tmp_path / "metrics.jsonl")
    assert [e["step"] for e in events] == [2, 4]
    assert not any(k.startswith("diag/") for e in events for k in e)
    assert not any(k.startswith("diag/") for row in wandb_run_contents(tmp_path)["history"]
                   for k in row)
