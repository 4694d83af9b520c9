"""Evaluation techniques (cnnlab/training/evaluate.py), each against its definition written by hand:
EMA weights, flip and ten-crop TTA, ensembles, snapshot ensembles' schedule and snapshots, and
`cnnlab eval` on real runs."""

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from omegaconf import OmegaConf

from cnnlab.cli.preflight import validate
from cnnlab.data.device import DeviceSplit
from cnnlab.data.preprocess import PreprocessStats
from cnnlab.errors import ConfigError
from cnnlab.models import build_model
from cnnlab.training import evaluate, steps
from cnnlab.training.optim import make_optimizer, make_schedule
from tests.helpers import TINY, compose_config

IMAGE = (12, 12, 1)


def device_split(images: np.ndarray, labels: np.ndarray) -> DeviceSplit:
    """A device split of raw uint8 images with fixed preprocessing statistics."""
    channels = images.shape[-1]
    stats = PreprocessStats(mean=np.full((channels,), 0.5, np.float32),
                            std=np.full((channels,), 0.25, np.float32))
    return jax.device_put(DeviceSplit(images=images, labels=labels,
                                            mask=np.ones(len(labels), bool), stats=stats))


@functools.cache
def tiny_model() -> tuple:
    """ResNet-8 at width 4 (TINY), its initial state and random 12x12 data."""
    from cnnlab.training.build import init_state

    cfg = compose_config(TINY)
    model = build_model(cfg, 10)
    tx = make_optimizer(cfg.optimizer, make_schedule(cfg.schedule, cfg.optimizer.lr, 100))
    state = init_state(cfg, model, tx, IMAGE)
    rng = np.random.default_rng(0)
    data = device_split(rng.integers(0, 256, (64, *IMAGE), dtype=np.uint8),
                        rng.integers(0, 10, (64,), dtype=np.int32))
    return cfg, model, state, data


# ----------------------------------------------------------------------- EMA averaged weights


def test_ema_is_off_by_default_and_its_decay_is_checked():
    assert tiny_model()[2].ema is None
    for bad in ("1.0", "0", "-0.5"):
        with pytest.raises(ConfigError, match="eval.ema_decay"):
            validate(compose_config([f"eval.ema_decay={bad}"]))


# --------------------------------------------------------------------- test-time augmentation


def plain_softmax(model: object, params: object, batch_stats: object,
                  split: DeviceSplit) -> Callable[[np.ndarray], np.ndarray]:
    """images -> the model's softmax, through the evaluation path without TTA (compiled once
    per image shape)."""
    log_probs = jax.jit(steps.make_log_probs(model))

    def softmax(images: np.ndarray) -> np.ndarray:
        out = log_probs(params, batch_stats, split, jnp.asarray(images))
        return np.exp(np.asarray(out, np.float64))

    return softmax


def test_flip_tta_is_the_mean_of_the_softmaxes_of_the_image_and_its_mirror():
    _, model, state, data = tiny_model()
    predict = steps.make_predict_batch(model, 16, evaluate.flip_views)
    got = np.exp(np.asarray(predict(state.params, state.batch_stats, data, 1), np.float64))
    images = np.asarray(data.images)[16:32]
    softmax = plain_softmax(model, state.params, state.batch_stats, data)
    expected = (softmax(images) + softmax(images[:, :, ::-1, :])) / 2
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
    assert np.max(np.abs(expected - softmax(images))) > 1e-5


def _numpy_ten_windows(images: np.ndarray, pad: int) -> list[np.ndarray]:
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    h, w = images.shape[1:3]
    corners = [(0, 0), (0, 2 * pad), (2 * pad, 0), (2 * pad, 2 * pad), (pad, pad)]
    crops = [padded[:, y:y + h, x:x + w] for y, x in corners]
    return crops + [c[:, :, ::-1] for c in crops]


def test_ten_crop_views_are_the_corners_and_centre_of_the_padded_image_and_their_mirrors():
    images = np.random.default_rng(1).integers(1, 256, (3, 8, 10, 2), dtype=np.uint8)
    views = np.asarray(evaluate.ten_crop_views(jnp.asarray(images), 2, None))
    expected = _numpy_ten_windows(images, 2)
    assert views.shape == (10, 3, 8, 10, 2)
    for view, window in zip(views, expected, strict=True):
        np.testing.assert_array_equal(view, window)
    np.testing.assert_array_equal(views[4], images)  # the centre window is the image itself


def test_ten_crop_with_a_crop_size_takes_windows_of_the_image_scaled_to_its_size():
    images = np.random.default_rng(2).integers(0, 256, (2, 9, 9, 1), dtype=np.uint8)
    views = np.asarray(evaluate.ten_crop_views(jnp.asarray(images), 0, 7))
    corners = [(0, 0), (0, 2), (2, 0), (2, 2), (1, 1)]
    for i, (y, x) in enumerate(corners):
        window = images[:, y:y + 7, x:x + 7].astype(np.float32)
        scaled = jax.image.resize(window, (2, 9, 9, 1), "bilinear")
        expected = np.clip(np.round(np.asarray(scaled)), 0, 255).astype(np.uint8)
        np.testing.assert_array_equal(views[i], expected)
        np.testing.assert_array_equal(views[i + 5], expected[:, :, ::-1])
    # Full-size windows are the image: only the mirror changes anything.
    same = np.asarray(evaluate.ten_crop_views(jnp.asarray(images), 0, 9))
    np.testing.assert_array_equal(same[:5], np.broadcast_to(images, (5, *images.shape)))


