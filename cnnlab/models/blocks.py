"""The building blocks every architecture is assembled from.

Each block receives the model's `Layers` bundle, so initializer, activation and normalization
stay pluggable; a convolution is conv -> norm -> activation, as in the papers that use
normalization and (with `norm=none`) in those that predate it, except in DenseNet's
pre-activation layers (norm -> activation -> conv).
"""

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnlab.errors import ConfigError
from cnnlab.models import geometry, pooling
from cnnlab.models.layers import Layers, at_least_float32
from cnnlab.models.regularization import StochasticDepth
from cnnlab.registry import Registry

# Which input maps feed each output map of a sparsely connected convolution.
CONNECTION_TABLES: Registry[tuple[tuple[int, ...], ...]] = Registry("connection table")
# LeCun et al. 1998, Table I: the S2 maps (0-5) each C3 map (0-15) takes input from. Six maps see
# three contiguous maps, six see four, three see four non-contiguous ones and one sees all six.
CONNECTION_TABLES.register("lenet5_c3", (
    (0, 1, 2), (1, 2, 3), (2, 3, 4), (3, 4, 5), (4, 5, 0), (5, 0, 1),
    (0, 1, 2, 3), (1, 2, 3, 4), (2, 3, 4, 5), (3, 4, 5, 0), (4, 5, 0, 1), (5, 0, 1, 2),
    (0, 1, 3, 4), (1, 2, 4, 5), (0, 2, 3, 5),
    (0, 1, 2, 3, 4, 5),
))


class ConvUnit(nn.Module):
    """conv -> norm -> activation; `connections` names a sparse connection table."""

    features: int
    kernel: int
    layers: Layers
    stride: int = 1
    padding: geometry.Padding = "same"
    groups: int = 1
    connections: str = "full"
    activate: bool = True
    # False: the convolution alone, for pre-activation nets whose next layer starts with
    # norm -> activation (DenseNet's first conv).
    norm_act: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        lay = self.layers
        if self.connections == "full":
            if x.shape[-1] % self.groups or self.features % self.groups:
                raise ConfigError(
                    f"{self.name}: groups={self.groups} must divide its {x.shape[-1]} input and "
                    f"{self.features} output channels")
            y = lay.conv(x, self.features, self.kernel, self.stride, self.padding, self.groups,
                         name="conv", label=self.name)
        else:
            y = TableConv(self.kernel, CONNECTION_TABLES.get(self.connections), lay,
                          self.stride, self.padding, name="conv", label=self.name)(x)
        if not self.norm_act:
            return y
        y = lay.norm(name="norm")(y, train)
        return lay.act(y) if self.activate else y


class TableConv(nn.Module):
    """A convolution whose output map j only sees the input maps `table[j]`.

    Output maps with the same number of inputs are computed together as one grouped convolution
    over the gathered input maps, so the parameters are exactly those the table allows.
    """

    kernel: int
    table: tuple[tuple[int, ...], ...]
    layers: Layers
    stride: int = 1
    padding: geometry.Padding = "same"
    label: str = "conv"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        needed = 1 + max(max(inputs) for inputs in self.table)
        if x.shape[-1] != needed:
            raise ConfigError(f"{self.label}: its connection table needs {needed} input maps, "
                              f"got {x.shape[-1]}")
        outputs, order = [], []
        for fan_in in sorted({len(inputs) for inputs in self.table}):
            maps = [j for j, inputs in enumerate(self.table) if len(inputs) == fan_in]
            gathered = x[..., [i for j in maps for i in self.table[j]]]
            outputs.append(self.layers.conv(
                gathered, len(maps), self.kernel, self.stride, self.padding, groups=len(maps),
                name=f"fan_in{fan_in}", label=self.label))
            order += maps
        y = jnp.concatenate(outputs, axis=-1)
        return y[..., [order.index(j) for j in range(len(self.table))]]


