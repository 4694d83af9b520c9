"""Pluggable layer parts: initializers, activations and normalizations, each a registry.

Blocks never hard-code these: a model receives a `Layers` bundle built from the config groups
`init`, `activation` and `norm`, so `init=glorot_uniform activation=tanh norm=none` changes every
layer of every model the same way.
"""

import contextlib
import contextvars
import dataclasses
import functools
import inspect
import math
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnlab import parallel
from cnnlab.errors import ConfigError
from cnnlab.models import conv, geometry
from cnnlab.models.conv_choice import XLA_CONV, ConvChoice
from cnnlab.registry import Registry

Initializer = Callable[..., jax.Array]
Activation = Callable[[jax.Array], jax.Array]


def _needs_fan(name: str, init: Initializer) -> Initializer:
    """Refuse 1-D shapes in a clear message: a bias has no fan in or out to scale by."""

    def checked(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        if len(shape) < 2:
            raise ConfigError(f"initializer '{name}' scales by a weight's fan and cannot "
                              f"initialize the {tuple(shape)} bias; use init.bias=zeros")
        return init(key, shape, dtype)

    return checked


# Fans as jax computes them: a conv kernel (kh, kw, c_in, c_out) has n_in = kh*kw*c_in and
# n_out = kh*kw*c_out (for grouped convs c_in is per group but c_out is not, as in PyTorch).
# "normal" is the plain untruncated normal: the papers' variance formulas are stated for it.
_VARIANCE_SCALING = {
    # LeCun et al. 1998 (Efficient BackProp, section 4.6): Var = 1/n_in.
    "lecun_normal": (1.0, "fan_in", "normal"),
    "lecun_uniform": (1.0, "fan_in", "uniform"),
    # Glorot & Bengio 2010, eq. 12 and 16: Var = 2/(n_in + n_out).
    "glorot_normal": (1.0, "fan_avg", "normal"),
    "glorot_uniform": (1.0, "fan_avg", "uniform"),
    # He et al. 2015, eq. 10: Var = 2/n_in keeps forward activations' scale under ReLU;
    # eq. 14 (the backward case): Var = 2/n_out keeps the gradients' scale instead.
    "he_normal": (2.0, "fan_in", "normal"),
    "he_uniform": (2.0, "fan_in", "uniform"),
    "he_normal_fan_out": (2.0, "fan_out", "normal"),
    "he_uniform_fan_out": (2.0, "fan_out", "uniform"),
    # Torch7's nn.Linear / SpatialConvolution reset(): U[-1/sqrt(n_in), 1/sqrt(n_in)], whose
    # variance is 1/(3 n_in); PyTorch's default weight init draws from the same interval.
    "torch_uniform": (1.0 / 3.0, "fan_in", "uniform"),
}

INITIALIZERS: Registry[Initializer] = Registry("initializer")
for _name, (_scale, _mode, _distribution) in _VARIANCE_SCALING.items():
    INITIALIZERS.register(
        _name, _needs_fan(_name, nn.initializers.variance_scaling(_scale, _mode, _distribution)))
# Saxe et al. 2014: orthogonal weights over the flattened fan-in (kh*kw*c_in) x c_out; the gain
# sqrt(2) for ReLU is He et al. 2015's factor (PyTorch's calculate_gain("relu")).
INITIALIZERS.register("orthogonal", _needs_fan("orthogonal", nn.initializers.orthogonal(1.0)))
INITIALIZERS.register(
    "orthogonal_relu", _needs_fan("orthogonal_relu", nn.initializers.orthogonal(2.0**0.5)))
INITIALIZERS.register("zeros", nn.initializers.zeros)
# A bias has no fan to scale by, so of the above only these can initialize one.
BIAS_INITIALIZERS = ("zeros",)


@dataclasses.dataclass(frozen=True)
class LeakyReLU:
    """Maas et al. 2013: f(x) = x for x > 0, negative_slope * x otherwise."""

    negative_slope: float

    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.leaky_relu(x, self.negative_slope)


def _fixed(fn: Activation) -> Callable[[Any], Activation]:
    return lambda cfg: fn


def _leaky_relu(cfg: Any) -> Activation:
    slope = cfg.negative_slope
    # Outside (0, 1) it is no longer a leaky ReLU: 0 is relu, 1 the identity, < 0 not monotone.
    if slope is None or not 0 < slope < 1:
        raise ConfigError(f"activation.negative_slope={slope} must be in (0, 1) "
                          "(0.01 to 0.3 is the usual range)")
    return LeakyReLU(float(slope))


# Each entry builds the activation from the activation config node.
ACTIVATIONS: Registry[Callable[[Any], Activation]] = Registry("activation")
ACTIVATIONS.register("relu", _fixed(nn.relu))
ACTIVATIONS.register("leaky_relu", _leaky_relu)
ACTIVATIONS.register("sigmoid", _fixed(nn.sigmoid))
ACTIVATIONS.register("tanh", _fixed(jnp.tanh))
# LeCun et al. 1998 (Appendix A): f(x) = 1.7159 tanh(2x/3), so that f(+-1) = +-1.
ACTIVATIONS.register("scaled_tanh", _fixed(lambda x: 1.7159 * jnp.tanh(2.0 / 3.0 * x)))
# Clevert et al. 2016: x for x > 0, alpha (e^x - 1) otherwise, alpha = 1.
ACTIVATIONS.register("elu", _fixed(nn.elu))
# Hendrycks & Gimpel 2016: x * Phi(x) with the exact normal CDF (flax defaults to the tanh
# approximation).
ACTIVATIONS.register("gelu", _fixed(functools.partial(nn.gelu, approximate=False)))
# Elfwing et al. 2018 (SiLU), Ramachandran et al. 2017 (Swish, beta = 1): x * sigmoid(x).
ACTIVATIONS.register("silu", _fixed(nn.silu))


# Where an activation's output goes while it is traced: cnnlab/training/diagnostics.py sets a
# recorder
# while it traces its own function; every other trace (the training step) has none, so the
# check below runs once per trace in Python and adds nothing to the compiled program.
_RECORDER: contextvars.ContextVar[Callable[[jax.Array], None] | None] = contextvars.ContextVar(
    "activation_recorder", default=None)


@contextlib.contextmanager
def recording_activations(record: Callable[[jax.Array], None]) -> Iterator[None]:
    """Within it, every `Layers.act` output traced is passed to `record`."""
    token = _RECORDER.set(record)
    try:
        yield
    finally:
        _RECORDER.reset(token)


@dataclasses.dataclass(frozen=True)
class Recorded:
    """An activation that shows its output to the recorder, if one is set (diagnostics)."""

    fn: Activation

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.fn(x)
        if (record := _RECORDER.get()) is not None:
            record(y)
        return y


class Identity(nn.Module):
    """The `norm=none` choice: keeps block code free of `if norm` branches."""

    # Every norm takes the compute dtype (`build_layers`); nothing to compute here.
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        return x


class BatchNorm(nn.Module):
    """BatchNorm taking `train` at call time; batch statistics in training, running ones in eval.

    With `unbiased`, the running variance averages n/(n-1) times each batch's variance (n the
    values per channel), as the BN paper's inference rule and PyTorch do; Flax's own averages the
    biased one. Its variables keep Flax's names, so checkpoints of either kind load in the other.
    """

    momentum: float
    epsilon: float
    unbiased: bool = True
    # Top-level layers whose batch norms stay at their running statistics even in training
    # (transfer learning's frozen layers, cnnlab/transfer): they normalize as at test time and
    # their statistics do not move.
    frozen_layers: tuple[str, ...] = ()
    # The output's dtype (train.precision): Flax would otherwise promote bfloat16 inputs to the
    # float32 of its scale and bias. Batch statistics are computed in float32 either way (Flax's
    # force_float32_reductions) and the running ones are kept in float32.
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        train = train and not (self.path and self.path[0] in self.frozen_layers)
        norm = nn.BatchNorm(use_running_average=not train, momentum=self.momentum,
                            epsilon=self.epsilon, dtype=self.dtype)
        y = norm(x)
        if train and self.unbiased and not self.is_initializing():
            # Flax stored m * old + (1 - m) * var; add (1 - m) * var / (n - 1) to make the batch
            # term n/(n-1) var. The variance is Flax's own formula on the same values, so XLA
            # computes it once.
            axes = tuple(range(x.ndim - 1))
            n = math.prod(x.shape[:-1])
            x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
            mean = jnp.mean(x32, axes)
            var = jnp.maximum(jnp.mean(jnp.square(x32), axes) - jnp.square(mean), 0.0)
            stored = norm.get_variable("batch_stats", "var")
            norm.put_variable("batch_stats", "var",
                              stored + (1.0 - self.momentum) * var / max(n - 1, 1))
        return y


class LocalResponseNorm(nn.Module):
    """Krizhevsky et al. 2012, section 3.3: b_i = a_i / (k + alpha * sum_j a_j^2) ** beta, the sum
    running over the `size` channels centred on i (clipped at the edges).

    As in the paper, alpha multiplies the plain sum; PyTorch and Caffe divide alpha by `size`.
    """

    size: int
    k: float
    alpha: float
    beta: float
    # Output dtype; None: the input's (a stack's own `lrn` entries).
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        half = self.size // 2
        # The sum of squares in at least float32: bfloat16's 8 bits would round it coarsely.
        x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        squares = jax.lax.reduce_window(
            jnp.square(x32), 0.0, jax.lax.add, (1, 1, 1, self.size), (1, 1, 1, 1),
            ((0, 0), (0, 0), (0, 0), (half, self.size - 1 - half)))
        return (x32 / (self.k + self.alpha * squares) ** self.beta).astype(self.dtype or x.dtype)


class GroupNorm(nn.Module):
    """Wu & He 2018: normalize each example over (H, W, C / G) per group of C / G channels.

    A layer with C channels uses gcd(num_groups, C) groups: num_groups when it divides C (the
    paper's G = 32 for widths 64 and up), C when C divides num_groups (one channel per group,
    e.g. 16 channels), and fewer otherwise, so that every model builds with any width.
    """

    num_groups: int
    epsilon: float
    # Output dtype; the statistics are float32 (as in BatchNorm).
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        groups = math.gcd(self.num_groups, x.shape[-1])
        return nn.GroupNorm(num_groups=groups, epsilon=self.epsilon, dtype=self.dtype)(x)


class LayerNorm(nn.Module):
    """Ba et al. 2016: normalize each example over all units of the layer, (H, W, C) for a
    feature map, with a learned scale and shift per channel."""

    epsilon: float
    # Output dtype; the statistics are float32 (as in BatchNorm).
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        return nn.LayerNorm(epsilon=self.epsilon, reduction_axes=tuple(range(1, x.ndim)),
                            feature_axes=-1, dtype=self.dtype)(x)


RUNNING_VARS = ("unbiased", "biased")


def _batch(momentum: float, epsilon: float, running_var: str) -> Callable[[], nn.Module]:
    if running_var not in RUNNING_VARS:
        raise ConfigError(f"norm.running_var='{running_var}'; valid choices: "
                          f"{', '.join(RUNNING_VARS)}")
    return functools.partial(BatchNorm, momentum=momentum, epsilon=epsilon,
                             unbiased=running_var == "unbiased")


def _lrn(size: int, k: float, alpha: float, beta: float) -> Callable[[], nn.Module]:
    if size < 1:
        raise ConfigError(f"norm.size={size} must be a positive integer")
    return functools.partial(LocalResponseNorm, size=size, k=k, alpha=alpha, beta=beta)


def _group(num_groups: int, epsilon: float) -> Callable[[], nn.Module]:
    if num_groups < 1:
        raise ConfigError(f"norm.num_groups={num_groups} must be a positive integer")
    return functools.partial(GroupNorm, num_groups=num_groups, epsilon=epsilon)


def _layer(epsilon: float) -> Callable[[], nn.Module]:
    return functools.partial(LayerNorm, epsilon=epsilon)


# Each entry builds a norm module factory from the norm config's extra keys.
NORMS: Registry[Callable[..., Callable[[], nn.Module]]] = Registry("norm")
NORMS.register("none", lambda: Identity)
NORMS.register("batch", _batch)
NORMS.register("lrn", _lrn)
NORMS.register("group", _group)
NORMS.register("layer", _layer)
# Norms without a learned shift: the convolution before them keeps its bias.
NORMS_WITHOUT_SHIFT = ("none", "lrn")

# train.precision -> the compute dtype of every layer. Parameters, optimizer state and BN
# running statistics stay float32 whatever it is (mixed precision, Micikevicius et al. 2018):
# bfloat16 has float32's exponent range, so unlike float16 it needs no loss scaling.
PRECISIONS: Registry[Any] = Registry("train.precision")


def at_least_float32(x: jax.Array) -> jax.Array:
    """`x` in float32, or kept in a wider float (float64 tests): logits and sums that bfloat16
    would round too coarsely."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))
PRECISIONS.register("fp32", jnp.float32)
PRECISIONS.register("bf16", jnp.bfloat16)


@dataclasses.dataclass(frozen=True)
class InputFit:
    """Bring images to the size a model was designed for: `resize` (bilinear, antialiased) or
    `pad` (centred zero padding, as LeCun et al. padded 28x28 digits to 32x32)."""

    size: int | None = None
    mode: str = "resize"

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.size is None or x.shape[1:3] == (self.size, self.size):
            return x
        n, h, w, c = x.shape
        if self.mode == "resize":
            return jax.image.resize(x, (n, self.size, self.size, c), "bilinear")
        if h > self.size or w > self.size:
            raise ConfigError(f"model.input_size={self.size} with input_fit=pad cannot hold a "
                              f"{h}x{w} input; use model.input_fit=resize")
        top, left = (self.size - h) // 2, (self.size - w) // 2
        return jnp.pad(x, ((0, 0), (top, self.size - h - top), (left, self.size - w - left),
                           (0, 0)))


@dataclasses.dataclass(frozen=True)
class Layers:
    """What every block needs to build its layers; one instance per model."""

    conv_init: Initializer
    dense_init: Initializer
    bias_init: Initializer
    act: Activation
    norm: Callable[[], nn.Module]
    # A convolution followed by a norm with a learned shift needs no bias (it would be
    # subtracted away); LRN has no shift, so convolutions before it keep theirs.
    conv_bias: bool
    # None: lax.conv_general_dilated. On CPU, `train.conv_impl`'s choice (conv_choice.py);
    # its default is a version with a fast kernel gradient (conv.py).
    conv_impl: Callable | None = None
    # The compute dtype (PRECISIONS); parameters are created in float32 whatever it is and
    # cast to it where used, so their gradients and the optimizer stay float32.
    dtype: Any = None

    def conv(self, x: jax.Array, features: int, kernel: int, stride: int = 1,
             padding: geometry.Padding = "same", groups: int = 1, name: str | None = None,
             label: str | None = None) -> jax.Array:
        """Apply a kernel x kernel convolution to `x`, refusing geometry that does not tile.

        `label` names the layer in the error message (default: `name`).
        """
        pads = geometry.window_pads(label or name or "conv", x.shape[1:3], kernel, stride,
                                    padding)
        return nn.Conv(
            features,
            (kernel, kernel),
            strides=(stride, stride),
            padding=pads,
            feature_group_count=groups,
            use_bias=self.conv_bias,
            kernel_init=self.conv_init,
            bias_init=self.bias_init,
            conv_general_dilated=self.conv_impl,
            dtype=self.dtype,
            name=name,
        )(x)

    def stored(self, x: jax.Array) -> jax.Array:
        """`x`, kept in a buffer of its own on CPU (cnnlab.models.conv.stored: XLA:CPU would
        recompute a residual stream's whole chain in each consumer); unchanged elsewhere."""
        return x if self.conv_impl is None else conv.stored(x)

    def dense(self, features: int, name: str | None = None) -> nn.Dense:
        return nn.Dense(
            features, kernel_init=self.dense_init, bias_init=self.bias_init, dtype=self.dtype,
            name=name
        )


def build_layers(init: Any, activation: Any, norm: Any, dtype: Any = None,
                 conv_impl: ConvChoice = XLA_CONV) -> Layers:
    """Build the `Layers` bundle from the `init`, `activation` and `norm` config nodes; its
    layers compute in `dtype` (`train.precision`, cnnlab.models.compute_dtype) and, on CPU,
    convolve with `conv_impl` (`train.conv_impl`, cnnlab.models.conv_choice)."""
    norm_options = {k: v for k, v in dict(norm).items() if k != "name" and v is not None}
    norm_factory = NORMS.get(norm.name)
    accepted = inspect.signature(norm_factory).parameters
    for key in norm_options:
        if key not in accepted:
            raise ConfigError(f"norm.{key} does not apply to norm={norm.name}; its keys: "
                              f"{', '.join(accepted) or 'none'}")
    for key in accepted:
        if key not in norm_options:
            raise ConfigError(f"norm={norm.name} needs norm.{key}, which is null; select it "
                              f"with norm={norm.name} to get its values")
    return Layers(
        conv_init=INITIALIZERS.get(init.conv),
        dense_init=INITIALIZERS.get(init.dense),
        bias_init=INITIALIZERS.get(init.bias),
        act=Recorded(ACTIVATIONS.get(activation.name)(activation)),
        norm=functools.partial(norm_factory(**norm_options), dtype=dtype),
        conv_bias=norm.name in NORMS_WITHOUT_SHIFT,
        conv_impl=conv_impl if parallel.platform() == "cpu" else None,
        dtype=dtype,
    )
