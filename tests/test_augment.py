"""Each augmentation against its definition, written out by hand in NumPy
(cnnlab/data/augment/)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from omegaconf import OmegaConf

from cnnlab.cli.preflight import validate
from cnnlab.config.groups import group_options
from cnnlab.data.augment import ops as aug
from cnnlab.data.augment.pipeline import make_augment, mixup_loss
from cnnlab.data.preprocess import PreprocessStats, channel_pca, preprocess
from cnnlab.errors import ConfigError
from tests.helpers import augment_config, compose_config

LUMA = np.array([0.2989, 0.587, 0.114])


def pixels(shape: tuple[int, ...], seed: int = 0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(0, 256, shape), jnp.uint8)


def unit(images: jax.Array) -> np.ndarray:
    return np.asarray(images, np.float64) / 255.0


def keys(n: int, seed: int = 0) -> jax.Array:
    return jax.random.split(jax.random.PRNGKey(seed), n)


# ------------------------------------------------------------------ pipeline and defaults

def crop_flip_by_hand(key: jax.Array, images: np.ndarray, pad: int) -> np.ndarray:
    """He et al.'s crop and flip in NumPy, from the step key's two streams (split: crop, flip):
    offsets ~ U{0..2 pad} per image and axis, then a mirror with probability 1/2 per image."""
    crop_key, flip_key = jax.random.split(key)
    n, h, w, _ = images.shape
    offsets = np.asarray(jax.random.randint(crop_key, (n, 2), 0, 2 * pad + 1))
    flips = np.asarray(jax.random.bernoulli(flip_key, 0.5, (n, 1, 1, 1))).reshape(n)
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    out = np.stack([padded[i, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets)])
    out[flips] = out[flips][:, :, ::-1]
    return out


def test_default_pipeline_is_bit_identical_to_crop_flip_then_normalize():
    """crop_flip + channel: the crop and flip He et al. define, drawn from the step's key as
    before cnnlab.data.preprocess, then the step's float32 normalization."""
    images = pixels((32, 8, 8, 3))
    mean, std = jnp.array([0.49, 0.48, 0.45]), jnp.array([0.25, 0.24, 0.26])
    key = jax.random.PRNGKey(7)

    @jax.jit  # the old step's normalization, compiled as the step compiles it
    def normalize(images: jax.Array) -> jax.Array:
        return (images.astype(jnp.float32) / 255.0 - mean) / std

    augment = make_augment(compose_config(["augment=crop_flip"]).augment)

    @jax.jit
    def new(key: jax.Array, images: jax.Array) -> jax.Array:
        pixels = augment(key, images)
        assert pixels.dtype == jnp.uint8  # crop/flip only: no float conversion before
        return augment.cutout(key, preprocess(pixels, PreprocessStats(mean=mean, std=std)))

    expected = normalize(crop_flip_by_hand(key, np.asarray(images), 4))
    np.testing.assert_array_equal(new(key, images), expected)


def test_flip_mirrors_about_half_the_batch_in_place_and_keeps_the_rest():
    """augment.flip: each image is mirrored left-right (NumPy's [:, ::-1]) or left as it is,
    at its own index (its label's), about half of them mirrored, a different half per key."""
    images = pixels((1000, 5, 7, 3))  # random pixels: no image is its own mirror
    mirrored = np.asarray(images)[:, :, ::-1]
    augment = jax.jit(make_augment(augment_config(flip=True)))
    masks = []
    for seed in (1, 2):
        out = np.asarray(augment(jax.random.PRNGKey(seed), images))
        flipped = np.array([np.array_equal(o, m) for o, m in zip(out, mirrored, strict=True)])
        kept = np.array([np.array_equal(o, i) for o, i in zip(out, np.asarray(images),
                                                               strict=True)])
        assert np.all(flipped != kept), "an image neither kept nor mirrored in place"
        assert 430 < flipped.sum() < 570  # Binomial(1000, 1/2): mean 500, sd 16
        masks.append(flipped)
    assert 0.4 < np.mean(masks[0] == masks[1]) < 0.6  # independent draws per key


