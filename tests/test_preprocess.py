"""Preprocessing methods and their training-set statistics (cnnlab/data/preprocess.py)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from omegaconf import OmegaConf

from cnnlab.cli.preflight import validate
from cnnlab.config.groups import group_options
from cnnlab.data import preprocess as pp
from cnnlab.data.augment.pipeline import make_augment
from cnnlab.data.device import DeviceSplit, device_split
from cnnlab.data.load import channel_mean_std
from cnnlab.data.types import ArraySplit, Dataset
from cnnlab.errors import ConfigError
from cnnlab.training import steps
from tests.helpers import augment_config, compose_config


def correlated_images(n: int, shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """uint8 images with strongly correlated pixels (a random mixing of a few sources + noise),
    so that whitening has something to undo."""
    rng = np.random.default_rng(seed)
    dims = int(np.prod(shape))
    sources = rng.normal(size=(n, 6)) @ rng.normal(size=(6, dims)) * 20
    values = 120 + sources + rng.normal(size=(n, dims)) * 6 + rng.uniform(-40, 40, dims)
    return np.clip(np.round(values), 0, 255).astype(np.uint8).reshape(n, *shape)


def dataset_of(images: np.ndarray, num_classes: int = 10) -> Dataset:
    labels = (np.arange(len(images)) % num_classes).astype(np.int32)
    split = ArraySplit(images=images, labels=labels)
    mean, std = channel_mean_std(images)
    return Dataset(name="synthetic", train=split, test=split, val=None,
                            num_classes=num_classes, image_shape=images.shape[1:], mean=mean,
                            std=std)


def method(name: str, epsilon: float | None = None) -> OmegaConf:
    return OmegaConf.create({"name": name, "epsilon": epsilon})


def test_registry_matches_the_config_group_and_every_option_validates():
    assert pp.PREPROCESSORS.names() == group_options("preprocess")
    for option in group_options("preprocess"):
        validate(compose_config([f"preprocess={option}", "dataset=cifar10"]))


def test_channel_is_the_old_normalize_bit_for_bit():
    images = jnp.asarray(correlated_images(16, (5, 5, 3)))
    mean, std = jnp.array([0.45, 0.5, 0.55]), jnp.array([0.2, 0.25, 0.3])
    old = jax.jit(lambda x: (x.astype(jnp.float32) / 255.0 - mean) / std)(images)
    new = jax.jit(pp.preprocess)(images, pp.PreprocessStats(mean=mean, std=std))
    np.testing.assert_array_equal(new, old)
    dataset = dataset_of(np.asarray(images))
    stats = pp.compute_stats(method("channel"), dataset)
    assert stats.mean is dataset.mean or np.array_equal(stats.mean, dataset.mean)
    np.testing.assert_array_equal(stats.std, dataset.std)
    assert stats.whiten is None


def test_none_is_the_pixels_on_the_unit_scale_and_float_input_is_taken_as_unit_scale():
    images = jnp.asarray(correlated_images(4, (3, 3, 1)))
    stats = pp.compute_stats(method("none"), dataset_of(np.asarray(images)))
    np.testing.assert_allclose(pp.preprocess(images, stats), np.asarray(images) / 255.0, rtol=1e-6)
    unit = jnp.full((2, 3, 3, 1), 0.25, jnp.float32)
    np.testing.assert_array_equal(pp.preprocess(unit, stats), unit)


def test_chunked_statistics_equal_a_direct_numpy_computation(monkeypatch):
    images = correlated_images(300, (4, 3, 2))
    monkeypatch.setattr(pp, "_CHUNK_BYTES", 8 * 24 * 7)  # 7 images per chunk, a ragged last one
    assert len(list(pp._chunks(images))) == 43
    flat = images.reshape(300, -1).astype(np.float64) / 255
    mean = pp.pixel_mean(images)
    np.testing.assert_allclose(mean, flat.mean(0).reshape(4, 3, 2), rtol=1e-12)
    np.testing.assert_allclose(pp.pixel_covariance(images, mean), np.cov(flat.T, bias=True),
                               rtol=1e-10, atol=1e-14)


def test_mean_image_subtracts_the_per_pixel_mean_and_nothing_else():
    images = correlated_images(500, (4, 4, 3))
    stats = pp.compute_stats(method("mean_image"), dataset_of(images))
    assert stats.mean.shape == (4, 4, 3) and stats.std is None and stats.whiten is None
    out = np.asarray(jax.jit(pp.preprocess)(jnp.asarray(images), stats), np.float64)
    np.testing.assert_allclose(out.mean(axis=0), 0, atol=1e-6)
    np.testing.assert_allclose(out, images / 255.0 - images.mean(0) / 255.0, atol=1e-6)


@pytest.mark.parametrize("epsilon", [1e-2, 1e-7])
def test_zca_whitened_training_data_has_zero_mean_and_covariance_u_lambda_over_lambda_eps(
        epsilon):
    images = correlated_images(4000, (4, 4, 3))
    stats = pp.compute_stats(method("zca", epsilon), dataset_of(images))
    w = np.asarray(stats.whiten, np.float64)
    assert w.shape == (48, 48)
    np.testing.assert_array_equal(stats.whiten, np.asarray(stats.whiten).T)  # W symmetric
    out = np.asarray(jax.jit(pp.preprocess)(jnp.asarray(images), stats), np.float64)
    flat = out.reshape(4000, -1)
    np.testing.assert_allclose(flat.mean(axis=0), 0, atol=2e-5)
    centred = images.reshape(4000, -1) / 255.0
    centred = centred - centred.mean(0)
    lam, u = np.linalg.eigh(np.cov(centred.T, bias=True))
    expected = u @ np.diag(lam / (lam + epsilon)) @ u.T
    np.testing.assert_allclose(np.cov(flat.T, bias=True), expected, atol=2e-4)
    # W itself: U diag(1 / sqrt(lambda + eps)) U^T.
    np.testing.assert_allclose(w, u @ np.diag(1 / np.sqrt(lam + epsilon)) @ u.T,
                               rtol=1e-5, atol=1e-4 * np.abs(w).max())
    if epsilon < 1e-6:  # full-rank data, eps -> 0: white
        np.testing.assert_allclose(np.cov(flat.T, bias=True), np.eye(48), atol=2e-3)
    else:  # directions with variance well below eps are damped, not amplified
        assert (lam / (lam + epsilon)).min() < 0.5 and np.trace(np.cov(flat.T)) < 48


def test_zca_statistics_travel_as_device_data_shared_by_every_split(fashion_dir):
    from cnnlab.training.build import load_data

    cfg = compose_config(["preprocess=zca", "dataset.max_examples=1024", "dataset.val_size=24",
                          f"dataset.data_dir={fashion_dir}"])
    dataset = load_data(cfg)
    assert isinstance(dataset.preprocess.whiten, jax.Array)
    train = device_split(dataset.train, dataset.preprocess)
    test = device_split(dataset.test, dataset.preprocess, 256)
    for split in (train, test):
        assert split.stats.whiten.unsafe_buffer_pointer() == \
            dataset.preprocess.whiten.unsafe_buffer_pointer()  # one copy on the device
    # Statistics of the training split after the validation hold-out.
    flat = dataset.train.images.reshape(1000, -1) / 255.0
    np.testing.assert_allclose(np.asarray(dataset.preprocess.mean).reshape(-1), flat.mean(0),
                               atol=1e-6)
    whitened = np.asarray(pp.preprocess(train.images, train.stats), np.float64).reshape(1000, -1)
    np.testing.assert_allclose(whitened.mean(0), 0, atol=1e-4)


class Linear(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


@pytest.mark.parametrize("name", ["channel", "mean_image", "zca", "none"])
def test_each_method_trains_and_evaluates_with_the_same_statistics(name):
    images = correlated_images(64, (6, 6, 3))
    dataset = dataset_of(images)
    stats = jax.device_put(pp.compute_stats(method(name, 0.01 if name == "zca" else None),
                                            dataset))
    data = DeviceSplit(images=jnp.asarray(images), labels=jnp.asarray(dataset.train.labels),
                             mask=jnp.ones(64, bool), stats=stats)
    model, tx = Linear(), optax.sgd(0.01)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 6, 6, 3)))["params"]
    state = steps.TrainState(step=jnp.int32(0), params=params, batch_stats={},
                             opt_state=tx.init(params), rng=jax.random.PRNGKey(1))
    augment = make_augment(augment_config(crop_pad=1, flip=True, cutout=2))
    chunk = steps.make_train_chunk(steps.make_train_step(model, tx, augment, 16))
    state, sums = chunk(state, data, 2)
    assert int(sums["count"]) == 32 and np.isfinite(float(sums["loss_sum"]))
    metrics = steps.make_eval_batch(model, 32)(state.params, {}, data, 0)
    logits = model.apply({"params": state.params}, pp.preprocess(data.images[:32], stats))
    hits = int((np.argmax(np.asarray(logits), -1) == dataset.train.labels[:32]).sum())
    assert int(metrics["correct"]) == hits and int(metrics["count"]) == 32


@pytest.mark.parametrize(("overrides", "message"), [
    (["preprocess=zca", "preprocess.epsilon=0"],
     "preprocess.epsilon=0.0 must be positive for preprocess=zca"),
    (["preprocess=channel", "preprocess.epsilon=0.1"],
     "preprocess.epsilon=0.1 is used by preprocess=zca only; set preprocess.epsilon=null"),
    (["preprocess=zca", "dataset=imagenet", "model=resnet18"],
     "preprocess=zca whitens whole 224x224x3 images: a 150528x150528 matrix"),
    (["preprocess.name=pca"],
     "unknown preprocess 'pca'; valid choices: channel, mean_image, none, zca"),
])
def test_bad_preprocess_settings_fail_with_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as error:
        validate(compose_config(overrides))
    assert "\n" not in str(error.value)
