"""Regularizers that live inside the model: stochastic depth and where dropout goes.

Stochastic depth (Huang, Sun, Liu, Sedra & Weinberger 2016, "Deep Networks with Stochastic
Depth", section 3): during training residual block l of L keeps its residual branch with
probability p_l = 1 - (l / L)(1 - p_L) (the linear decay rule, eq. 4; p_L = 0.5 in the paper) and
is otherwise its shortcut alone, H_l = ReLU(id(H_{l-1})); at test time every branch is kept and
scaled by its survival probability, H_l = ReLU(p_l f_l(H_{l-1}) + id(H_{l-1})) (eq. 5).

Dropout (Srivastava, Hinton, Krizhevsky, Sutskever & Salakhutdinov 2014, "Dropout: A Simple Way
to Prevent Neural Networks from Overfitting"): flax's `nn.Dropout` is the inverted form (kept
units are scaled by 1 / (1 - rate) in training, the layer is the identity at test time), which
equals the paper's rule of scaling the weights by the retention probability at test time. Where
it goes is `model.dropout_at`: one rate per kind of place (see `DropoutPlaces`).
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnlab.errors import ConfigError
from cnnlab.registry import described

# batch: the paper's rule, one draw per block and mini-batch (the whole batch skips the block);
# example: one draw per block and example ("drop path", as in timm's DropPath).
STOCHASTIC_DEPTH_MODES = ("batch", "example")
# Where `StochasticDepth` sows its 0/1 draws when the caller makes the collection mutable.
GATES_COLLECTION = "intermediates"


def linear_decay(num_blocks: int, p_last: float) -> tuple[float, ...]:
    """Survival probabilities p_1..p_L of Huang et al.'s linear decay rule (eq. 4).

    The input (block 0) would survive with p_0 = 1; the last block with p_L. The expected
    number of active blocks is sum p_l = L - (L + 1)(1 - p_L) / 2, e.g. (3L - 1) / 4 = 40.25
    of the 110-layer net's 54 blocks at p_L = 0.5 (the paper's "about 40").
    """
    return tuple(1.0 - (block / num_blocks) * (1.0 - p_last)
                 for block in range(1, num_blocks + 1))


def check_stochastic_depth(p_last: float, mode: str, has_residual_blocks: bool,
                           why_not: str) -> None:
    """One-line ConfigErrors for `model.stochastic_depth` (p_L) and its mode."""
    if not 0 < p_last <= 1:
        raise ConfigError(f"model.stochastic_depth={p_last} must be in (0, 1]: the last block's "
                          "survival probability p_L (0.5 in Huang et al. 2016; 1 = off)")
    if mode not in STOCHASTIC_DEPTH_MODES:
        raise ConfigError(f"model.stochastic_depth_mode='{mode}'; valid choices: "
                          f"{', '.join(STOCHASTIC_DEPTH_MODES)}")
    if p_last < 1 and not has_residual_blocks:
        raise ConfigError(f"model.stochastic_depth={p_last} needs residual blocks to drop onto "
                          f"their shortcuts; {why_not}")


class StochasticDepth(nn.Module):
    """Gate a residual branch: keep it with probability `survival` in training (0/1, unscaled),
    scale it by `survival` at test time (Huang et al. 2016, eq. 5).

    The branch has been computed either way, so a dropped block saves no time here (a jitted
    step cannot skip work it decides on at run time without `lax.cond`), and its batch norms
    still update their running statistics from the batch. The branch's input does not depend on
    its own gate, so those statistics estimate what the branch sees at test time just as well;
    the paper's Torch code skips the dropped branch and updates them from fewer batches. A
    dropped branch gets exactly zero gradient.
    """

    survival: float
    per_example: bool = False

    @nn.compact
    def __call__(self, branch: jax.Array, train: bool = False) -> jax.Array:
        if not train:
            # An array survival (a scanned block's) in the branch's dtype, as a Python float
            # (weakly typed) would be: bfloat16 stays bfloat16.
            return branch * jnp.asarray(self.survival, branch.dtype)
        shape = ((branch.shape[0],) + (1,) * (branch.ndim - 1)) if self.per_example else ()
        keep = jax.random.bernoulli(self.make_rng("dropout"), self.survival, shape)
        self.sow(GATES_COLLECTION, "keep", keep)
        # where, not a multiply: a dropped branch contributes an exact 0 even if it overflowed.
        return jnp.where(keep, branch, jnp.zeros_like(branch))


# The places `model.dropout_at` can name, in the order that settles a position two of them
# share: the later one sets the rate (the last hidden fc of LeNet-5 is also the head position).
DROPOUT_PLACES = ("conv", "stage", "fc", "head", "block")


@dataclasses.dataclass
class DropoutPlaces:
    """Dropout rates by kind of place; 0 adds no dropout there (every model's default).

    conv:  after every conv layer of the layer list (conv -> norm -> act -> dropout), the
           placement of Srivastava et al. 2014's convolutional nets (their CIFAR-10/SVHN nets
           retain 0.75 to 0.9 of the conv units, so rates 0.1 to 0.25, and 0.5 for FC units).
    stage: at the end of every conv stage: after each pooling layer, and after the last
           residual block of each stage.
    fc:    after every hidden fully connected layer: the classic place (AlexNet, VGG).
    head:  once, right before the classifier (GoogLeNet's 40% dropout after its average pool).
    block: inside every residual block, before its last conv: between the two 3x3 convs of a
           basic block, as in Zagoruyko & Komodakis 2016's wide ResNets (rate 0.3 there).
    """

    conv: float = described("after every conv layer")
    stage: float = described("at the end of every conv stage")
    fc: float = described("after every hidden fully connected layer")
    head: float = described("once, right before the classifier")
    block: float = described("inside every residual block, before its last conv")

    def validate(self, available: tuple[str, ...], family: str) -> None:
        for place in DROPOUT_PLACES:
            rate = getattr(self, place)
            if not 0 <= rate < 1:
                raise ConfigError(f"model.dropout_at.{place}={rate} must be in [0, 1)")
            if rate and place not in available:
                raise ConfigError(f"model.dropout_at.{place}={rate}: {family} models have no "
                                  f"'{place}' places; valid: {', '.join(available)}")

    def active(self) -> dict[str, float]:
        return {place: getattr(self, place) for place in DROPOUT_PLACES if getattr(self, place)}
