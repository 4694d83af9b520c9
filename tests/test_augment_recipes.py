"""Scale jittering, random affine distortions, hue rotation and colour casting
(cnnlab/data/augment/), each against its definition written out in NumPy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnlab.cli.preflight import validate
from cnnlab.data.augment import ops as aug
from cnnlab.data.augment.pipeline import Augment, make_augment
from cnnlab.errors import ConfigError
from tests.helpers import augment_config, compose_config


def floats(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random(shape).astype(np.float32)


def warp(images: np.ndarray, angle: float = 0.0, zoom: float = 1.0, shear: float = 0.0,
         shift: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    n = images.shape[0]
    matrices = aug.affine_matrices(jnp.full((n,), angle), jnp.full((n,), zoom),
                                   jnp.full((n,), shear))
    return np.asarray(aug.warp_affine(jnp.asarray(images), matrices,
                                      jnp.tile(jnp.asarray(shift, jnp.float32), (n, 1))))


def augment_with(**options: object) -> Augment:
    return make_augment(augment_config(**options))


# ------------------------------------------------------------- the default pipeline in NumPy


def test_crop_flip_pipeline_is_numpys_pad_crop_flip_then_normalize():
    """The default runs' augmentation (augment=default: crop_flip) as the train step applies it
    (`make_gradients`, preprocessing included): every input the network sees is a NumPy
    pad-by-4, crop, maybe-mirror of its own image, standardized by (x/255 - mean)/std; and over
    the batch the draws cover every one of the 81 windows and mirror about half the images."""
    import flax.linen as nn

    from cnnlab.data.device import GivenBatch
    from cnnlab.data.preprocess import PreprocessStats
    from cnnlab.training import steps

    cfg = compose_config([]).augment
    assert (cfg.name, cfg.crop_pad, cfg.flip) == ("crop_flip", 4, True)
    n, pad = 1024, 4
    images = np.random.default_rng(7).integers(0, 256, (n, 6, 5, 2), dtype=np.uint8)
    mean, std = np.array([0.45, 0.55]), np.array([0.2, 0.3])
    seen: list = []

    class Probe(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
            seen.append(np.asarray(x, np.float64))
            return jnp.zeros((x.shape[0], 10)) + self.param("b", nn.initializers.zeros, (10,))

    gradients = steps.make_gradients(Probe(), make_augment(cfg), n)
    state = steps.TrainState(step=jnp.asarray(11), params={"b": jnp.zeros(10)}, batch_stats={},
                             opt_state=None, rng=jax.random.PRNGKey(3))
    gradients(state, GivenBatch(images=jnp.asarray(images), labels=jnp.zeros(n, jnp.int32),
                                stats=PreprocessStats(mean=jnp.asarray(mean, jnp.float32),
                                                      std=jnp.asarray(std, jnp.float32))))
    # Every window of every zero-padded image, mirrored or not, standardized in NumPy:
    # (n, top, left, flip, h, w, c); each input must be one of its own image's.
    h, w = images.shape[1:3]
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0))) / 255.0
    windows = np.lib.stride_tricks.sliding_window_view(padded, (h, w), axis=(1, 2))
    windows = np.moveaxis(windows, 3, -1)  # (n, top, left, h, w, c)
    candidates = (np.stack([windows, windows[..., ::-1, :]], axis=3) - mean) / std
    distance = np.abs(candidates - seen[0][:, None, None, None]).max(axis=(-3, -2, -1))
    assert np.all(distance.min(axis=(1, 2, 3)) < 1e-5), "not a pad-crop-flip of its own image"
    n_idx, top, left, flip = np.nonzero(distance < 1e-5)
    first = np.unique(n_idx, return_index=True)[1]  # one draw per image
    assert len({(t, u) for t, u in zip(top[first], left[first], strict=True)}) == (
        2 * pad + 1) ** 2
    assert abs(flip[first].sum() - n / 2) < 4 * math.sqrt(n) / 2  # 4 sigma of Binomial(n, 1/2)


# --------------------------------------------------------------------------------- affine

def test_identity_affine_gives_the_input_exactly():
    images = floats((3, 9, 7, 2))
    np.testing.assert_array_equal(warp(images), images)
    # The configured identity is off: the batch comes back untouched (and stays uint8).
    pixels = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, 8, 8, 3)), jnp.uint8)
    assert not augment_with().affine
    np.testing.assert_array_equal(augment_with()(jax.random.PRNGKey(0), pixels), pixels)


@pytest.mark.parametrize("dx,dy", [(2, 0), (0, -3), (1, 2), (-2, -1)])
def test_integer_translation_is_a_shift_filled_with_black(dx, dy):
    images = floats((2, 8, 10, 3))
    expected = np.zeros_like(images)
    h, w = images.shape[1:3]
    # Content moves right by dx and down by dy; what enters is fill (0).
    expected[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = images[
        :, max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    np.testing.assert_array_equal(warp(images, shift=(dx, dy)), expected)


@pytest.mark.parametrize("side", [7, 8])
def test_rotation_by_90_degrees_is_np_rot90_counter_clockwise(side):
    images = floats((2, side, side, 3))
    expected = np.rot90(images, k=1, axes=(1, 2))  # counter-clockwise as displayed
    np.testing.assert_allclose(warp(images, angle=90.0), expected, atol=1e-5)
    np.testing.assert_allclose(warp(images, angle=-90.0), np.rot90(images, k=-1, axes=(1, 2)),
                               atol=1e-5)
    np.testing.assert_allclose(warp(images, angle=180.0), images[:, ::-1, ::-1], atol=1e-5)


def test_zoom_and_shear_move_pixels_where_the_matrix_says():
    images = floats((1, 9, 9, 1))
    # Zoom 2 about the centre (4, 4): output (y, x) reads input (4 + (y - 4) / 2, ...).
    zoomed = warp(images, zoom=2.0)
    assert zoomed[0, 4, 4, 0] == pytest.approx(images[0, 4, 4, 0])
    assert zoomed[0, 6, 8, 0] == pytest.approx(images[0, 5, 6, 0])
    # x-shear by 45 degrees: output (y, x) reads input (y, x - (y - 4)).
    sheared = warp(images, shear=45.0)
    assert sheared[0, 6, 5, 0] == pytest.approx(images[0, 6, 3, 0], abs=1e-5)
    assert sheared[0, 2, 3, 0] == pytest.approx(images[0, 2, 5, 0], abs=1e-5)


def test_half_pixel_shift_is_the_bilinear_mean_of_neighbours():
    images = floats((1, 5, 6, 2))
    got = warp(images, shift=(0.5, 0.0))
    np.testing.assert_allclose(got[0, :, 1:], (images[0, :, :-1] + images[0, :, 1:]) / 2,
                               atol=1e-6)
    np.testing.assert_allclose(got[0, :, 0], images[0, :, 0] / 2, atol=1e-6)  # half black


def test_random_affine_is_per_image_reproducible_and_within_its_ranges():
    pixels = jnp.asarray(np.random.default_rng(3).integers(0, 256, (16, 12, 12, 3)), jnp.uint8)
    augment = augment_with(affine={"rotate": 20.0, "scale": [0.9, 1.1], "shear": 10.0,
                                   "translate": 0.1})
    out = jax.jit(augment)(jax.random.PRNGKey(0), pixels)
    assert out.shape == pixels.shape and out.dtype == jnp.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    again = jax.jit(augment)(jax.random.PRNGKey(0), pixels)
    np.testing.assert_array_equal(out, again)
    other = jax.jit(augment)(jax.random.PRNGKey(1), pixels)
    assert not np.allclose(out, other)
    # Per image: the same picture twice in a batch is distorted two ways.
    same = jnp.stack([pixels[0]] * 4)
    warped = np.asarray(augment(jax.random.PRNGKey(2), same))
    assert not np.allclose(warped[0], warped[1])


def test_translation_is_whole_pixels_within_the_fraction():
    # A lone translation: every output is an integer shift of the input.
    images = floats((32, 10, 10, 1))
    out = np.asarray(aug.random_affine(jax.random.PRNGKey(0), jnp.asarray(images), 0.0,
                                       (1.0, 1.0), 0.0, 0.2))
    for image, got in zip(images, out, strict=True):
        matches = [(dx, dy) for dx in range(-2, 3) for dy in range(-2, 3)
                   if np.array_equal(got, warp(image[None], shift=(dx, dy))[0])]
        assert matches, "not a whole-pixel shift of at most 0.2 x 10 pixels"


# --------------------------------------------------------------------------- hue and cast

def test_hue_rotation_of_0_and_360_degrees_is_the_identity():
    images = floats((4, 6, 5, 3))
    for degrees in (0.0, 360.0, -360.0):
        got = aug.adjust_hue(jnp.asarray(images), jnp.full((4,), degrees))
        np.testing.assert_allclose(got, images, atol=1e-6)


def test_hue_rotation_of_120_degrees_cycles_the_channels():
    images = floats((2, 4, 4, 3))
    got = aug.adjust_hue(jnp.asarray(images), jnp.full((2,), 120.0))
    np.testing.assert_allclose(got, images[..., [2, 0, 1]], atol=1e-5)  # red -> green
    # Grey pixels have no hue: unchanged by any rotation.
    grey = np.repeat(floats((1, 3, 3, 1)), 3, axis=-1)
    np.testing.assert_allclose(aug.adjust_hue(jnp.asarray(grey), jnp.array([77.0])), grey,
                               atol=1e-6)


def test_hue_keeps_value_and_saturation():
    images = floats((3, 5, 5, 3))
    got = np.asarray(aug.random_hue(jax.random.PRNGKey(0), jnp.asarray(images), 90.0))
    np.testing.assert_allclose(got.max(-1), images.max(-1), atol=1e-5)
    np.testing.assert_allclose(got.min(-1), images.min(-1), atol=1e-5)


def test_color_cast_adds_one_integer_offset_per_channel_within_the_range():
    images = np.full((64, 4, 5, 3), 0.5, np.float32) + floats((64, 4, 5, 3)) * 0.1
    got = np.asarray(aug.color_cast(jax.random.PRNGKey(0), jnp.asarray(images), 20))
    offsets = (got - images) * 255.0
    # Constant over each image's pixels, per channel; whole levels in [-20, 20].
    np.testing.assert_allclose(offsets, offsets[:, :1, :1, :] * np.ones_like(offsets), atol=1e-3)
    levels = offsets[:, 0, 0, :]
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)
    assert levels.min() >= -20.001 and levels.max() <= 20.001
    assert len(np.unique(np.round(levels))) > 20  # drawn, not fixed
    # Channels get their own offsets.
    assert np.mean(np.abs(levels[:, 0] - levels[:, 1]) > 0.5) > 0.5


def test_color_cast_and_hue_are_per_image_and_reproducible():
    pixels = jnp.asarray(np.random.default_rng(4).integers(0, 256, (8, 6, 6, 3)), jnp.uint8)
    same = jnp.stack([pixels[0]] * 8)
    augment = augment_with(hue=30.0, color_cast=20)
    out = np.asarray(jax.jit(augment)(jax.random.PRNGKey(0), same))
    assert out.shape == same.shape and out.dtype == np.float32
    assert len({out[i].tobytes() for i in range(8)}) == 8
    np.testing.assert_array_equal(out, jax.jit(augment)(jax.random.PRNGKey(0), same))


# ------------------------------------------------------------------------- scale jitter

def test_scale_jitter_samples_s_in_range_and_windows_inside_the_resized_image():
    side, top, left = (np.asarray(a) for a in aug.sample_scale_jitter(
        jax.random.PRNGKey(0), 2000, 28, 28, (32, 56)))
    assert side.min() == 32 and side.max() == 56  # inclusive, every value drawn
    assert np.all(top >= 0) and np.all(top <= side - 28)
    assert np.all(left >= 0) and np.all(left <= side - 28)
    # Non-square images: the shorter side is S, the other int(S * long / short).
    side, top, left = (np.asarray(a) for a in aug.sample_scale_jitter(
        jax.random.PRNGKey(1), 500, 20, 30, (20, 40)))
    assert np.all(top <= side - 20) and np.all(left <= side * 30 // 20 - 30)


def test_scale_jitter_output_shape_and_identity_at_the_native_size():
    images = jnp.asarray(np.random.default_rng(5).integers(0, 256, (6, 12, 12, 3)), jnp.uint8)
    out = jax.jit(lambda k, x: aug.scale_jitter(k, x, (12, 30)))(jax.random.PRNGKey(0), images)
    assert out.shape == images.shape and out.dtype == jnp.float32
    # S = the image's side: no resize, the only window is the image.
    same = aug.scale_jitter(jax.random.PRNGKey(0), images, (12, 12))
    np.testing.assert_allclose(same, np.asarray(images, np.float32) / 255.0, atol=1e-6)


def test_scale_jitter_is_resize_then_crop():
    """S = 2 x side: a window of the image upsampled x2 by PyTorch's bilinear rule."""
    images = floats((1, 6, 6, 1))
    up = np.asarray(jax.image.resize(jnp.asarray(images), (1, 12, 12, 1), "bilinear",
                                     antialias=False))
    got = aug.resize_and_crop(jnp.asarray(images), jnp.array([12]), jnp.array([3]),
                              jnp.array([5]))
    np.testing.assert_allclose(got, up[:, 3:9, 5:11], atol=1e-6)


