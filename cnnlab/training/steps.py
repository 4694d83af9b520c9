"""Pure, jit-compiled functions of the train state: the training step, chunks of steps, eval.

Nothing here touches the host: batches are gathered from the device-resident dataset by indices
derived from the run's key and the step number, so resuming at step s replays the same order.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from omegaconf import DictConfig

from cnnlab import parallel
from cnnlab.data.augment.pipeline import Augment, mixup_loss
from cnnlab.data.device import DeviceSplit, GivenBatch, StreamedChunk
from cnnlab.data.order import OrderedSplit, select
from cnnlab.data.preprocess import preprocess
from cnnlab.models.blocks import AUX_COLLECTION, aux_loss
from cnnlab.models.scan import stacked_scan
from cnnlab.parallel import constrain
from cnnlab.training.losses import make_objective
from cnnlab.training.optim import make_penalty


class TrainState(struct.PyTreeNode):
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    # Root key of the run; per-step keys are folded from it, so it never needs advancing.
    rng: jax.Array
    # With schedule=plateau, multiplies every update, i.e. the lr of every optimizer here (lr is
    # their last factor): reduce-on-plateau lowers it between chunks, from the host, without
    # recompiling.
    lr_scale: jax.Array = dataclasses.field(default_factory=lambda: jnp.ones((), jnp.float32))
    # eval.ema_decay: optax.ema's state (count, biased average) of {"params", "batch_stats"};
    # None when off, so the state and its checkpoints are unchanged for runs without it.
    ema: Any = None


def zero_metrics() -> dict[str, jax.Array]:
    return {"loss_sum": jnp.zeros((), jnp.float32), "correct": jnp.zeros((), jnp.int32),
            "count": jnp.zeros((), jnp.int32)}


def _variables(params: Any, batch_stats: Any) -> dict[str, Any]:
    return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def ema_transform(decay: float) -> optax.GradientTransformation:
    """The moving average of the weights: m_t = decay * m_{t-1} + (1 - decay) * w_t, m_0 = 0.

    Kingma & Ba 2015 (sec. 7.2, "temporal averaging") start the average at zero and divide by
    1 - decay^t (cnnlab/runs/weights.py's `ema_variables`), so that the first steps are not
    pulled towards zero nor towards the random initialization; Polyak & Juditsky 1992 average
    uniformly instead.
    """
    return optax.ema(decay, debias=True)


def init_ema(decay: float | None, params: Any, batch_stats: Any) -> Any:
    """The initial `TrainState.ema` (None when `decay` is None)."""
    if decay is None:
        return None
    return ema_transform(decay).init({"params": params, "batch_stats": batch_stats})


class Gradients(struct.PyTreeNode):
    """What one batch's forward and backward pass gives the step (and the diagnostics)."""

    grads: Any
    batch_stats: Any
    metrics: dict
    # Outputs of every activation, by layer name, when traced under
    # cnnlab.training.diagnostics.recording (else empty: the training step records nothing).
    activations: dict


class Targets(struct.PyTreeNode):
    """A batch's labels; with mixup also the partners' labels and the mixing weight lam (one
    scalar per batch, so a microbatch of the batch keeps it)."""

    labels: jax.Array
    partners: jax.Array | None = None
    lam: jax.Array | None = None


def _make_batch_gradients(model: nn.Module, penalty: Callable | None, objective: Callable | None,
                          activations: Callable[[], dict], frozen: Any) -> Callable:
    """`batch_gradients(params, batch_stats, x, targets, dropout_key) -> Gradients`: the
    forward and backward pass on the (augmented, preprocessed) batch `x`, with its metrics.

    `make_gradients` calls it once on the whole batch, or once per microbatch with
    train.grad_accum (`_make_accumulate`).
    """

    def batch_gradients(params: Any, batch_stats: Any, x: jax.Array, targets: Targets,
                        dropout_key: jax.Array) -> Gradients:
        labels, partners, lam = targets.labels, targets.partners, targets.lam
        mixing = partners is not None
        n = x.shape[0]

        def cross_entropy(logits: jax.Array, labels: jax.Array = labels) -> jax.Array:
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        def optimized(logits: jax.Array, labels: jax.Array = labels) -> jax.Array:
            return objective(logits, labels)

        # Label smoothing and the loss choice are training targets: every head's term of the
        # objective uses them, what is logged or evaluated never does.
        train_loss = cross_entropy if objective is None else optimized
        data_loss = cross_entropy
        if mixing:
            data_loss = mixup_loss(cross_entropy, lam, labels, partners)
            train_loss = (data_loss if objective is None
                          else mixup_loss(optimized, lam, labels, partners))

        def loss_fn(params: Any) -> tuple[jax.Array, tuple]:
            if frozen is not None:
                params = jax.tree.map(
                    lambda p, f: jax.lax.stop_gradient(p) if f else p, params, frozen)
            # The models' logits are float32 under any train.precision (cnnlab.models).
            logits, updates = model.apply(
                _variables(params, batch_stats), x, train=True,
                mutable=["batch_stats", AUX_COLLECTION], rngs={"dropout": dropout_key},
            )
            recorded = activations()
            loss = data_loss(logits)
            # Auxiliary heads (GoogLeNet) and weight penalties join the optimized objective;
            # the logged loss stays the main classifier's data loss.
            total = loss if train_loss is data_loss else train_loss(logits)
            total += aux_loss(updates.get(AUX_COLLECTION, {}), train_loss)
            if penalty is not None:
                total += penalty(params)
            return total, (loss, logits, updates.get("batch_stats", batch_stats), recorded)

        (_, (loss, logits, new_stats, recorded)), grads = jax.value_and_grad(
            loss_fn, has_aux=True)(params)
        metrics = {
            "loss_sum": loss * n,
            "correct": jnp.sum(jnp.argmax(logits, -1) == (
                jnp.where(lam >= 0.5, labels, partners) if mixing else labels)).astype(jnp.int32),
            "count": jnp.asarray(n, jnp.int32),
        }
        return Gradients(grads, new_stats, metrics, recorded)

    return batch_gradients


def _scan(body: Callable, carry: Any, micro: Any, count: int) -> Any:
    """The microbatches as a rolled `lax.scan`: one microbatch's activations live at a time."""
    return jax.lax.scan(body, carry, micro, length=count)[0]


def _unrolled(body: Callable, carry: Any, micro: Any, count: int) -> Any:
    """The microbatches as a Python loop: one program with `count` copies of the pass."""
    for i in range(count):
        carry, _ = body(carry, jax.tree.map(lambda a, i=i: a[i], micro))
    return carry


# How the microbatches of train.grad_accum are looped over, by backend (default: `_scan`).
# Measured on this 2-core CPU (ResNet-8 at width 8, 12x12 images, batch 64, K=4, 5 steps per
# call; shared machine, noisy): per step, Python loop 15-21 ms, lax.scan(unroll=K) 21-23 ms,
# rolled scan 42-69 ms; compile 33-44 s, 33-51 s, 17-23 s. On GPU/TPU the rolled scan is what
# saves memory, the point of accumulating.
ACCUMULATE_LOOPS: dict[str, Callable] = {"cpu": _unrolled}


def _make_accumulate(batch_gradients: Callable, grad_accum: int) -> Callable:
    """`accumulate(params, batch_stats, x, targets, dropout_key) -> Gradients` of the whole
    batch from `grad_accum` microbatches, one after another: the mean of their gradients (each
    a mean over its microbatch, so that of equal microbatches is the batch's mean) and the sum
    of their metrics; one optimizer update follows, as for the whole batch.

    Microbatch i holds examples i, i + K, i + 2K, ... of the batch: a strided split keeps a
    batch sharded along its first axis evenly sharded in every microbatch.

    Batch norm: each microbatch is normalized with its own statistics (a smaller physical
    batch, "ghost batch norm", Hoffer et al. 2017) and the running statistics are updated once
    per microbatch, K times in sequence. So only models without batch-dependent layers (norm
    none, group, layer, lrn) compute exactly the whole batch's gradient. Dropout and
    stochastic depth draw per microbatch (the dropout key folded with its index).
    """
    loop = ACCUMULATE_LOOPS.get(parallel.platform(), _scan)

    def split(a: jax.Array) -> jax.Array:
        return jnp.moveaxis(a.reshape(a.shape[0] // grad_accum, grad_accum, *a.shape[1:]), 1, 0)

    def accumulate(params: Any, batch_stats: Any, x: jax.Array, targets: Targets,
                   dropout_key: jax.Array) -> Gradients:
        def body(carry: tuple, micro: tuple) -> tuple[tuple, None]:
            batch_stats, grads, sums = carry
            index, x, labels, partners = micro
            out = batch_gradients(params, batch_stats, x,
                                  targets.replace(labels=labels, partners=partners),
                                  jax.random.fold_in(dropout_key, index))
            return (out.batch_stats, jax.tree.map(jnp.add, grads, out.grads),
                    jax.tree.map(jnp.add, sums, out.metrics)), None

        micro = (jnp.arange(grad_accum), split(x), split(targets.labels),
                 None if targets.partners is None else split(targets.partners))
        zeros = jax.tree.map(jnp.zeros_like, params)
        batch_stats, grads, sums = loop(body, (batch_stats, zeros, zero_metrics()), micro,
                                        grad_accum)
        return Gradients(jax.tree.map(lambda g: g / grad_accum, grads), batch_stats, sums, {})

    return accumulate


def make_gradients(model: nn.Module, augment: Augment, batch_size: int,
                   regularization: DictConfig | None = None,
                   activations: Callable[[], dict] = dict,
                   loss_config: DictConfig | None = None, frozen: Any = None,
                   grad_accum: int = 1, compute_dtype: Any = None,
                   batch_sharding: Any = None) -> Callable:
    """`gradients(state, data) -> Gradients` of the optimized objective on the batch at
    `state.step`, with that batch's metrics (see `make_train_step`).

    `frozen`: a tree of Python bools like the params (cnnlab/transfer): True marks a parameter
    held constant, whose gradient is zero and never computed. Since the images need no gradient
    either, the backward pass ends at the lowest layer that trains (a linear probe
    differentiates only its classifier).

    `activations()` is called right after the forward pass, inside the differentiated function,
    and its result returned: cnnlab.training.diagnostics passes one that hands over what it recorded
    (with grad_accum 1 only: microbatches record nothing).

    `grad_accum` (train.grad_accum): the augmented batch is split into that many microbatches
    whose gradients are averaged (`_make_accumulate`, which says what it means for batch norm);
    1 runs the whole batch at once. `compute_dtype` (train.precision): the augmented images are
    cast to it, as the model's layers compute in it; None leaves them float32.

    `batch_sharding` (cnnlab/parallel.py): the batch is split over the devices as it says, and
    XLA partitions the rest of the step along it (None: one device).
    """
    penalty = make_penalty(regularization)
    smoothing = float(regularization.label_smoothing) if regularization is not None else 0.0
    # None: plain cross entropy, the logged loss itself.
    objective = make_objective(loss_config, smoothing)
    batch_gradients = _make_batch_gradients(model, penalty, objective, activations, frozen)
    if grad_accum > 1:
        batch_gradients = _make_accumulate(
            _make_batch_gradients(model, penalty, objective, dict, frozen), grad_accum)

    def gradients(state: TrainState, data: DeviceSplit | OrderedSplit | GivenBatch) -> Gradients:
        data_key, step_key = jax.random.split(state.rng)
        images, labels = constrain(select(data, data_key, state.step, batch_size),
                                   batch_sharding)
        aug_key, dropout_key = jax.random.split(jax.random.fold_in(step_key, state.step))
        # cnnlab/data/augment/pipeline.py's order: pixel-space augmentation, preprocessing,
        # cutout, mixup. All of it on the whole batch, so any grad_accum trains on the same images.
        x = augment.cutout(aug_key, preprocess(augment(aug_key, images), data.stats))
        targets = Targets(labels)
        if augment.mixup_alpha > 0:
            x, partners, lam = augment.mixup(aug_key, x, labels)
            targets = Targets(labels, partners, lam)
        if compute_dtype is not None:
            x = x.astype(compute_dtype)
        return batch_gradients(state.params, state.batch_stats, x, targets, dropout_key)

    return gradients


def optimizer_updates(tx: optax.GradientTransformation, grads: Any, state: TrainState,
                      scale_lr: bool = False) -> tuple[Any, Any]:
    """(updates, new optimizer state): what `optax.apply_updates` adds to the weights."""
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    if scale_lr:
        # Only under reduce-on-plateau: other runs skip a product per parameter per step.
        updates = jax.tree.map(lambda u: u * state.lr_scale, updates)
    return updates, opt_state


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, augment: Augment,
                    batch_size: int, regularization: DictConfig | None = None,
                    ema_decay: float | None = None, scale_lr: bool = False,
                    loss_config: DictConfig | None = None, frozen: Any = None,
                    grad_accum: int = 1, compute_dtype: Any = None,
                    batch_sharding: Any = None) -> Callable:
    """`train_step(state, data) -> (state, metrics)` for one batch.

    With `ema_decay`, the step also updates the moving average of the new weights and BN
    statistics in `state.ema` (`ema_transform`), on the device like the rest of the step.

    With `scale_lr`, updates are multiplied by `state.lr_scale` (reduce-on-plateau).

    `regularization` (l1, l2, apply_to, label_smoothing) changes the optimized objective only;
    the logged loss stays the cross entropy against the true labels, so runs compare. So does
    `loss_config` (cnnlab/training/losses.py: cross_entropy, mse, sigmoid_bce), the optimized data
    term.

    `frozen` (see `make_gradients`) marks parameters that get no gradient; the optimizer must
    give them no update either (cnnlab/training/transfer_optimizer.py).

    With mixup (`augment.mixup_alpha` > 0) the labels are the mixed targets: every loss term,
    logged or optimized, is lam * L(y) + (1 - lam) * L(y_partner) (Zhang et al. 2018), and the
    logged error counts the argmax against the dominant label (y when lam >= 1/2).

    `grad_accum` and `compute_dtype`: see `make_gradients`; the step still makes one update
    and its metrics cover the whole batch.
    """
    gradients = make_gradients(model, augment, batch_size, regularization,
                               loss_config=loss_config, frozen=frozen, grad_accum=grad_accum,
                               compute_dtype=compute_dtype, batch_sharding=batch_sharding)

    def train_step(state: TrainState, data: DeviceSplit) -> tuple[TrainState, dict]:
        out = gradients(state, data)
        updates, opt_state = optimizer_updates(tx, out.grads, state, scale_lr)
        state = state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            batch_stats=out.batch_stats,
            opt_state=opt_state,
        )
        if ema_decay is not None:
            # BN statistics are averaged with the weights (as timm's ModelEma averages the whole
            # state dict): running statistics of the raw weights would not match averaged ones.
            _, ema = ema_transform(ema_decay).update(
                {"params": state.params, "batch_stats": state.batch_stats}, state.ema)
            state = state.replace(ema=ema)
        return state, out.metrics

    return train_step


def unroll_for(platform: str, num_steps: int) -> int:
    """How much of a chunk's `lax.scan` is unrolled on `platform`: all of it on CPU, where a
    rolled scan over conv steps compiles slowly and runs much slower; none on GPU/TPU, where
    compile time would grow with the chunk and a rolled loop costs microseconds per step."""
    return num_steps if platform == "cpu" else 1


def make_train_chunk(train_step: Callable, replicated: Any = None,
                     compiler_options: dict | None = None,
                     stack_blocks: bool = False) -> Callable:
    """`train_chunk(state, data, num_steps) -> (state, summed metrics)`, compiled once per length.

    A `lax.scan` unrolled as `unroll_for` says for the platform it is traced for
    (`parallel.platform()`: the run's devices', or `cnnlab compile`'s target's); the state is
    donated. `data`: the split with the epochs' orders
    (`data.order.OrderedSplit`; a bare `DeviceSplit` draws each step's permutation), or a
    `StreamedChunk` of the chunk's batches. `replicated`: on several devices, the sharding the
    state and metrics leave with. `compiler_options`: XLA's (training/numerics). `stack_blocks`:
    scanned blocks' variables stay stacked through the steps (cnnlab/models/scan.py).
    """
    placed = {} if replicated is None else {"out_shardings": (replicated, replicated)}
    if compiler_options:
        placed["compiler_options"] = compiler_options

    @functools.partial(jax.jit, static_argnames="num_steps", donate_argnames="state", **placed)
    def train_chunk(state: TrainState, data: DeviceSplit | OrderedSplit | StreamedChunk,
                    num_steps: int) -> tuple[TrainState, dict]:
        def body(carry: tuple, batch: tuple | None) -> tuple[tuple, None]:
            given = data if batch is None else GivenBatch(*batch, stats=data.stats)
            state, metrics = train_step(carry[0], given)
            return (state, jax.tree.map(jnp.add, carry[1], metrics)), None

        xs = (data.images, data.labels) if isinstance(data, StreamedChunk) else None
        scan = stacked_scan if stack_blocks else jax.lax.scan
        (state, sums), _ = scan(body, (state, zero_metrics()), xs, length=num_steps,
                                unroll=unroll_for(parallel.platform(), num_steps))
        return state, sums

    return train_chunk


# Test-time augmentation: a raw uint8 batch (B, H, W, C) -> its V views (V, B, H, W, C), which
# are preprocessed and classified like any batch (cnnlab/training/evaluate.py makes them).
# Multi-scale
# evaluation returns a tuple of such stacks, one per scale (their H, W differ): the prediction is
# the mean over the scales of each scale's mean over its views.
Views = Callable[[jax.Array], jax.Array | tuple[jax.Array, ...]]


def _mean_probs(log_probs: jax.Array) -> jax.Array:
    """(V, B, K) log-probabilities -> (B, K) log of their mean probability."""
    return jax.nn.logsumexp(log_probs, axis=0) - jnp.log(log_probs.shape[0])


def make_log_probs(model: nn.Module, views: Views | None = None) -> Callable:
    """`log_probs(params, batch_stats, split, images) -> (B, K)` log class probabilities.

    With `views` the prediction is the mean of the views' softmaxes (Krizhevsky et al. 2012,
    sec. 4.1), taken in log space so that the loss of a confident mistake stays finite; the views
    are classified one after another (`lax.map`), so memory does not grow with their number.
    """

    def log_probs(params: Any, batch_stats: Any, split: DeviceSplit,
                  images: jax.Array) -> jax.Array:
        variables = _variables(params, batch_stats)

        def classify(images: jax.Array) -> jax.Array:
            logits = model.apply(variables, preprocess(images, split.stats), train=False)
            return jax.nn.log_softmax(logits.astype(jnp.float32))

        if views is None:
            return classify(images)
        stacks = views(images)
        if isinstance(stacks, tuple):  # one stack of views per scale
            return _mean_probs(jnp.stack([_mean_probs(jax.lax.map(classify, stack))
                                          for stack in stacks]))
        per_view = jax.lax.map(classify, stacks)
        return jax.nn.logsumexp(per_view, axis=0) - jnp.log(per_view.shape[0])

    return log_probs


def _eval_slice(split: DeviceSplit, index: jax.Array, batch_size: int) -> tuple:
    take = functools.partial(jax.lax.dynamic_slice_in_dim, start_index=index * batch_size,
                             slice_size=batch_size)
    return take(split.images), take(split.labels), take(split.mask)


def label_rank(log_probs: jax.Array, labels: jax.Array) -> jax.Array:
    """The label's place in each row's ranking of the classes, 0 for the top one: the classes
    scored higher, plus those scored the same but of a lower index. Ties are broken towards the
    lower index, as `argmax` breaks them, so rank 0 is exactly `argmax == label` and rank < k is
    "label among the first k of a stable descending sort". O(B K): no sort on the device."""
    picked = jnp.take_along_axis(log_probs, labels[:, None], axis=-1)
    lower = jnp.arange(log_probs.shape[-1]) < labels[:, None]
    return jnp.sum((log_probs > picked) | ((log_probs == picked) & lower), axis=-1)


def confusion_counts(labels: jax.Array, predictions: jax.Array, mask: jax.Array,
                     num_classes: int) -> jax.Array:
    """(K, K) int32 counts, row = true label, column = prediction, of the examples `mask` keeps
    (a scatter-add: cheap next to the forward pass even for 1,000 classes)."""
    counts = jnp.zeros((num_classes, num_classes), jnp.int32)
    return counts.at[labels, predictions].add(mask.astype(jnp.int32))


def top_k_key(k: int) -> str:
    """The summed-metrics key of top-k hits; `summarize` turns it into `top<k>_error`."""
    return f"top{k}_correct"


def make_eval_batch(model: nn.Module, batch_size: int, views: Views | None = None,
                    top_k: int | None = None, batch_sharding: Any = None,
                    compiler_options: dict | None = None) -> Callable:
    """`eval_batch(params, batch_stats, split, index) -> summed metrics` of the index-th batch.

    The loss is the negative log of the predicted probability of the label (with `views`: of
    the averaged probability), the error that of its argmax. Also `confusion`, the batch's
    (K, K) counts (`confusion_counts`), and with `top_k` < K classes the top-k hits
    (`top_k_key`, ranked by `label_rank`). The padded tail (`split.mask`) counts nowhere.
    `batch_sharding` and `compiler_options` (training/numerics): as the training step's."""
    log_probs = make_log_probs(model, views)

    @functools.partial(jax.jit, compiler_options=compiler_options or None)
    def eval_batch(params: Any, batch_stats: Any, split: DeviceSplit, index: jax.Array) -> dict:
        images, labels, mask = constrain(_eval_slice(split, index, batch_size), batch_sharding)
        logp = log_probs(params, batch_stats, split, images)
        num_classes = logp.shape[-1]
        losses = -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
        predictions = jnp.argmax(logp, -1)
        sums = {
            "loss_sum": jnp.sum(jnp.where(mask, losses, 0.0)),
            "correct": jnp.sum((predictions == labels) & mask).astype(jnp.int32),
            "count": jnp.sum(mask).astype(jnp.int32),
            "confusion": confusion_counts(labels, predictions, mask, num_classes),
        }
        if top_k is not None and num_classes > top_k:
            hits = (label_rank(logp, labels) < top_k) & mask
            sums[top_k_key(top_k)] = jnp.sum(hits).astype(jnp.int32)
        return sums

    return eval_batch


def make_predict_batch(model: nn.Module, batch_size: int, views: Views | None = None) -> Callable:
    """`predict_batch(params, batch_stats, split, index) -> (batch_size, K)` log probabilities of
    the index-th batch, padded tail included (`split.mask` marks the real examples). Not jitted:
    the caller compiles it with the run's XLA options (training/numerics)."""
    log_probs = make_log_probs(model, views)

    def predict_batch(params: Any, batch_stats: Any, split: DeviceSplit,
                      index: jax.Array) -> jax.Array:
        images, _, _ = _eval_slice(split, index, batch_size)
        return log_probs(params, batch_stats, split, images)

    return predict_batch


def summarize(sums: dict[str, Any]) -> dict[str, float]:
    """Host-side: summed metrics -> mean loss and errors in percent: `correct` gives `error`,
    `top<k>_correct` gives `top<k>_error`; arrays (the confusion counts) are left out."""
    count = max(int(sums["count"]), 1)
    out = {"loss": float(sums["loss_sum"]) / count}
    for key, value in sums.items():
        if key.endswith("correct") and np.ndim(value) == 0:
            out[key.removesuffix("correct") + "error"] = 100.0 * (1.0 - int(value) / count)
    return out
