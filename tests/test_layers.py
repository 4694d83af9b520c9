"""Initializers, activations and normalizations against their textbook definitions."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnlab.cli.preflight import validate
from cnnlab.config.schema import ActivationConfig
from cnnlab.errors import ConfigError
from cnnlab.models.layers import ACTIVATIONS, INITIALIZERS, NORMS, build_layers
from tests.helpers import compose_config

KEY = jax.random.PRNGKey(0)
# n_in != n_out, so that fan_in, fan_out and their average give different variances.
DENSE = (1000, 500)
# A conv kernel (kh, kw, c_in, c_out): n_in = 3*3*256 = 2304, n_out = 3*3*512 = 4608.
CONV = (3, 3, 256, 512)


def fans(shape: tuple[int, ...]) -> tuple[int, int]:
    """(n_in, n_out) as the papers count them: every weight one unit sees, or feeds."""
    receptive = math.prod(shape[:-2])
    return receptive * shape[-2], receptive * shape[-1]


VARIANCE = {
    "lecun_normal": lambda n_in, n_out: 1 / n_in,
    "lecun_uniform": lambda n_in, n_out: 1 / n_in,
    "glorot_normal": lambda n_in, n_out: 2 / (n_in + n_out),
    "glorot_uniform": lambda n_in, n_out: 2 / (n_in + n_out),
    "he_normal": lambda n_in, n_out: 2 / n_in,
    "he_uniform": lambda n_in, n_out: 2 / n_in,
    "he_normal_fan_out": lambda n_in, n_out: 2 / n_out,
    "he_uniform_fan_out": lambda n_in, n_out: 2 / n_out,
    "torch_uniform": lambda n_in, n_out: 1 / (3 * n_in),
}
# The interval's half-width a as the papers state it (U(-a, a) has variance a^2 / 3).
BOUND = {
    "lecun_uniform": lambda n_in, n_out: math.sqrt(3 / n_in),
    "glorot_uniform": lambda n_in, n_out: math.sqrt(6 / (n_in + n_out)),
    "he_uniform": lambda n_in, n_out: math.sqrt(6 / n_in),
    "he_uniform_fan_out": lambda n_in, n_out: math.sqrt(6 / n_out),
    "torch_uniform": lambda n_in, n_out: 1 / math.sqrt(n_in),
}


def draw(name: str, shape: tuple[int, ...]) -> np.ndarray:
    return np.asarray(INITIALIZERS.get(name)(KEY, shape, jnp.float32), dtype=np.float64)


@pytest.mark.parametrize("shape", [DENSE, CONV], ids=["dense", "conv"])
@pytest.mark.parametrize("name", sorted(VARIANCE))
def test_initializer_variance_matches_its_formula(name, shape):
    w = draw(name, shape)
    variance = VARIANCE[name](*fans(shape))
    assert w.var() == pytest.approx(variance, rel=0.03)
    assert abs(w.mean()) < 0.01 * math.sqrt(variance)
    if name in BOUND:
        bound = BOUND[name](*fans(shape))
        assert np.abs(w).max() <= bound * (1 + 1e-6)
        assert np.abs(w).max() >= bound * 0.999
    else:
        # An untruncated normal: 4.55% of draws lie beyond 2 sigma (a truncated one has none).
        beyond = np.mean(np.abs(w) > 2 * math.sqrt(variance))
        assert beyond == pytest.approx(0.0455, abs=0.003)


@pytest.mark.parametrize("name, gain", [("orthogonal", 1.0), ("orthogonal_relu", 2.0**0.5)])
def test_orthogonal_columns_are_orthonormal_times_the_gain(name, gain):
    # Conv kernel flattened to (kh*kw*c_in) x c_out: tall, so its columns are orthonormal.
    w = draw(name, CONV).reshape(-1, CONV[-1])
    np.testing.assert_allclose(w.T @ w, gain**2 * np.eye(CONV[-1]), atol=1e-4)
    square = draw(name, (512, 512))
    np.testing.assert_allclose(square.T @ square, gain**2 * np.eye(512), atol=1e-4)
    # Wider than tall: the rows are the orthonormal ones.
    wide = draw(name, (256, 1024))
    np.testing.assert_allclose(wide @ wide.T, gain**2 * np.eye(256), atol=1e-4)


def test_zeros_and_fan_initializers_on_a_bias():
    assert not draw("zeros", (7,)).any()
    with pytest.raises(ConfigError, match="initializer 'he_normal' .* use init.bias=zeros"):
        draw("he_normal", (7,))
    with pytest.raises(ConfigError) as info:
        validate(compose_config(["init.bias=orthogonal"]))
    assert "init.bias='orthogonal'" in str(info.value) and "valid choices: zeros" in str(
        info.value) and "\n" not in str(info.value)


def activation(name: str, **options: float):
    return ACTIVATIONS.get(name)(ActivationConfig(name=name, **options))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def phi(x: float) -> float:
    """The standard normal CDF."""
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


# (name, options, x, f(x), f'(x)), values from the definitions.
ACTIVATION_POINTS = [
    ("sigmoid", {}, 0.0, 0.5, 0.25),
    ("sigmoid", {}, 2.0, sigmoid(2), sigmoid(2) * (1 - sigmoid(2))),
    ("tanh", {}, 0.0, 0.0, 1.0),
    ("tanh", {}, 0.5, math.tanh(0.5), 1 - math.tanh(0.5) ** 2),
    ("scaled_tanh", {}, 0.0, 0.0, 1.7159 * 2 / 3),
    ("relu", {}, 2.0, 2.0, 1.0),
    ("relu", {}, -2.0, 0.0, 0.0),
    ("leaky_relu", {"negative_slope": 0.01}, -2.0, -2 * 0.01, 0.01),
    ("leaky_relu", {"negative_slope": 0.2}, -2.0, -2 * 0.2, 0.2),
    ("leaky_relu", {"negative_slope": 0.2}, -1.0, -0.2, 0.2),
    ("leaky_relu", {"negative_slope": 0.2}, 3.0, 3.0, 1.0),
    ("elu", {}, -1.0, math.exp(-1) - 1, math.exp(-1)),
    ("elu", {}, 2.0, 2.0, 1.0),
    ("gelu", {}, 0.0, 0.0, 0.5),
    # Phi(1) = 0.8413447; the tanh approximation gives 0.841192, outside the tolerance.
    ("gelu", {}, 1.0, phi(1), phi(1) + math.exp(-0.5) / math.sqrt(2 * math.pi)),
    ("gelu", {}, -1.0, -phi(-1), phi(-1) - math.exp(-0.5) / math.sqrt(2 * math.pi)),
    ("silu", {}, 0.0, 0.0, 0.5),
    ("silu", {}, 1.0, sigmoid(1), sigmoid(1) * (1 + 1 - sigmoid(1))),
]


@pytest.mark.parametrize("name, options, x, value, slope", ACTIVATION_POINTS)
def test_activation_value_and_derivative(name, options, x, value, slope):
    f = activation(name, **options)
    assert float(f(jnp.float32(x))) == pytest.approx(value, abs=1e-6)
    assert float(jax.grad(f)(jnp.float32(x))) == pytest.approx(slope, abs=1e-6)


def test_scaled_tanh_maps_plus_minus_one_to_plus_minus_one():
    f = activation("scaled_tanh")
    assert float(f(jnp.float32(1.0))) == pytest.approx(1.0, abs=1e-3)
    assert float(f(jnp.float32(-1.0))) == pytest.approx(-1.0, abs=1e-3)


@pytest.mark.parametrize("slope", [0.0, -0.1, 1.0, 1.5])
def test_bad_leaky_slope_is_a_one_line_error(slope):
    cfg = compose_config(["activation=leaky_relu", f"activation.negative_slope={slope}"])
    for check in (lambda: build_layers(cfg.init, cfg.activation, cfg.norm),
                  lambda: validate(cfg)):
        with pytest.raises(ConfigError) as info:
            check()
        assert f"activation.negative_slope={slope} must be in (0, 1)" in str(info.value)
        assert "\n" not in str(info.value)


def norm_module(name: str, **options: float):
    return NORMS.get(name)(**options)()


def lrn_by_hand(a: np.ndarray, n: int, k: float, alpha: float, beta: float) -> np.ndarray:
    """Krizhevsky et al. 2012, section 3.3, written as the formula reads."""
    channels = a.shape[-1]
    b = np.empty_like(a)
    for i in range(channels):
        total = np.zeros(a.shape[:-1])
        for j in range(max(0, i - n // 2), min(channels - 1, i + n // 2) + 1):
            total += a[..., j] ** 2
        b[..., i] = a[..., i] / (k + alpha * total) ** beta
    return b


@pytest.mark.parametrize("n, k, alpha, beta, scale", [
    (5, 2.0, 1e-4, 0.75, 30.0),  # AlexNet's constants, inputs large enough for alpha to matter
    (3, 1.0, 0.5, 0.75, 1.0),
    (7, 0.5, 0.1, 0.5, 2.0),
])
def test_lrn_matches_the_paper_formula(n, k, alpha, beta, scale):
    x = scale * np.random.default_rng(0).normal(size=(2, 3, 4, 9))
    module = norm_module("lrn", size=n, k=k, alpha=alpha, beta=beta)
    y = module.apply({}, jnp.asarray(x, jnp.float32), False)
    np.testing.assert_allclose(np.asarray(y), lrn_by_hand(x, n, k, alpha, beta), rtol=1e-5,
                               atol=1e-6)


def inputs(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Offsets and scales that differ per example and per channel, so the axes matter."""
    rng = np.random.default_rng(seed)
    n, c = shape[0], shape[-1]
    offset = rng.normal(size=(n, 1, 1, c)) * 3
    scale = rng.uniform(0.5, 3, size=(n, 1, 1, c))
    return offset + scale * rng.normal(size=shape)