class Dense(nn.Module):
    """Fully connected layer (flattening its input), then the activation unless `activate=False`."""

    features: int
    layers: Layers
    activate: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        y = self.layers.dense(self.features, name="dense")(x.reshape(x.shape[0], -1))
        return self.layers.act(y) if self.activate else y


class Pool(nn.Module):
    """Max or average pooling over kernel x kernel windows; average counts padding as zeros."""

    kind: str
    kernel: int
    stride: int
    padding: geometry.Padding = 0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        pads = geometry.window_pads(self.name or self.kind, x.shape[1:3], self.kernel,
                                    self.stride, self.padding)
        pool = pooling.max_pool if self.kind == "max" else nn.avg_pool
        return pool(x, (self.kernel, self.kernel), (self.stride, self.stride), pads)


class GlobalAvgPool(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        return jnp.mean(x, axis=(1, 2))


class Subsample(nn.Module):
    """LeNet-5's S layers: each unit sums a kernel x kernel patch, multiplies it by a trainable
    coefficient, adds a trainable bias (one pair per map) and applies the activation."""

    layers: Layers
    kernel: int = 2

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        pads = geometry.window_pads(self.name or "subsample", x.shape[1:3], self.kernel,
                                    self.kernel, 0)
        window = (self.kernel, self.kernel)
        summed = nn.avg_pool(x, window, window, pads) * self.kernel**2
        coefficient = self.param("coefficient", nn.initializers.ones, (x.shape[-1],))
        bias = self.param("bias", self.layers.bias_init, (x.shape[-1],))
        # float32 parameters used in the compute dtype, as nn.Dense and nn.Conv use theirs.
        summed, coefficient, bias = nn.dtypes.promote_dtype(summed, coefficient, bias,
                                                           dtype=self.layers.dtype)
        return self.layers.act(summed * coefficient + bias)


class Dropout(nn.Module):
    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        return nn.Dropout(self.rate, deterministic=not train)(x)


class Inception(nn.Module):
    """Szegedy et al. 2015's module: 1x1 | 1x1 -> 3x3 | 1x1 -> 5x5 | 3x3 max pool -> 1x1,
    concatenated. `widths` are the table's columns: #1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5,
    pool proj."""

    widths: Sequence[int]
    layers: Layers

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        n1x1, n3x3_reduce, n3x3, n5x5_reduce, n5x5, pool_proj = self.widths
        lay = self.layers

        def conv(y: jax.Array, features: int, kernel: int, name: str) -> jax.Array:
            return ConvUnit(features, kernel, lay, name=name)(y, train)

        branch1 = conv(x, n1x1, 1, "1x1")
        branch2 = conv(conv(x, n3x3_reduce, 1, "3x3_reduce"), n3x3, 3, "3x3")
        branch3 = conv(conv(x, n5x5_reduce, 1, "5x5_reduce"), n5x5, 5, "5x5")
        pooled = Pool("max", 3, 1, "same", name="pool")(x)
        branch4 = conv(pooled, pool_proj, 1, "pool_proj")
        return jnp.concatenate([branch1, branch2, branch3, branch4], axis=-1)


AUX_COLLECTION = "aux_outputs"


class AuxClassifier(nn.Module):
    """GoogLeNet's auxiliary classifier: 5x5/3 average pool, 1x1 conv with 128 filters, FC 1024,
    70% dropout, linear. Its logits are sown into `aux_outputs` during training only (the loss
    adds them with `weight`); at inference the network is unchanged, as in the paper."""

    num_classes: int
    layers: Layers
    weight: float = 0.3
    width: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if not (train or self.is_initializing()):
            return x
        y = Pool("avg", 5, 3, 0, name="pool")(x)
        y = ConvUnit(scaled(128, self.width), 1, self.layers, name="conv")(y, train)
        y = Dense(scaled(1024, self.width), self.layers, name="fc")(y)
        y = Dropout(0.7, name="dropout")(y, train)
        logits = Dense(self.num_classes, self.layers, activate=False, name="classifier")(y)
        if train:
            # float32 like the main classifier's logits (train.precision), for the loss.
            self.sow(AUX_COLLECTION, "head", {"logits": at_least_float32(logits),
                                              "weight": jnp.float32(self.weight)})
        return x


def aux_loss(aux_outputs: dict, loss_fn: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """Weighted sum of `loss_fn(logits)` over the auxiliary heads sown during a training step."""
    heads = jax.tree.leaves(aux_outputs, is_leaf=lambda t: isinstance(t, dict) and "logits" in t)
    return sum((h["weight"] * loss_fn(h["logits"]) for h in heads), jnp.float32(0.0))


def scaled(features: int, width: float) -> int:
    """A layer width times the model's width multiplier (at least one channel)."""
    return max(1, round(features * width))


def pad_shortcut(x: jax.Array, features: int, stride: int) -> jax.Array:
    """Option A: subsample by the stride and zero-pad the new channels, half on each side."""
    x = x[:, ::stride, ::stride, :]
    extra = features - x.shape[-1]
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))