def test_every_operation_is_deterministic_per_key_and_differs_across_keys():
    cfg = augment_config(crop_pad=2, flip=True, resized_crop=True, brightness=0.4,
                         contrast=0.4, saturation=0.4, lighting=0.1, cutout=3, mixup=1.0)
    pca = (np.array([0.2, 0.02, 0.004], np.float32), np.eye(3, dtype=np.float32))
    augment = make_augment(cfg, pca)
    images, labels = pixels((16, 8, 8, 3)), jnp.arange(16) % 10

    @jax.jit
    def run(key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        x = augment.cutout(key, augment(key, images))
        return augment.mixup(key, x, labels)

    a, b, c = run(jax.random.PRNGKey(0)), run(jax.random.PRNGKey(0)), run(jax.random.PRNGKey(1))
    for left, right in zip(a, b, strict=True):
        np.testing.assert_array_equal(left, right)
    assert not np.array_equal(a[0], c[0]) and float(a[2]) != float(c[2])


def test_augment_none_keeps_the_batch_and_presets_all_build_and_run():
    images = pixels((4, 8, 8, 3))
    none = make_augment(augment_config())
    np.testing.assert_array_equal(none(jax.random.PRNGKey(0), images), images)
    pca = (np.array([0.2, 0.02, 0.004], np.float32), np.eye(3, dtype=np.float32))
    for preset in group_options("augment"):
        cfg = compose_config([f"augment={preset}", "dataset=cifar10"])
        validate(cfg)
        augment = make_augment(cfg.augment, pca)
        out = jax.jit(augment)(jax.random.PRNGKey(0), images)
        assert out.shape == images.shape, preset
    with pytest.raises(ValueError, match="channel_pca"):
        make_augment(compose_config(["augment=alexnet"]).augment)


def test_make_augment_refuses_a_partial_config_naming_the_missing_keys():
    with pytest.raises(ConfigError, match="lacks crop_pad, flip, .*affine"):
        make_augment(OmegaConf.create({"cutout": 3}))
    partial = augment_config()
    del partial.affine.shear
    with pytest.raises(ConfigError, match=r"lacks affine\.shear:"):
        make_augment(partial)


@pytest.mark.parametrize(("override", "message"), [
    ("augment.mixup=-1", "augment.mixup=-1.0 must be >= 0"),
    ("augment.cutout=-2", "augment.cutout=-2 must be >= 0"),
    ("augment.brightness=-0.1", "augment.brightness=-0.1 must be >= 0"),
    ("augment.saturation=-1", "augment.saturation=-1.0 must be >= 0"),
    ("augment.lighting=-0.1", "augment.lighting=-0.1 must be >= 0"),
    ("augment.crop_scale=[0.5,0.2]", r"augment.crop_scale=\[0.5, 0.2\] must be \[min, max\]"),
    ("augment.crop_scale=[0.5,1.5]", r"augment.crop_scale=\[0.5, 1.5\] must be area fractions"),
    ("augment.crop_ratio=[0,1]", r"augment.crop_ratio=\[0.0, 1.0\] must be \[min, max\] with 0"),
    ("augment.crop_ratio=[2]", r"augment.crop_ratio=\[2.0\] must be \[min, max\]"),
])
def test_bad_values_fail_with_one_line_naming_value_and_range(override, message):
    with pytest.raises(ConfigError, match=message) as error:
        validate(compose_config([override]))
    assert "\n" not in str(error.value)


# --------------------------------------------------------------------- random-resized crop

def test_resized_crop_of_the_whole_image_is_the_identity():
    images = pixels((8, 12, 12, 3))
    out = jax.jit(aug.random_resized_crop, static_argnums=(2, 3))(
        jax.random.PRNGKey(0), images, (1.0, 1.0), (1.0, 1.0))
    np.testing.assert_allclose(out, unit(images), atol=1e-6)


def test_crop_box_area_and_log_aspect_ratio_follow_their_uniform_distributions():
    # Every draw fits (largest side sqrt(0.5 * 4/3) < 1), so the first one is used; at 224 px
    # rounding to whole pixels moves the statistics by well under the tolerances.
    n, size, scale, ratio = 20000, 224, (0.1, 0.5), (3 / 4, 4 / 3)
    top, left, h, w = (np.asarray(a) for a in jax.jit(
        aug.sample_crop_boxes, static_argnums=range(1, 6))(
        jax.random.PRNGKey(0), n, size, size, scale, ratio))
    area = h * w / size**2
    assert area.min() >= 0.095 and area.max() <= 0.505
    assert area.mean() == pytest.approx(0.3, abs=0.004)
    assert area.var() == pytest.approx(0.4**2 / 12, rel=0.03)
    log_ratio = np.log(w / h)
    span = 2 * math.log(4 / 3)
    assert abs(log_ratio.mean()) < 0.003
    assert log_ratio.var() == pytest.approx(span**2 / 12, rel=0.03)
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= size).all() and (left + w <= size).all()
    # The offset is uniform over the positions that fit: its mean is half the slack.
    assert (top / (size - h)).mean() == pytest.approx(0.5, abs=0.01)


