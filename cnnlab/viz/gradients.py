"""Input gradients of a class score or a neuron: saliency, guided backprop, deconvnet.

The three differ only in how a ReLU passes the gradient backwards, so each is a ReLU with its
own backward rule (a `jax.custom_vjp`) swapped into the model's `Layers.act`; max pooling,
convolutions and norms keep their ordinary gradients (JAX's max-pool gradient routes to the
argmax, Zeiler & Fergus's "switches").

* saliency (Simonyan, Vedaldi & Zisserman 2014): the plain gradient, |d score / d input| with
  the maximum over colour channels.
* guided_backprop (Springenberg et al. 2015): a ReLU passes the gradient only where both its
  forward input and the incoming gradient are positive.
* deconvnet (Zeiler & Fergus 2014): a ReLU passes relu(gradient), whatever its forward input.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from cnnlab.models.layers import Activation
from cnnlab.registry import Registry
from cnnlab.viz.network import Network


@jax.custom_vjp
def guided_relu(x: jax.Array) -> jax.Array:
    return jax.nn.relu(x)


def _guided_fwd(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return jax.nn.relu(x), x


def _guided_bwd(x: jax.Array, g: jax.Array) -> tuple[jax.Array]:
    return (jnp.where((x > 0) & (g > 0), g, 0.0),)


guided_relu.defvjp(_guided_fwd, _guided_bwd)


@jax.custom_vjp
def deconv_relu(x: jax.Array) -> jax.Array:
    return jax.nn.relu(x)


def _deconv_fwd(x: jax.Array) -> tuple[jax.Array, None]:
    return jax.nn.relu(x), None


def _deconv_bwd(_: None, g: jax.Array) -> tuple[jax.Array]:
    return (jax.nn.relu(g),)


deconv_relu.defvjp(_deconv_fwd, _deconv_bwd)

# The ReLU each method swaps into the model (saliency: the plain one, its ordinary gradient).
BACKWARD_RULES: Registry[Activation] = Registry("gradient method")
BACKWARD_RULES.register("saliency", jax.nn.relu)
BACKWARD_RULES.register("guided_backprop", guided_relu)
BACKWARD_RULES.register("deconvnet", deconv_relu)

# `score(network, pixels, act) -> (N,)`: one scalar per image to differentiate.
Score = Callable[[Network, jax.Array, Activation | None], jax.Array]


def class_score(targets: jax.Array) -> Score:
    """Each image's pre-softmax score of its target class (Simonyan et al. use the score, not
    the probability, which could rise by lowering the other classes)."""

    def score(network: Network, pixels: jax.Array, act: Activation | None) -> jax.Array:
        logits = network.logits(pixels, act)
        return jnp.take_along_axis(logits, targets[:, None], axis=1)[:, 0]

    return score


def neuron_score(layer: str, channels: jax.Array, at: str = "center") -> Score:
    """Channel `channels[i]` of `layer` for image i, at the centre of its map or averaged."""

    def score(network: Network, pixels: jax.Array, act: Activation | None) -> jax.Array:
        _, found = network.capture(pixels, [layer], act)
        out = found[layer]
        if out.ndim == 4:
            out = (out[:, out.shape[1] // 2, out.shape[2] // 2] if at == "center"
                   else out.mean(axis=(1, 2)))
        return jnp.take_along_axis(out.reshape(out.shape[0], -1), channels[:, None], axis=1)[:, 0]

    return score


def input_gradients(network: Network, pixels: jax.Array, score: Score,
                    method: str = "saliency") -> jax.Array:
    """d score_i / d pixels_i for each image of the batch, (N, H, W, C), under `method`'s ReLU.

    Images are independent at inference (norms use their running statistics), so the gradient
    of the summed scores is each image's own gradient."""
    act = BACKWARD_RULES.get(method)
    return jax.grad(lambda p: jnp.sum(score(network, p, act)))(pixels)


def saliency_map(gradients: jax.Array) -> jax.Array:
    """Simonyan et al.'s map: max over channels of |gradient|, (N, H, W)."""
    return jnp.max(jnp.abs(gradients), axis=-1)