class Shortcut(nn.Module):
    """He et al. 2016's shortcut options: A = identity, zero-padded channels where the shape
    changes (no parameters); B = 1x1 projection (+ norm) only there; C = projections everywhere."""

    features: int
    stride: int
    layers: Layers
    option: str = "A"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        reshapes = self.stride != 1 or x.shape[-1] != self.features
        if self.option == "C" or (self.option == "B" and reshapes):
            y = self.layers.conv(x, self.features, 1, self.stride, name="proj")
            return self.layers.norm(name="proj_norm")(y, train)
        return pad_shortcut(x, self.features, self.stride) if reshapes else x


def _block_dropout(rate: float, y: jax.Array, train: bool) -> jax.Array:
    """Dropout before a residual block's last conv (Zagoruyko & Komodakis 2016's wide ResNets,
    between the two 3x3 convs; rate 0.3 there); rate 0 adds no module."""
    return Dropout(rate, name="dropout")(y, train) if rate else y


def _add_shortcut(branch: jax.Array, shortcut: nn.Module, x: jax.Array,
                  survival: float | jax.Array, per_example: bool, train: bool) -> jax.Array:
    """branch + shortcut, the branch gated by stochastic depth when its survival is below 1.

    The shortcut applies whether or not the branch survives: a dropped downsampling block is its
    shortcut alone (the paper's id(): option A's pad, or B/C's projection). Called inside a
    block's compact method, so the gate module is the block's `stochastic_depth`. An array
    `survival` (one block's of a scan, cnnlab.models.scan) always gates.
    """
    if not isinstance(survival, float | int) or survival < 1:
        branch = StochasticDepth(survival, per_example, name="stochastic_depth")(branch, train)
    return branch + shortcut(x, train)


class BasicBlock(nn.Module):
    """Two 3x3 conv-norm layers; with `residual`, the input is added back before the last act.

    `survival`: the branch's stochastic-depth survival probability (Huang et al. 2016; 1 = off),
    drawn per mini-batch or, with `per_example`, per example; `dropout`: the rate of a dropout
    between the two convs (wide ResNets). Neither adds parameters.
    """

    features: int
    layers: Layers
    stride: int = 1
    residual: bool = True
    shortcut: str = "A"
    survival: float = 1.0
    per_example: bool = False
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False,
                 survival: jax.Array | None = None) -> jax.Array:
        lay = self.layers
        y = lay.conv(x, self.features, 3, self.stride, name="conv1", label=self.name)
        y = _block_dropout(self.dropout, lay.act(lay.norm(name="norm1")(y, train)), train)
        y = lay.conv(y, self.features, 3, 1, name="conv2", label=self.name)
        y = lay.norm(name="norm2")(y, train)
        if self.residual:
            shortcut = Shortcut(self.features, self.stride, lay, self.shortcut, name="shortcut")
            y = _add_shortcut(y, shortcut, x, self.survival if survival is None else survival,
                              self.per_example, train)
            # The residual stream, computed once (Layers.stored: XLA:CPU would recompute every
            # earlier block's output chain in each later consumer).
            return lay.stored(lay.act(y))
        return lay.act(y)