def test_boxes_that_never_fit_fall_back_to_torchvisions_centre_crop():
    # Area 1 with ratio 2 never fits a square image: w = 8, h = round(8 / 2), centred.
    top, left, h, w = jax.jit(aug.sample_crop_boxes, static_argnums=range(1, 6))(
        jax.random.PRNGKey(0), 5, 8, 8, (1.0, 1.0), (2.0, 2.0))
    assert np.asarray(top).tolist() == [2] * 5 and np.asarray(left).tolist() == [0] * 5
    assert np.asarray(h).tolist() == [4] * 5 and np.asarray(w).tolist() == [8] * 5


def bilinear_by_hand(image: np.ndarray, top: int, left: int, h: int, w: int,
                     out_h: int, out_w: int) -> np.ndarray:
    """PyTorch's upsample_bilinear2d (align_corners=False) of image[top:top+h, left:left+w]."""
    crop = image[top:top + h, left:left + w]
    out = np.zeros((out_h, out_w, image.shape[-1]))
    for y in range(out_h):
        sy = max((y + 0.5) * h / out_h - 0.5, 0.0)
        y0 = int(sy)
        y1, ly = min(y0 + 1, h - 1), sy - y0
        for x in range(out_w):
            sx = max((x + 0.5) * w / out_w - 0.5, 0.0)
            x0 = int(sx)
            x1, lx = min(x0 + 1, w - 1), sx - x0
            out[y, x] = ((1 - ly) * ((1 - lx) * crop[y0, x0] + lx * crop[y0, x1])
                         + ly * ((1 - lx) * crop[y1, x0] + lx * crop[y1, x1]))
    return out


def test_a_known_box_is_resized_as_bilinear_crop_then_interpolate():
    images = pixels((2, 8, 10, 3))
    boxes = [np.array(v, np.int32) for v in ([1, 0], [2, 3], [3, 8], [5, 7])]  # top, left, h, w
    out = np.asarray(jax.jit(aug.resize_boxes)(images, *boxes))
    for i in range(2):
        expected = bilinear_by_hand(unit(images)[i], *(int(b[i]) for b in boxes), 8, 10)
        np.testing.assert_allclose(out[i], expected, atol=1e-6)
    torch = pytest.importorskip("torch")
    crop = torch.tensor(unit(images)[0, 1:4, 2:7]).permute(2, 0, 1)[None]
    resized = torch.nn.functional.interpolate(crop, size=(8, 10), mode="bilinear",
                                              align_corners=False)
    np.testing.assert_allclose(out[0], resized[0].permute(1, 2, 0).numpy(), atol=1e-6)


# ----------------------------------------------------------------------------- colour jitter

def test_brightness_multiplies_each_image_by_one_uniform_factor_then_clips():
    x = jnp.asarray(np.random.default_rng(0).uniform(0.05, 0.6, (4000, 4, 4, 3)), jnp.float32)
    f = jnp.array([0.5, 1.5, 2.0, 0.0] * 1000, jnp.float32)
    np.testing.assert_array_equal(jax.jit(aug.adjust_brightness)(x, f),
                                  np.clip(np.asarray(f)[:, None, None, None] * np.asarray(x), 0, 1))
    out = np.asarray(jax.jit(aug.color_jitter, static_argnums=(2,))(jax.random.PRNGKey(0), x, 0.4))
    factor = out / np.asarray(x)  # no clipping: 0.6 * 1.4 < 1
    np.testing.assert_allclose(factor, factor[:, :1, :1, :1] * np.ones_like(factor), rtol=1e-5)
    factor = factor[:, 0, 0, 0]
    assert factor.min() >= 0.6 - 1e-6 and factor.max() <= 1.4 + 1e-6
    assert factor.mean() == pytest.approx(1.0, abs=0.01)
    assert factor.var() == pytest.approx(0.8**2 / 12, rel=0.06)


