"""Training diagnostics (`diagnostics.every=N`): per-layer gradient norms, update/weight ratios,
activation statistics and dead ReLUs, every N steps.

They are a jitted function of their own, called by the loop (cnnlab/training/actions.py
`Diagnostics`)
at diagnostics steps only, so the compiled training chunk is the same whether they are on or off
and a run without them pays nothing. At step s it takes the state after s steps and the batch
the next step trains on (same data, augmentation and dropout keys), and recomputes what that
step computes: the gradient of the optimized objective and the optimizer's update, i.e. exactly
the update step s + 1 applies. Nothing is kept between calls, so resuming needs nothing.

Names: a parameter layer is the module owning the parameters, as `cnnlab summary` names it
with `/` written `.` (`stage1_block1.conv1`, `stem_norm.BatchNorm_0`); an activation layer is
the module that applies the activation, then `actK` for its K-th (`stage1_block1.act2`: a basic
block's activation after the shortcut; `act1` alone: one the model applies itself, e.g. the
CIFAR ResNet's stem).
"""

import collections
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from omegaconf import DictConfig

from cnnlab.data.augment.pipeline import Augment
from cnnlab.data.device import DeviceSplit
from cnnlab.errors import require
from cnnlab.models.layers import recording_activations
from cnnlab.models.scan import unrolled
from cnnlab.training import steps

PREFIX = "diag"
# Per-layer values logged as `diag/<metric>/<layer>`.
PARAM_METRICS = ("grad_norm", "update_ratio")
ACTIVATION_METRICS = ("act_mean", "act_std", "dead_share")
# W&B histograms across layers (`diag/hist/<name>`): norms and ratios spread over decades, so
# their log10 is binned; activation statistics and shares as they are.
LOG_HISTOGRAMS = ("grad_norm", "update_ratio")


def enabled(cfg: DictConfig) -> bool:
    return bool(cfg.diagnostics.every)


def layer_norms(tree: Any) -> dict[str, jax.Array]:
    """The L2 norm of each parameter layer's leaves together (a conv's kernel and bias)."""
    squares: dict[str, jax.Array] = {}
    for path, leaf in traverse_util.flatten_dict(tree).items():
        name = ".".join(path[:-1])
        total = jnp.sum(jnp.square(leaf.astype(jnp.float32)))
        squares[name] = squares[name] + total if name in squares else total
    return {name: jnp.sqrt(total) for name, total in squares.items()}


def activation_stats(y: jax.Array) -> dict[str, jax.Array]:
    """Mean and std over every value of the batch; the share of units (one per position and
    channel, i.e. every axis but the batch's) that are 0 for every example: dead ReLUs."""
    y = y.astype(jnp.float32)
    return {"act_mean": jnp.mean(y), "act_std": jnp.std(y),
            "dead_share": jnp.mean(jnp.all(y == 0, axis=0))}


class ActivationRecorder:
    """Names and reduces every activation output of one traced forward pass.

    Module calls are intercepted (as cnnlab/models/summary.py does) only to know which module is
    running when an activation is applied: the outputs are reduced at once to their statistics.
    """

    def __init__(self) -> None:
        self._modules: list[tuple[str, ...]] = [()]
        self._counts: collections.Counter = collections.Counter()
        self._stats: dict[str, dict[str, jax.Array]] = {}

    def intercept(self, next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
        module = context.module
        if context.method_name != "__call__" or module.scope is None:
            return next_fun(*args, **kwargs)
        self._modules.append(tuple(module.path))
        try:
            return next_fun(*args, **kwargs)
        finally:
            self._modules.pop()

    def record(self, y: jax.Array) -> None:
        module = self._modules[-1]
        self._counts[module] += 1
        self._stats[".".join((*module, f"act{self._counts[module]}"))] = activation_stats(y)

    def take(self) -> dict[str, dict[str, jax.Array]]:
        """What was recorded so far, by layer; called inside the differentiated function."""
        stats, self._stats = self._stats, {}
        return stats


def make_diagnose(model: nn.Module, tx: optax.GradientTransformation, augment: Augment,
                  batch_size: int, regularization: DictConfig | None = None,
                  scale_lr: bool = False, loss_config: DictConfig | None = None) -> Callable:
    """`diagnose(state, data) -> {metric: {layer: value}}`, jitted; the step's arguments as
    `steps.make_train_step` takes them. Repeated blocks are unrolled, so each has its row."""
    model = unrolled(model)

    @jax.jit
    def diagnose(state: steps.TrainState, data: DeviceSplit) -> dict:
        recorder = ActivationRecorder()  # one per trace: names restart at each compile
        gradients = steps.make_gradients(model, augment, batch_size, regularization,
                                         activations=recorder.take, loss_config=loss_config)
        with recording_activations(recorder.record), nn.intercept_methods(recorder.intercept):
            out = gradients(state, data)
        updates, _ = steps.optimizer_updates(tx, out.grads, state, scale_lr)
        weights, applied = layer_norms(state.params), layer_norms(updates)
        values = {"grad_norm": layer_norms(out.grads),
                  "update_ratio": {k: applied[k] / weights[k] for k in weights}}
        for metric in ACTIVATION_METRICS:
            values[metric] = {layer: stats[metric] for layer, stats in out.activations.items()}
        return values

    return diagnose


def scalars(values: dict[str, dict[str, Any]]) -> dict[str, float]:
    """`{metric: {layer: value}}` (on the host) -> `{"diag/<metric>/<layer>": value}`."""
    return {f"{PREFIX}/{metric}/{layer}": float(value)
            for metric, layers in values.items() for layer, value in layers.items()}


def histograms(values: dict[str, dict[str, Any]]) -> dict[str, np.ndarray]:
    """One array per metric of its per-layer values (log10 for LOG_HISTOGRAMS), finite only,
    for W&B histograms named `diag/hist/<metric>` (`diag/hist/log10_<metric>`)."""
    out = {}
    for metric, layers in values.items():
        array = np.asarray(list(layers.values()), np.float64)
        name = metric
        if metric in LOG_HISTOGRAMS:
            with np.errstate(divide="ignore", invalid="ignore"):
                array, name = np.log10(array), f"log10_{metric}"
        array = array[np.isfinite(array)]
        if array.size:
            out[f"{PREFIX}/hist/{name}"] = array
    return out


def validate(cfg: DictConfig) -> None:
    every = cfg.diagnostics.every
    require(every is None or (isinstance(every, int) and every >= 0),
            f"diagnostics.every={every} must be a non-negative integer or null (null or 0: off)")
    # The loop diagnoses between compiled chunks (config.fit_steps_per_call lowers the chunk).
    per_call = cfg.train.steps_per_call
    require(not every or every % per_call == 0,
            f"diagnostics.every={every} must be a multiple of train.steps_per_call={per_call}")