class Bottleneck(nn.Module):
    """1x1 (reduce to `features`) -> 3x3 -> 1x1 (expand to 4x), He et al. 2016's deeper block.

    `stride_at="1x1"` downsamples in the first 1x1 as the paper does; "3x3" moves the stride to
    the 3x3 conv, as torchvision does ("ResNet v1.5": a little more compute, a little better).
    """

    features: int
    layers: Layers
    stride: int = 1
    residual: bool = True
    shortcut: str = "B"
    stride_at: str = "1x1"
    expansion: int = 4
    # As in BasicBlock; the dropout sits between the 3x3 and the last 1x1.
    survival: float = 1.0
    per_example: bool = False
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False,
                 survival: jax.Array | None = None) -> jax.Array:
        lay = self.layers
        first, middle = (self.stride, 1) if self.stride_at == "1x1" else (1, self.stride)
        y = lay.conv(x, self.features, 1, first, name="conv1", label=self.name)
        y = lay.act(lay.norm(name="norm1")(y, train))
        y = lay.conv(y, self.features, 3, middle, name="conv2", label=self.name)
        y = _block_dropout(self.dropout, lay.act(lay.norm(name="norm2")(y, train)), train)
        out = self.features * self.expansion
        y = lay.conv(y, out, 1, 1, name="conv3", label=self.name)
        y = lay.norm(name="norm3")(y, train)
        if self.residual:
            shortcut = Shortcut(out, self.stride, lay, self.shortcut, name="shortcut")
            y = _add_shortcut(y, shortcut, x, self.survival if survival is None else survival,
                              self.per_example, train)
            return lay.stored(lay.act(y))
        return lay.act(y)


class NormAct(nn.Module):
    """norm -> activation alone: the start of a pre-activation unit, or DenseNet's last BN-ReLU
    before the global average pooling."""

    layers: Layers

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        return self.layers.act(self.layers.norm(name="norm")(x, train))


def _norm_act_conv(x: jax.Array, features: int, kernel: int, layers: Layers, index: int,
                   train: bool, label: str) -> jax.Array:
    """One pre-activation unit, norm -> activation -> conv (He et al. 2016b's order)."""
    y = NormAct(layers, name=f"norm_act{index}")(x, train)
    return layers.conv(y, features, kernel, name=f"conv{index}", label=label)


class DenseLayer(nn.Module):
    """Huang et al. 2017's composite function H: BN-ReLU-Conv(3x3, k), with `bottleneck` > 0
    first BN-ReLU-Conv(1x1, bottleneck * k) (DenseNet-B: 4k). Its k new maps are concatenated
    to its input."""

    growth: int
    layers: Layers
    bottleneck: int = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        y, label = x, self.name or "dense"
        if self.bottleneck:
            y = _norm_act_conv(y, self.bottleneck * self.growth, 1, self.layers, 1, train, label)
        y = _norm_act_conv(y, self.growth, 3, self.layers, 2, train, label)
        return jnp.concatenate([x, y], axis=-1)


class DenseBlock(nn.Module):
    """`num_layers` DenseLayers, each seeing the concatenated maps of the block's input and of
    every layer before it: c_in + num_layers * growth maps come out."""

    num_layers: int
    growth: int
    layers: Layers
    bottleneck: int = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        for i in range(self.num_layers):
            x = DenseLayer(self.growth, self.layers, self.bottleneck, name=f"layer{i + 1}")(
                x, train)
        return x


class Transition(nn.Module):
    """DenseNet's transition layer: BN-ReLU-Conv(1x1) to floor(compression * m) maps, then 2x2
    average pooling (compression < 1 is DenseNet-C)."""

    compression: float
    layers: Layers

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        features = max(1, int(self.compression * x.shape[-1]))
        y = _norm_act_conv(x, features, 1, self.layers, 1, train, self.name or "transition")
        return Pool("avg", 2, 2, 0, name="pool")(y)