def test_ten_crop_geometry_follows_the_training_crops():
    def geometry(augment: str, crop_size: int | None, side: int) -> tuple[int, int | None]:
        cfg = compose_config([f"augment={augment}"])
        return evaluate.ten_crop_geometry(cfg.augment, crop_size, (side, side, 3))

    assert geometry("crop_flip", None, 32) == (4, None)  # 32x32 windows of the 40x40 padding
    assert geometry("crop_flip", 24, 32) == (0, 24)  # eval.crop_size wins
    assert geometry("alexnet", None, 256) == (0, 224)  # AlexNet's 224 of 256
    with pytest.raises(ConfigError):
        geometry("inception", None, 32)  # random scales: no single window size


def test_ten_crop_tta_averages_the_softmaxes_of_exactly_the_ten_windows():
    cfg, model, state, data = tiny_model()
    pad = cfg.augment.crop_pad  # 4: fashion_mnist's default crop_flip
    views = evaluate.make_views("ten_crop", cfg.augment, None, IMAGE)
    predict = steps.make_predict_batch(model, 8, views)
    got = np.exp(np.asarray(predict(state.params, state.batch_stats, data, 0), np.float64))
    windows = _numpy_ten_windows(np.asarray(data.images)[:8], pad)
    softmax = plain_softmax(model, state.params, state.batch_stats, data)
    expected = np.mean([softmax(w) for w in windows], axis=0)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)


def test_eval_batch_with_tta_scores_the_averaged_prediction():
    _, model, state, data = tiny_model()
    sums = jax.jit(steps.make_eval_batch(model, 64, evaluate.flip_views))(
        state.params, state.batch_stats, data, 0)
    log_probs = steps.make_predict_batch(model, 64, evaluate.flip_views)(
        state.params, state.batch_stats, data, 0)
    expected = evaluate.prob_metrics(np.asarray(log_probs), np.asarray(data.labels))
    assert float(sums["loss_sum"]) / 64 == pytest.approx(expected["loss"], rel=1e-5)
    assert 100 * (1 - int(sums["correct"]) / 64) == pytest.approx(expected["error"])


def test_tta_options_are_checked():
    with pytest.raises(ConfigError, match="eval.tta='five_crop'"):
        validate(compose_config(["eval.tta=five_crop"]))
    with pytest.raises(ConfigError, match="needs training crops of one size"):
        validate(compose_config(["eval.tta=ten_crop", "augment=flip"]))
    with pytest.raises(ConfigError, match="needs training crops of one size"):
        validate(compose_config(["eval.tta=ten_crop", "augment=inception"]))
    validate(compose_config(["eval.tta=ten_crop", "augment=flip", "eval.crop_size=24"]))
    with pytest.raises(ConfigError, match="exceeds the 28x28 images"):
        validate(compose_config(["eval.tta=ten_crop", "eval.crop_size=32"]))


# ---------------------------------------------------------------------------------- ensembles


def test_ensemble_is_the_mean_of_the_member_softmaxes_and_its_error_is_theirs():
    rng = np.random.default_rng(3)
    logits = [rng.normal(0, 3, (500, 7)) for _ in range(3)]
    labels = rng.integers(0, 7, 500)
    softmaxes = [np.exp(z) / np.exp(z).sum(1, keepdims=True) for z in logits]
    member_log_probs = [np.log(p).astype(np.float32) for p in softmaxes]
    combined = evaluate.ensemble_log_probs(member_log_probs)
    mean = np.mean(softmaxes, axis=0)
    np.testing.assert_allclose(np.exp(combined), mean, rtol=1e-5)
    metrics = evaluate.prob_metrics(combined, labels)
    assert metrics["error"] == pytest.approx(100 * np.mean(mean.argmax(1) != labels))
    assert metrics["loss"] == pytest.approx(-np.mean(np.log(mean[np.arange(500), labels])),
                                            rel=1e-5)
    # Averaging probabilities is not averaging logits: the two disagree somewhere here.
    assert np.any(mean.argmax(1) != np.mean(logits, axis=0).argmax(1))


# ------------------------------------------------------------------ snapshot ensembles: lr(t)


def test_cyclic_cosine_follows_huang_et_al_formula():
    lr0, total, cycles = 0.2, 100, 3
    sched = OmegaConf.create({"name": "cyclic_cosine", "cycles": cycles, "warmup_steps": 0})
    schedule = make_schedule(sched, lr0, total)
    length = math.ceil(total / cycles)  # 34

    def formula(t: int) -> float:
        return lr0 / 2 * (math.cos(math.pi * (t % length) / length) + 1)

    for t in (0, 1, 17, 33, 34, 35, 50, 67, 68, 99):
        assert float(schedule(t)) == pytest.approx(formula(t), rel=1e-5, abs=1e-8), t
    assert float(schedule(0)) == float(schedule(34)) == float(schedule(68)) == pytest.approx(lr0)
    assert float(schedule(17)) == pytest.approx(lr0 / 2)  # half way through the first cycle
    assert float(schedule(33)) < 0.01 * lr0  # annealed just before the restart


@pytest.mark.parametrize("overrides,message", [
    (["train.steps=4", "train.steps_per_call=1", "schedule.cycles=3", "train.log_every=1",
      "train.eval_every=1", "checkpoint.every=1"], "leaves the last cycle"),
    (["schedule.cycles=0"], "schedule.cycles=0 must be a positive integer"),
])
def test_cycles_must_end_on_chunk_boundaries(overrides, message):
    with pytest.raises(ConfigError) as info:
        validate(compose_config(["schedule=cyclic_cosine", *overrides]))
    assert message in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------------- real runs, cnnlab eval