@pytest.mark.parametrize("channels, num_groups, groups", [
    (64, 32, 32), (16, 32, 16), (48, 32, 16), (6, 4, 2)])
def test_group_norm_normalizes_each_example_and_group(channels, num_groups, groups):
    x = inputs((2, 5, 5, channels))
    module = norm_module("group", num_groups=num_groups, epsilon=1e-5)
    variables = module.init(KEY, jnp.zeros_like(x))
    y = np.asarray(module.apply(variables, jnp.asarray(x, jnp.float32), False), np.float64)
    grouped_x = x.reshape(2, 5, 5, groups, channels // groups)
    grouped_y = y.reshape(grouped_x.shape)
    np.testing.assert_allclose(grouped_y.mean(axis=(1, 2, 4)), 0, atol=1e-5)
    np.testing.assert_allclose(grouped_y.var(axis=(1, 2, 4)), 1, atol=1e-3)
    mean = grouped_x.mean(axis=(1, 2, 4), keepdims=True)
    var = grouped_x.var(axis=(1, 2, 4), keepdims=True)
    np.testing.assert_allclose(grouped_y, (grouped_x - mean) / np.sqrt(var + 1e-5), atol=1e-4)


def test_layer_norm_normalizes_each_example_over_h_w_c():
    x = inputs((3, 4, 5, 8))
    module = norm_module("layer", epsilon=1e-5)
    variables = module.init(KEY, jnp.zeros_like(x))
    # Per-channel scale and shift, at 1 and 0.
    leaves = jax.tree_util.tree_leaves(variables["params"])
    assert sorted(leaf.shape for leaf in leaves) == [(8,), (8,)]
    y = np.asarray(module.apply(variables, jnp.asarray(x, jnp.float32), False), np.float64)
    np.testing.assert_allclose(y.mean(axis=(1, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(y.var(axis=(1, 2, 3)), 1, atol=1e-3)
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    var = x.var(axis=(1, 2, 3), keepdims=True)
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-5), atol=1e-4)


def test_batch_norm_uses_batch_statistics_in_training_and_running_ones_in_eval():
    x = inputs((8, 4, 4, 3))
    momentum, eps = 0.9, 1e-5
    module = norm_module("batch", momentum=momentum, epsilon=eps, running_var="biased")
    variables = module.init(KEY, jnp.zeros_like(x))
    y, updates = module.apply(variables, jnp.asarray(x, jnp.float32), True,
                              mutable=["batch_stats"])
    y = np.asarray(y, np.float64)
    np.testing.assert_allclose(y.mean(axis=(0, 1, 2)), 0, atol=1e-5)
    np.testing.assert_allclose(y.var(axis=(0, 1, 2)), 1, atol=1e-3)

    stats = jax.tree_util.tree_leaves_with_path(updates["batch_stats"])
    stats = {jax.tree_util.keystr(path).split("'")[-2]: np.asarray(v) for path, v in stats}
    batch_mean, batch_var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
    # Running averages start at mean 0, var 1; flax averages the biased batch variance.
    np.testing.assert_allclose(stats["mean"], momentum * 0 + (1 - momentum) * batch_mean,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["var"], momentum * 1 + (1 - momentum) * batch_var,
                               rtol=1e-5)

    evaluated = module.apply({**variables, **updates}, jnp.asarray(x, jnp.float32), False)
    expected = (x - stats["mean"]) / np.sqrt(stats["var"] + eps)
    np.testing.assert_allclose(np.asarray(evaluated), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("norm, conv_bias", [
    ("none", True), ("lrn", True), ("batch", False), ("group", False), ("layer", False)])
def test_convs_keep_a_bias_only_before_norms_without_a_shift(norm, conv_bias):
    cfg = compose_config([f"norm={norm}"])
    assert build_layers(cfg.init, cfg.activation, cfg.norm).conv_bias is conv_bias


@pytest.mark.parametrize("overrides, message", [
    (["norm=lrn", "norm.momentum=0.9"],
     "norm.momentum does not apply to norm=lrn; its keys: size, k, alpha, beta"),
    (["norm=group", "norm.size=3"], "norm.size does not apply to norm=group"),
    (["norm=group", "norm.num_groups=0"], "norm.num_groups=0 must be a positive integer"),
    (["norm=lrn", "norm.size=0"], "norm.size=0 must be a positive integer"),
])
def test_bad_norm_keys_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError) as info:
        validate(compose_config(overrides))
    assert message in str(info.value) and "\n" not in str(info.value)


# A built model with each initializer, activation and norm: tests/test_techniques_run.py
# (test_init_activation_and_norm_reach_every_layer_of_a_model).


def test_batch_norm_running_variance_is_unbiased_by_default():
    """The BN paper's inference rule (Ioffe & Szegedy 2015, Alg. 2) and PyTorch: the running
    variance averages n/(n-1) times each batch's variance, n the values per channel."""
    x = inputs((8, 4, 4, 3))
    module = norm_module("batch", momentum=0.9, epsilon=1e-5, running_var="unbiased")
    variables = module.init(KEY, jnp.zeros_like(x))
    y, updates = module.apply(variables, jnp.asarray(x, jnp.float32), True,
                              mutable=["batch_stats"])
    var = np.asarray(updates["batch_stats"]["BatchNorm_0"]["var"])
    n = 8 * 4 * 4
    np.testing.assert_allclose(var, 0.9 + 0.1 * x.var(axis=(0, 1, 2)) * n / (n - 1), rtol=1e-5)
    # Training itself normalizes by the biased batch variance either way.
    np.testing.assert_allclose(np.asarray(y, np.float64).var(axis=(0, 1, 2)), 1, atol=1e-3)
    with pytest.raises(ConfigError, match="norm.running_var='both'; valid choices"):
        norm_module("batch", momentum=0.9, epsilon=1e-5, running_var="both")