# ---------------------------------------------------------------------------- validation

@pytest.mark.parametrize("override,message", [
    ("augment.hue=10", "augment.hue=10.0 rotates the hue of RGB images; these have 1"),
    ("augment.scale_jitter=[20,40]", "augment.scale_jitter=[20, 40]: the training crop is the "
                                     "28x28 images' own size"),
    ("augment.scale_jitter=[40,30]", "must be [S_min, S_max]"),
    ("augment.affine.rotate=-5", "augment.affine.rotate=-5.0 must be in [0, 180]"),
    ("augment.affine.scale=[1.2,0.8]", "augment.affine.scale="),
    ("augment.affine.translate=2", "augment.affine.translate=2.0"),
    ("augment.color_cast=-1", "augment.color_cast=-1"),
])
def test_bad_values_are_one_line_errors(override, message):
    with pytest.raises(ConfigError, match=None) as error:
        validate(compose_config([override]))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_options_compose_with_a_preset_and_train_on_device():
    cfg = compose_config(["augment=crop_flip", "augment.affine.rotate=15",
                          "augment.color_cast=20", "augment.scale_jitter=[28,36]"])
    validate(cfg)
    assert (cfg.augment.crop_pad, cfg.augment.flip, cfg.augment.affine.rotate) == (4, True, 15)
    augment = make_augment(cfg.augment)
    pixels = jnp.asarray(np.random.default_rng(6).integers(0, 256, (4, 28, 28, 1)), jnp.uint8)
    out = jax.jit(augment)(jax.random.PRNGKey(0), pixels)
    assert out.shape == pixels.shape and out.dtype == jnp.float32
