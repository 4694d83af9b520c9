"""The training objective's data term, from the `loss` config (conf/loss/).

Every loss is the mean over the batch of a per-example loss against the one-hot target t (or
the label-smoothed target, with `regularization.label_smoothing`), for logits z of K classes:

* cross_entropy: -sum_k t_k log softmax(z)_k (the default; the integer-label form when t is
  one-hot, bit for bit today's objective).
* mse: (1/2) sum_k (y_k - t_k)^2 with y = `loss.output`(z): softmax(z), sigmoid(z) or z
  itself (logits): the notes' L2 loss, E = 1/(2N) sum_i ||y_i - t_i||^2.
* sigmoid_bce: sum_k -[t_k log sigmoid(z_k) + (1 - t_k) log(1 - sigmoid(z_k))]: K independent
  binary cross entropies, summed over the classes.

The logged training loss stays the cross entropy against the true labels whichever loss is
optimized (as under label smoothing), so runs with different losses compare on one scale; the
error is always that of the argmax of z.
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from omegaconf import DictConfig

from cnnlab.errors import require
from cnnlab.registry import Registry
from cnnlab.training.optim import smoothed_cross_entropy

# (outputs or logits (B, K), targets (B, K)) -> per-example loss (B,)
PerExample = Callable[[jax.Array, jax.Array], jax.Array]
# (logits (B, K), integer labels (B,)) -> the batch's mean loss
Objective = Callable[[jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Loss:
    fn: PerExample
    # The `loss.output` values this loss takes (the first is conf/loss's default); empty: it is
    # defined on the logits and `loss.output` must stay null.
    outputs: tuple[str, ...] = ()


def _mse(outputs: jax.Array, targets: jax.Array) -> jax.Array:
    return 0.5 * jnp.sum(jnp.square(outputs - targets), axis=-1)


def _sigmoid_bce(logits: jax.Array, targets: jax.Array) -> jax.Array:
    # optax's form, max(z, 0) - z t + log(1 + e^-|z|), stays finite for saturated units.
    return jnp.sum(optax.sigmoid_binary_cross_entropy(logits, targets), axis=-1)


LOSSES: Registry[Loss] = Registry("loss.name")
LOSSES.register("cross_entropy", Loss(optax.softmax_cross_entropy))
LOSSES.register("mse", Loss(_mse, ("softmax", "sigmoid", "logits")))
LOSSES.register("sigmoid_bce", Loss(_sigmoid_bce))

OUTPUTS: Registry[Callable[[jax.Array], jax.Array]] = Registry("loss.output")
OUTPUTS.register("softmax", jax.nn.softmax)
OUTPUTS.register("sigmoid", jax.nn.sigmoid)
OUTPUTS.register("logits", lambda z: z)


def validate(cfg: DictConfig) -> None:
    loss = LOSSES.get(cfg.name)
    if not loss.outputs:
        require(cfg.output is None, f"loss.output={cfg.output}: loss={cfg.name} is defined on "
                "the logits and takes no loss.output; leave it null (loss=mse takes softmax, "
                "sigmoid, logits)")
        return
    require(cfg.output in loss.outputs, f"loss.output={cfg.output} for loss={cfg.name}; valid "
            "choices: " + ", ".join(loss.outputs))


def make_objective(cfg: DictConfig | None, smoothing: float = 0.0) -> Objective | None:
    """`objective(logits, labels)`: the mean loss `cfg` names against (smoothed) one-hot
    targets; None for plain cross entropy, which the train step computes from the integer
    labels itself (so the default objective is unchanged, bit for bit)."""
    name = "cross_entropy" if cfg is None else cfg.name
    if name == "cross_entropy":
        if not smoothing:
            return None
        return lambda logits, labels: smoothed_cross_entropy(logits, labels, smoothing)
    loss = LOSSES.get(name)
    outputs = OUTPUTS.get(cfg.output) if loss.outputs else OUTPUTS.get("logits")

    def objective(logits: jax.Array, labels: jax.Array) -> jax.Array:
        logits = logits.astype(jnp.float32)
        targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
        if smoothing:
            targets = optax.smooth_labels(targets, smoothing)
        return loss.fn(outputs(logits), targets).mean()

    return objective
