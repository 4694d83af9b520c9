"""Optax optimizers, learning-rate schedules and the regularized training objective, from the
`optimizer`, `schedule` and `regularization` configs.

Conventions (each test in tests/test_optim.py writes the rule out by hand):

* Every optimizer's step is `w <- w - lr_t * direction`, lr_t from `make_schedule`.
* `sgd`/`momentum`/`nesterov` are `torch.optim.SGD`: the buffer accumulates raw gradients,
  b <- mu b + g, and lr multiplies afterwards; Nesterov steps along g + mu b (Sutskever et al.
  2013 in PyTorch's formulation).
* `adadelta` is Zeiler 2012, Algorithm 1, times lr (PyTorch's convention; lr 1.0 is the paper).
* `adam` is Kingma & Ba 2015, Algorithm 1, with bias correction and eps outside the square root.
* `optimizer.weight_decay` (wd) decays every parameter, biases and norm scales included, as
  PyTorch's `weight_decay` does by default (for kernels only, use `regularization.l2`).
  `decay=coupled` adds wd * w to the gradient before the optimizer, the gradient of an L2 term
  (wd / 2) ||w||^2, as PyTorch's `weight_decay` and the ResNet paper do. `decay=decoupled`
  (Loshchilov & Hutter 2019) adds wd * w after the optimizer has shaped the gradient, so the step
  is lr_t * (direction + wd * w): scaled by the scheduled lr as in PyTorch's AdamW and
  optax.adamw; the paper writes eta_t * (alpha * direction + lambda * w), so lambda = lr * wd with
  lr the base lr. For plain SGD the two modes are the same update; with momentum or Adam they
  differ, which is the paper's point.
* `regularization.l1`, `regularization.l2` add l1 * sum |w| + (l2 / 2) * sum w^2 over the
  kernels (or all parameters) to the optimized objective; `regularization.label_smoothing` trains
  against smoothed targets. The logged training loss is the plain cross entropy either way.
* `optimizer.clip_norm` rescales the gradient of the objective to that global norm before
  anything else, as `torch.nn.utils.clip_grad_norm_` before `optimizer.step()`: explicit
  penalties are part of that gradient, coupled weight decay is added after it.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from omegaconf import DictConfig

from cnnlab.config import OPTIMIZERS, REGULARIZE_TARGETS, SGD_FAMILY, cycle_length
from cnnlab.errors import ConfigError


def make_schedule(sched: DictConfig, lr: float, total_steps: int) -> optax.Schedule:
    """The lr at each step; milestones are fractions of `total_steps`."""
    if sched.name == "step":
        boundaries = {int(round(m * total_steps)): sched.factor for m in sched.milestones}
        main = optax.piecewise_constant_schedule(lr, boundaries)
    elif sched.name == "cosine":
        main = optax.cosine_decay_schedule(lr, max(total_steps, 1), alpha=sched.final_factor)
    elif sched.name == "cyclic_cosine":
        main = cyclic_cosine_schedule(lr, total_steps, sched.get("cycles", 1))
    else:
        main = optax.constant_schedule(lr)
    warmup = sched.warmup_steps
    if not warmup:
        return main

    def with_warmup(step: jnp.ndarray) -> jnp.ndarray:
        # Linear ramp to the scheduled value; milestones keep counting from step 0.
        return jnp.where(step < warmup, lr * (step + 1) / warmup, main(step))

    return with_warmup


def cyclic_cosine_schedule(lr: float, total_steps: int, cycles: int) -> optax.Schedule:
    """Snapshot ensembles' schedule (Huang et al. 2017, eq. 2): M cosine cycles that restart at
    lr0, lr(t) = lr0 / 2 * (cos(pi * mod(t, ceil(T/M)) / ceil(T/M)) + 1) for t = 0, 1, ...

    The paper counts iterations from 1 and writes mod(t - 1, ...); optax's counter starts at 0,
    so the same values are mod(t, ...) here: each cycle starts at lr0. The weights at the end of
    each cycle are the snapshots (cnnlab/train.py saves them).
    """
    length = cycle_length(total_steps, cycles)

    def schedule(step: jnp.ndarray) -> jnp.ndarray:
        phase = jnp.mod(step, length) / length
        return lr / 2 * (jnp.cos(jnp.pi * phase) + 1)

    return schedule


def _direction(opt: DictConfig, name: str) -> optax.GradientTransformation:
    """The optimizer's transformation of the gradient, before the lr (and its sign) is applied."""
    if name in SGD_FAMILY:
        if not opt.momentum:
            return optax.identity()
        return optax.trace(decay=opt.momentum, nesterov=bool(opt.nesterov))
    return optax.scale_by_adadelta(rho=opt.rho, eps=opt.eps)


