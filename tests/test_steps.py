"""The pure pieces of the train step: data order, augmentation, optimizer and schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from omegaconf import OmegaConf

from cnnlab.config.groups import option_values
from cnnlab.data.augment.ops import random_crop, random_flip
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


def test_random_flip_mirrors_about_half_the_batch():
    images = jnp.asarray(np.random.default_rng(0).integers(0, 255, (1000, 4, 6, 1)), jnp.uint8)
    out = np.asarray(random_flip(jax.random.PRNGKey(1), images))
    flipped = [np.array_equal(o, np.asarray(i)[:, ::-1]) for o, i in zip(out, images, strict=True)]
    kept = [np.array_equal(o, np.asarray(i)) for o, i in zip(out, images, strict=True)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert 430 < sum(flipped) < 570


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