def contrast_by_hand(x: np.ndarray, f: np.ndarray) -> np.ndarray:
    gray = (x @ LUMA)[..., None] if x.shape[-1] == 3 else x
    mean = gray.mean(axis=(1, 2, 3), keepdims=True)
    f = f[:, None, None, None]
    return np.clip(f * x + (1 - f) * mean, 0, 1)


def saturation_by_hand(x: np.ndarray, f: np.ndarray) -> np.ndarray:
    if x.shape[-1] == 1:
        return x
    f = f[:, None, None, None]
    return np.clip(f * x + (1 - f) * (x @ LUMA)[..., None], 0, 1)


@pytest.mark.parametrize("channels", [3, 1])
def test_contrast_and_saturation_match_torchvisions_formulas(channels):
    x = unit(pixels((6, 5, 7, channels)))
    f = np.array([0.0, 0.3, 0.9, 1.0, 1.4, 2.5])
    contrast, saturation = jax.jit(aug.adjust_contrast), jax.jit(aug.adjust_saturation)
    np.testing.assert_allclose(contrast(jnp.float32(x), jnp.float32(f)), contrast_by_hand(x, f),
                               atol=1e-6)
    np.testing.assert_allclose(saturation(jnp.float32(x), jnp.float32(f)),
                               saturation_by_hand(x, f), atol=1e-6)
    if channels == 1:  # a grayscale image is its own grayscale: saturation is a no-op
        np.testing.assert_array_equal(saturation(jnp.float32(x), jnp.float32(f)), jnp.float32(x))


def test_color_jitter_applies_the_three_blends_in_a_random_order_per_image():
    images = pixels((64, 5, 5, 3))
    key, s = jax.random.PRNGKey(3), (0.4, 0.5, 0.6)
    out = np.asarray(jax.jit(aug.color_jitter, static_argnums=(2, 3, 4))(key, images, *s))
    # The sampling contract: factors U[1 - s, 1 + s] from keys 1..3, the order from key 0.
    order_key, *factor_keys = jax.random.split(key, 4)
    factors = [np.asarray(aug.jitter_factors(k, 64, v), np.float64)
               for k, v in zip(factor_keys, s, strict=True)]
    order = np.argsort(np.asarray(jax.random.uniform(order_key, (64, 3))), axis=1)
    adjust = [lambda x, f: np.clip(f[:, None, None, None] * x, 0, 1), contrast_by_hand,
              saturation_by_hand]
    x = unit(images)
    for i in range(64):
        xi = x[i:i + 1]
        for op in order[i]:
            xi = adjust[op](xi, factors[op][i:i + 1])
        np.testing.assert_allclose(out[i], xi[0], atol=2e-6)
    assert len({tuple(o) for o in order}) == 6  # every order occurs


# ----------------------------------------------------------------------------- PCA lighting

def test_pca_lighting_adds_p_alpha_lambda_to_every_pixel_with_the_papers_covariance():
    rng = np.random.default_rng(0)
    basis, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    eigvals, sigma, n = np.array([0.2, 0.02, 0.004]), 0.1, 40000
    x = jnp.full((n, 2, 3, 3), 0.5, jnp.float32)
    out = np.asarray(jax.jit(aug.pca_lighting, static_argnums=(4,))(
        jax.random.PRNGKey(0), x, jnp.float32(eigvals), jnp.float32(basis), sigma), np.float64)
    shift = out - 0.5
    np.testing.assert_allclose(shift, shift[:, :1, :1] * np.ones_like(shift), atol=1e-7)
    shift = shift[:, 0, 0]
    alpha = (shift @ basis) / eigvals  # shift = P (alpha * lambda)  =>  alpha = P^T shift / lambda
    np.testing.assert_allclose(basis @ (alpha * eigvals).T, shift.T, atol=1e-7)
    np.testing.assert_allclose(alpha.std(axis=0), sigma, rtol=0.02)
    assert np.abs(np.corrcoef(alpha.T) - np.eye(3)).max() < 0.03
    expected = sigma**2 * basis @ np.diag(eigvals**2) @ basis.T
    np.testing.assert_allclose(np.cov(shift.T), expected, atol=0.03 * expected.max())


