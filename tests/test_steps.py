"""The pure pieces of the train step: data order, augmentation, optimizer and schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from omegaconf import OmegaConf

from cnnlab.config.groups import option_values
from cnnlab.data.augment.ops import random_crop
from cnnlab.data.augment.pipeline import make_augment
from cnnlab.data.device import batch_indices
from cnnlab.data.preprocess import normalize
from cnnlab.training.optim import make_optimizer, make_schedule
from tests.helpers import augment_config


def test_each_epoch_is_a_fresh_permutation_with_remainder_dropped():
    key, n, batch = jax.random.PRNGKey(3), 103, 10
    per_epoch = n // batch
    epochs = [np.concatenate([np.asarray(batch_indices(key, jnp.int32(e * per_epoch + s), n, batch))
                              for s in range(per_epoch)]) for e in range(3)]
    for order in epochs:
        assert len(set(order.tolist())) == per_epoch * batch  # no repeats within an epoch
        assert order.min() >= 0 and order.max() < n
    assert not np.array_equal(epochs[0], epochs[1])
    # Pure function of (key, step): what makes resuming at any step exact.
    np.testing.assert_array_equal(batch_indices(key, jnp.int32(12), n, batch),
                                  batch_indices(key, jnp.int32(12), n, batch))


def test_random_crop_takes_windows_of_the_zero_padded_image():
    images = jnp.asarray(np.random.default_rng(0).integers(1, 255, (64, 8, 8, 3)), jnp.uint8)
    out = np.asarray(random_crop(jax.random.PRNGKey(0), images, 2))
    padded = np.pad(np.asarray(images), ((0, 0), (2, 2), (2, 2), (0, 0)))
    offsets = set()
    for i in range(64):
        matches = [(dy, dx) for dy in range(5) for dx in range(5)
                   if np.array_equal(padded[i, dy:dy + 8, dx:dx + 8], out[i])]
        assert matches, f"image {i} is not a window of its padded copy"
        offsets.add(matches[0])
    assert len(offsets) > 10  # offsets vary across the batch


def test_augment_none_is_identity_and_normalize_standardizes():
    images = jnp.asarray(np.random.default_rng(0).integers(0, 255, (4, 5, 5, 3)), jnp.uint8)
    none = make_augment(augment_config(crop_pad=0, flip=False))
    np.testing.assert_array_equal(none(jax.random.PRNGKey(0), images), images)
    mean, std = jnp.array([0.5, 0.4, 0.3]), jnp.array([0.2, 0.25, 0.3])
    expected = (np.asarray(images, np.float32) / 255 - np.asarray(mean)) / np.asarray(std)
    np.testing.assert_allclose(normalize(images, mean, std), expected, rtol=1e-5, atol=1e-6)


def test_sgd_matches_pytorch_semantics():
    """PyTorch SGD: b = m*b + (g + wd*w); w -= lr*b (coupled L2, heavy ball)."""
    lr, m, wd = 0.1, 0.9, 1e-2
    opt = OmegaConf.merge(option_values("optimizer", "momentum"),
                          {"lr": lr, "momentum": m, "nesterov": False, "weight_decay": wd})
    tx = make_optimizer(opt, lambda step: lr)
    w = jnp.array([1.0, -2.0])
    state = tx.init(w)
    w_ref, buf = np.array([1.0, -2.0]), np.zeros(2)
    for _ in range(3):
        grad = 2 * w  # loss = |w|^2
        updates, state = tx.update(grad, state, w)
        w = w + updates
        buf = m * buf + (2 * w_ref + wd * w_ref)
        w_ref = w_ref - lr * buf
        np.testing.assert_allclose(w, w_ref, rtol=1e-6)


def test_warmup_ramps_linearly_then_follows_the_schedule():
    sched = OmegaConf.create({"name": "step", "milestones": [0.5], "factor": 0.1,
                              "warmup_steps": 4})
    schedule = make_schedule(sched, 0.2, 100)
    assert [float(schedule(s)) for s in (0, 1, 3, 4, 49, 50)] == pytest.approx(
        [0.05, 0.1, 0.2, 0.2, 0.2, 0.02])


def test_cosine_ends_at_the_final_factor():
    sched = OmegaConf.create({"name": "cosine", "final_factor": 0.1, "warmup_steps": 0})
    schedule = make_schedule(sched, 1.0, 100)
    assert float(schedule(0)) == pytest.approx(1.0)
    assert float(schedule(50)) == pytest.approx(0.1 + 0.9 * 0.5)
    assert float(schedule(100)) == pytest.approx(0.1)


def test_train_chunks_make_no_host_transfers():
    """The hot loop: compiled chunks on device-resident data, nothing copied implicitly."""
    from cnnlab.training import steps
    from tests.helpers import tiny_step

    tiny = tiny_step()
    cfg, model, tx, state, data = tiny.cfg, tiny.model, tiny.tx, tiny.state, tiny.data
    chunk = steps.make_train_chunk(
        steps.make_train_step(model, tx, make_augment(cfg.augment), 16))
    state, _ = chunk(state, data, 2)  # compile outside the guard
    with jax.transfer_guard("disallow"):
        for _ in range(3):
            state, sums = chunk(state, data, 2)
    assert int(state.step) == 8 and int(sums["count"]) == 32


def test_ema_after_k_steps_is_the_bias_corrected_recurrence_of_the_recorded_weights():
    """eval.ema_decay=d: after k steps the averaged weights (`ema_variables`) are m_k / (1 - d^k),
    m_0 = 0, m_t = d m_{t-1} + (1 - d) w_t over the parameters and BN statistics after each step,
    computed here in NumPy from the recorded trajectory (Kingma & Ba 2015, sec. 7.2)."""
    from cnnlab.runs.weights import ema_variables
    from cnnlab.training import steps
    from tests.helpers import tiny_step

    d, k = 0.6, 4
    tiny = tiny_step([f"eval.ema_decay={d}"])
    chunk = steps.make_train_chunk(steps.make_train_step(
        tiny.model, tiny.tx, make_augment(tiny.cfg.augment), 16, ema_decay=d))

    def leaves(params: object, batch_stats: object) -> list[np.ndarray]:
        return [np.asarray(x, np.float64)
                for x in jax.tree.leaves({"batch_stats": batch_stats, "params": params})]

    state, trajectory = tiny.state, []
    for _ in range(k):
        state, _ = chunk(state, tiny.data, 1)
        trajectory.append(leaves(state.params, state.batch_stats))
    m = [np.zeros_like(x) for x in trajectory[0]]
    for w in trajectory:
        m = [d * a + (1 - d) * x for a, x in zip(m, w, strict=True)]

    got = leaves(*ema_variables(state.ema, d))
    assert int(state.ema.count) == k and len(got) == len(m)
    for a, b in zip(got, m, strict=True):
        np.testing.assert_allclose(a, b / (1 - d ** k), rtol=2e-5, atol=1e-6)
    # The weights moved, so an average that is merely the last weights would fail above.
    assert max(np.max(np.abs(a - b)) for a, b in zip(got, trajectory[-1], strict=True)) > 1e-3
