"""Pure, jit-compiled functions of the train state: the training step, chunks of steps, eval.

Nothing here touches the host: batches are gathered from the device-resident dataset by indices
derived from the run's key and the step number, so resuming at step s replays the same order.
"""

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from omegaconf import DictConfig

from cnnlab.augment import Augment, normalize
from cnnlab.models.blocks import AUX_COLLECTION, aux_loss
from cnnlab.optim import make_penalty, smoothed_cross_entropy


class TrainState(struct.PyTreeNode):
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    # Root key of the run; per-step keys are folded from it, so it never needs advancing.
    rng: jax.Array


class DeviceSplit(struct.PyTreeNode):
    """A split as device arrays; `mask` marks real examples in the padded tail of eval splits."""

    images: jax.Array
    labels: jax.Array
    mask: jax.Array
    mean: jax.Array
    std: jax.Array


def zero_metrics() -> dict[str, jax.Array]:
    return {"loss_sum": jnp.zeros((), jnp.float32), "correct": jnp.zeros((), jnp.int32),
            "count": jnp.zeros((), jnp.int32)}


def batch_indices(data_key: jax.Array, step: jax.Array, num_examples: int,
                  batch_size: int) -> jax.Array:
    """Indices of the batch at `step`: each epoch is a fresh permutation from fold_in(key, epoch).

    The tail of each permutation that does not fill a batch is skipped (drop remainder).
    """
    steps_per_epoch = num_examples // batch_size
    epoch, position = jnp.divmod(step, steps_per_epoch)
    order = jax.random.permutation(jax.random.fold_in(data_key, epoch), num_examples)
    return jax.lax.dynamic_slice(order, (position * batch_size,), (batch_size,))


def _variables(params: Any, batch_stats: Any) -> dict[str, Any]:
    return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, augment: Augment,
                    batch_size: int, regularization: DictConfig | None = None) -> Callable:
    """`train_step(state, data) -> (state, metrics)` for one batch.

    `regularization` (l1, l2, apply_to, label_smoothing) changes the optimized objective only;
    the logged loss stays the cross entropy against the true labels, so runs compare.
    """
    penalty = make_penalty(regularization)
    smoothing = float(regularization.label_smoothing) if regularization is not None else 0.0

    def train_step(state: TrainState, data: DeviceSplit) -> tuple[TrainState, dict]:
        data_key, step_key = jax.random.split(state.rng)
        idx = batch_indices(data_key, state.step, data.labels.shape[0], batch_size)
        images, labels = data.images[idx], data.labels[idx]
        aug_key, dropout_key = jax.random.split(jax.random.fold_in(step_key, state.step))
        x = normalize(augment(aug_key, images), data.mean, data.std)

        def cross_entropy(logits: jax.Array) -> jax.Array:
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        def smoothed(logits: jax.Array) -> jax.Array:
            return smoothed_cross_entropy(logits, labels, smoothing)

        # Label smoothing is a training target: every head's term of the objective uses it,
        # what is logged or evaluated never does.
        train_loss = smoothed if smoothing else cross_entropy

        def loss_fn(params: Any) -> tuple[jax.Array, tuple[jax.Array, jax.Array, Any]]:
            logits, updates = model.apply(
                _variables(params, state.batch_stats), x, train=True,
                mutable=["batch_stats", AUX_COLLECTION], rngs={"dropout": dropout_key},
            )
            loss = cross_entropy(logits)
            # Auxiliary heads (GoogLeNet) and weight penalties join the optimized objective;
            # the logged loss stays the main classifier's data loss.
            objective = train_loss(logits) if smoothing else loss
            objective += aux_loss(updates.get(AUX_COLLECTION, {}), train_loss)
            if penalty is not None:
                objective += penalty(params)
            return objective, (loss, logits, updates.get("batch_stats", state.batch_stats))

        (_, (loss, logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        state = state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            batch_stats=batch_stats,
            opt_state=opt_state,
        )
        metrics = {
            "loss_sum": loss * batch_size,
            "correct": jnp.sum(jnp.argmax(logits, -1) == labels).astype(jnp.int32),
            "count": jnp.asarray(batch_size, jnp.int32),
        }
        return state, metrics

    return train_step


def make_train_chunk(train_step: Callable) -> Callable:
    """`train_chunk(state, data, num_steps) -> (state, summed metrics)`, compiled once per length.

    The steps are a `lax.scan` unrolled completely: on CPU a rolled scan over conv steps compiles
    slowly and runs much slower, while unrolling keeps per-step speed and removes the per-step
    dispatch. The state's buffers are donated, so parameters are updated in place.
    """

    @functools.partial(jax.jit, static_argnames="num_steps", donate_argnames="state")
    def train_chunk(
        state: TrainState, data: DeviceSplit, num_steps: int
    ) -> tuple[TrainState, dict]:
        def body(carry: tuple, _: None) -> tuple[tuple, None]:
            state, sums = carry
            state, metrics = train_step(state, data)
            return (state, jax.tree.map(jnp.add, sums, metrics)), None

        (state, sums), _ = jax.lax.scan(
            body, (state, zero_metrics()), None, length=num_steps, unroll=num_steps
        )
        return state, sums

    return train_chunk


def make_eval_batch(model: nn.Module, batch_size: int) -> Callable:
    """`eval_batch(params, batch_stats, split, index) -> summed metrics` of the index-th batch."""

    @jax.jit
    def eval_batch(params: Any, batch_stats: Any, split: DeviceSplit, index: jax.Array) -> dict:
        start = index * batch_size
        take = functools.partial(jax.lax.dynamic_slice_in_dim, start_index=start,
                                 slice_size=batch_size)
        images, labels, mask = take(split.images), take(split.labels), take(split.mask)
        logits = model.apply(_variables(params, batch_stats),
                             normalize(images, split.mean, split.std), train=False)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        hits = (jnp.argmax(logits, -1) == labels) & mask
        return {
            "loss_sum": jnp.sum(jnp.where(mask, losses, 0.0)),
            "correct": jnp.sum(hits).astype(jnp.int32),
            "count": jnp.sum(mask).astype(jnp.int32),
        }

    return eval_batch


def summarize(sums: dict[str, Any]) -> dict[str, float]:
    """Host-side: summed metrics -> mean loss and error in percent."""
    count = max(int(sums["count"]), 1)
    return {"loss": float(sums["loss_sum"]) / count,
            "error": 100.0 * (1.0 - int(sums["correct"]) / count)}