def _coupled(opt: DictConfig, name: str, schedule: optax.Schedule) -> optax.GradientTransformation:
    # optax's own aliases, so that the state of a default run keeps the pytree structure of
    # checkpoints written before there was a choice of optimizer.
    if name in SGD_FAMILY:
        return optax.sgd(schedule, momentum=opt.momentum or None, nesterov=bool(opt.nesterov))
    if name == "adadelta":
        return optax.adadelta(schedule, rho=opt.rho, eps=opt.eps)
    return optax.adam(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps)


def make_optimizer(opt: DictConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    """The optimizer the `optimizer` config names (module docstring: the exact update rules).

    A config without `name`, `decay` or `clip_norm` is the SGD family, coupled, unclipped.
    """
    name, decay = opt.get("name", "sgd"), opt.get("decay", "coupled")
    if name not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer '{name}'; valid choices: {', '.join(OPTIMIZERS)}")
    if name == "adamw" and decay != "decoupled":
        raise ConfigError("optimizer 'adamw' takes optimizer.decay=decoupled only")
    if decay == "coupled":
        tx = optax.chain(optax.add_decayed_weights(opt.weight_decay),
                         _coupled(opt, name, schedule))
    elif decay == "decoupled" and name in ("adam", "adamw"):
        tx = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                         weight_decay=opt.weight_decay)
    elif decay == "decoupled":
        # optax.adamw's chain with another direction: the decay joins the step after the
        # momentum buffer or Adadelta's rescaling, which therefore never see it, and before
        # the lr, which scales it as in optax.adamw.
        tx = optax.chain(_direction(opt, name), optax.add_decayed_weights(opt.weight_decay),
                         optax.scale_by_learning_rate(schedule))
    else:
        raise ConfigError(f"optimizer.decay='{decay}'; valid choices: coupled, decoupled")
    clip_norm = opt.get("clip_norm")
    if clip_norm is not None:
        tx = optax.chain(optax.clip_by_global_norm(clip_norm), tx)
    return tx


# ------------------------------------------------------------------ the regularized objective


def penalty_mask(params: Any, apply_to: str) -> Any:
    """True for the parameters the penalties reach: `kernels` = conv and dense kernels, which
    flax names `kernel`; biases, norm scales and shifts and other learned scalars are left out,
    as they set a layer's offset or scale rather than its capacity."""
    if apply_to == "all":
        return jax.tree.map(lambda _: True, params)
    if apply_to != "kernels":
        raise ConfigError(f"regularization.apply_to='{apply_to}'; valid choices: "
                          + ", ".join(REGULARIZE_TARGETS))

    def is_kernel(path: tuple, _: Any) -> bool:
        last = path[-1] if path else None
        return getattr(last, "key", getattr(last, "name", None)) == "kernel"

    return jax.tree_util.tree_map_with_path(is_kernel, params)


def make_penalty(reg: DictConfig | None) -> Callable[[Any], jax.Array] | None:
    """`penalty(params)`: l1 * sum |w| + (l2 / 2) * sum w^2 over the masked weights, so its
    gradient is l1 * sign(w) + l2 * w; None when both are zero (the objective is unchanged)."""
    if reg is None or (not reg.l1 and not reg.l2):
        return None
    l1, l2, apply_to = float(reg.l1), float(reg.l2), reg.apply_to

    def penalty(params: Any) -> jax.Array:
        leaves = [w for w, use in zip(jax.tree.leaves(params),
                                      jax.tree.leaves(penalty_mask(params, apply_to)),
                                      strict=True) if use]
        total = jnp.zeros((), jnp.float32)
        if l1:
            # |w| = w * sign(w), with sign held constant: the gradient is sign(w), 0 at w = 0
            # (as PyTorch's), where jnp.abs's would be 1 and push exact zeros negative.
            total += l1 * sum(jnp.sum(w * jax.lax.stop_gradient(jnp.sign(w))) for w in leaves)
        if l2:
            total += 0.5 * l2 * sum(jnp.sum(w * w) for w in leaves)
        return total

    return penalty


def smoothed_cross_entropy(logits: jax.Array, labels: jax.Array, smoothing: float) -> jax.Array:
    """Mean cross entropy against (1 - eps) * one_hot + eps / K (Szegedy et al. 2016, sec. 7)."""
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype),
                                  smoothing)
    return optax.softmax_cross_entropy(logits, targets).mean()