def test_channel_pca_is_the_eigendecomposition_of_the_rgb_pixel_covariance():
    rng = np.random.default_rng(1)
    mix = np.array([[1.0, 0.8, 0.6], [0.0, 0.5, 0.3], [0.0, 0.0, 0.2]])
    values = np.clip(128 + 40 * rng.normal(size=(300 * 36, 3)) @ mix, 0, 255)
    images = values.astype(np.uint8).reshape(300, 6, 6, 3)
    eigvals, eigvecs = channel_pca(images)
    cov = np.cov((images.reshape(-1, 3) / 255.0).T, bias=True)
    np.testing.assert_allclose(eigvecs @ np.diag(eigvals) @ eigvecs.T, cov, atol=1e-7)
    assert list(eigvals) == sorted(eigvals, reverse=True)


# ---------------------------------------------------------------------------------- cutout

def clipped_square(size: int, extent: int, centre: int) -> set[int]:
    return set(range(max(centre - size // 2, 0), min(centre - size // 2 + size, extent)))


@pytest.mark.parametrize("size", [4, 5])
def test_cutout_zeroes_one_clipped_square_and_the_expected_share_of_pixels(size):
    n, h, w = 20000, 10, 7
    x = jnp.ones((n, h, w, 2), jnp.float32)
    out = np.asarray(jax.jit(aug.cutout, static_argnums=(2,))(jax.random.PRNGKey(0), x, size))
    zero = out == 0
    assert (zero[..., 0] == zero[..., 1]).all()  # every channel of the square
    zero = zero[..., 0]
    for i in range(200):
        rows, cols = set(np.nonzero(zero[i].any(1))[0]), set(np.nonzero(zero[i].any(0))[0])
        assert zero[i].sum() == len(rows) * len(cols)  # a full rectangle
        assert any(rows == clipped_square(size, h, c) for c in range(h)), (i, rows)
        assert any(cols == clipped_square(size, w, c) for c in range(w)), (i, cols)
    # Centres uniform over the pixels: expected share = E|rows| E|cols| / (h w).
    share = (np.mean([len(clipped_square(size, h, c)) for c in range(h)])
             * np.mean([len(clipped_square(size, w, c)) for c in range(w)]) / (h * w))
    assert zero.mean() == pytest.approx(share, rel=0.02)


def test_cutout_runs_after_preprocessing_so_the_square_is_zero_input():
    augment = make_augment(augment_config(cutout=3))
    stats = PreprocessStats(mean=jnp.array([0.5]), std=jnp.array([0.25]))
    images = pixels((8, 6, 6, 1))
    x = augment.cutout(jax.random.PRNGKey(0), preprocess(augment(jax.random.PRNGKey(0), images),
                                                         stats))
    reference = np.asarray(preprocess(images, stats))
    kept = np.asarray(x) != 0
    np.testing.assert_array_equal(np.asarray(x)[kept], reference[kept])
    assert (~kept).reshape(8, -1).sum(1).min() >= 4  # at least a 2x2 corner of each 3x3 square


# ----------------------------------------------------------------------------------- mixup

@pytest.mark.parametrize("alpha", [0.2, 1.0])
def test_mixup_lambda_follows_beta_alpha_alpha(alpha):
    x = jnp.arange(8, dtype=jnp.float32).reshape(8, 1, 1, 1)
    lam = np.asarray(jax.jit(jax.vmap(lambda k: aug.mixup(k, x, alpha)[2]))(keys(20000)))
    assert lam.min() >= 0 and lam.max() <= 1
    assert lam.mean() == pytest.approx(0.5, abs=0.01)
    assert lam.var() == pytest.approx(1 / (4 * (2 * alpha + 1)), rel=0.04)


def test_mixup_mixes_the_batch_with_a_permutation_of_itself():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 3, 3, 2)), jnp.float32)
    mixed, perm, lam = jax.jit(aug.mixup, static_argnums=(2,))(jax.random.PRNGKey(0), x, 1.0)
    perm, lam = np.asarray(perm), float(lam)
    assert sorted(perm.tolist()) == list(range(16)) and (perm != np.arange(16)).any()
    np.testing.assert_allclose(mixed, lam * np.asarray(x) + (1 - lam) * np.asarray(x)[perm],
                               atol=1e-6)


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_mixup_loss_is_lambda_ce_a_plus_one_minus_lambda_ce_b_with_or_without_smoothing():
    from cnnlab.training.optim import smoothed_cross_entropy

    rng = np.random.default_rng(0)
    logits, a, b, lam = rng.normal(size=(6, 5)), rng.integers(0, 5, 6), rng.integers(0, 5, 6), 0.3
    logp = log_softmax(logits)
    rows = np.arange(6)
    by_hand = -(lam * logp[rows, a] + (1 - lam) * logp[rows, b]).mean()

    def ce(z: jax.Array, y: jax.Array) -> jax.Array:
        return smoothed_cross_entropy(z, y, 0.0)

    loss = mixup_loss(ce, jnp.float32(lam), jnp.asarray(a), jnp.asarray(b))
    assert float(loss(jnp.float32(logits))) == pytest.approx(by_hand, rel=1e-5)
    # Label smoothing eps: the target is the mix of the two smoothed one-hot vectors.
    eps = 0.1
    target = lam * ((1 - eps) * np.eye(5)[a] + eps / 5) + (1 - lam) * ((1 - eps) * np.eye(5)[b]
                                                                     + eps / 5)
    smoothed = mixup_loss(lambda z, y: smoothed_cross_entropy(z, y, eps), jnp.float32(lam),
                              jnp.asarray(a), jnp.asarray(b))
    assert float(smoothed(jnp.float32(logits))) == pytest.approx(
        -(target * logp).sum(-1).mean(), rel=1e-5)


def test_train_step_with_mixup_logs_the_mixed_loss_and_the_dominant_labels_error():
    import flax.linen as nn
    import optax

    from cnnlab.data.device import DeviceSplit, batch_indices
    from cnnlab.training import steps

    class Linear(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
            return nn.Dense(10)(x.reshape(x.shape[0], -1))

    model, tx, batch = Linear(), optax.sgd(0.1), 16
    rng = np.random.default_rng(0)
    data = DeviceSplit(
        images=jnp.asarray(rng.integers(0, 256, (64, 6, 6, 3)), jnp.uint8),
        labels=jnp.asarray(rng.integers(0, 10, 64), jnp.int32), mask=jnp.ones(64, bool),
        stats=PreprocessStats(mean=jnp.full(3, 0.5), std=jnp.full(3, 0.25)))
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 6, 6, 3)))["params"]
    state = steps.TrainState(step=jnp.int32(3), params=params, batch_stats={},
                             opt_state=tx.init(params), rng=jax.random.PRNGKey(1))
    augment = make_augment(augment_config(crop_pad=1, flip=True, cutout=2, mixup=0.4))
    reg = OmegaConf.create({"l1": 0.0, "l2": 0.0, "apply_to": "kernels", "label_smoothing": 0.1})
    _, metrics = jax.jit(steps.make_train_step(model, tx, augment, batch, reg))(state, data)

    @jax.jit
    def inputs(state: steps.TrainState, data: DeviceSplit) -> tuple:
        # The same batch, keys and augmentation as the step draws them (cnnlab/training/steps.py).
        data_key, step_key = jax.random.split(state.rng)
        idx = batch_indices(data_key, state.step, 64, batch)
        aug_key, _ = jax.random.split(jax.random.fold_in(step_key, state.step))
        x = augment.cutout(aug_key, preprocess(augment(aug_key, data.images[idx]), data.stats))
        x, partners, lam = augment.mixup(aug_key, x, data.labels[idx])
        return model.apply({"params": params}, x), data.labels[idx], partners, lam

    logits, y, y_b, lam = inputs(state, data)
    logp = log_softmax(np.asarray(logits, np.float64))
    y, y_b, lam, rows = np.asarray(y), np.asarray(y_b), float(lam), np.arange(batch)
    mixed_ce = -(lam * logp[rows, y] + (1 - lam) * logp[rows, y_b]).mean()
    assert float(metrics["loss_sum"]) / batch == pytest.approx(mixed_ce, rel=1e-5)
    dominant = y if lam >= 0.5 else y_b
    assert int(metrics["correct"]) == int((logp.argmax(-1) == dominant).sum())
