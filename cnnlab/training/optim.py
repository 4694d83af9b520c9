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

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from omegaconf import DictConfig

from cnnlab.errors import require
from cnnlab.registry import Registry

# ------------------------------------------------------------------------------- schedules

ScheduleBuilder = Callable[[DictConfig, float, int], optax.Schedule]
SCHEDULES: Registry[ScheduleBuilder] = Registry("schedule")


def cycle_length(total_steps: int, cycles: int) -> int:
    """Steps per cycle of `cyclic_cosine`: ceil(T / M) (Huang et al. 2017, eq. 2)."""
    return -(-total_steps // cycles)


@SCHEDULES.register("constant")
def _constant(sched: DictConfig, lr: float, total_steps: int) -> optax.Schedule:
    return optax.constant_schedule(lr)


# Reduce-on-plateau is a constant schedule times `TrainState.lr_scale`, which
# cnnlab/training/selection.py
# lowers between compiled chunks.
SCHEDULES.register("plateau", _constant)


@SCHEDULES.register("step")
def _step(sched: DictConfig, lr: float, total_steps: int) -> optax.Schedule:
    # Milestones are fractions of the run's steps.
    boundaries = {int(round(m * total_steps)): sched.factor for m in sched.milestones}
    return optax.piecewise_constant_schedule(lr, boundaries)


@SCHEDULES.register("cosine")
def _cosine(sched: DictConfig, lr: float, total_steps: int) -> optax.Schedule:
    return optax.cosine_decay_schedule(lr, max(total_steps, 1), alpha=sched.final_factor)


@SCHEDULES.register("cyclic_cosine")
def cyclic_cosine_schedule(sched: DictConfig, lr: float, total_steps: int) -> optax.Schedule:
    """Snapshot ensembles' schedule (Huang et al. 2017, eq. 2): M cosine cycles that restart at
    lr0, lr(t) = lr0 / 2 * (cos(pi * mod(t, ceil(T/M)) / ceil(T/M)) + 1) for t = 0, 1, ...

    The paper counts iterations from 1 and writes mod(t - 1, ...); optax's counter starts at 0,
    so the same values are mod(t, ...) here: each cycle starts at lr0. The weights at the end of
    each cycle are the snapshots (cnnlab/training/actions.py saves them).
    """
    length = cycle_length(total_steps, sched.cycles)

    def schedule(step: jnp.ndarray) -> jnp.ndarray:
        phase = jnp.mod(step, length) / length
        return lr / 2 * (jnp.cos(jnp.pi * phase) + 1)

    return schedule


def make_schedule(sched: DictConfig, lr: float, total_steps: int) -> optax.Schedule:
    """The lr at each step, with `schedule.warmup_steps` of linear warm-up in front."""
    main = SCHEDULES.get(sched.name)(sched, lr, total_steps)
    warmup = sched.warmup_steps
    if not warmup:
        return main

    def with_warmup(step: jnp.ndarray) -> jnp.ndarray:
        # Linear ramp to the scheduled value; milestones keep counting from step 0.
        return jnp.where(step < warmup, lr * (step + 1) / warmup, main(step))

    return with_warmup


def validate_schedule(sched: DictConfig, train: DictConfig) -> None:
    SCHEDULES.get(sched.name)
    require(sched.warmup_steps >= 0, f"schedule.warmup_steps={sched.warmup_steps} must be >= 0")
    if sched.name == "step":
        ms = list(sched.milestones or [])
        require(all(0 < m < 1 for m in ms) and ms == sorted(ms),
                f"schedule.milestones={ms} must be increasing fractions of train.steps in (0, 1)")
    if sched.name == "cyclic_cosine":
        # Snapshots are saved by the host between compiled chunks: every cycle ends on one.
        total, cycles, per_call = train.steps, sched.cycles, train.steps_per_call
        require(cycles >= 1, f"schedule.cycles={cycles} must be a positive integer")
        length = cycle_length(total, cycles)
        require(length % per_call == 0,
                f"schedule.cycles={cycles} gives cycles of ceil({total}/{cycles})={length} steps, "
                f"which must be a multiple of train.steps_per_call={per_call}")
        require((cycles - 1) * length < total,
                f"schedule.cycles={cycles} with cycles of {length} steps leaves the last cycle of "
                f"train.steps={total} empty; choose train.steps divisible by schedule.cycles")


# ------------------------------------------------------------------------------ optimizers


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """An update rule: the keys it reads (besides lr, weight_decay, decay and clip_norm) and its
    transformation of the gradient before the lr (and its sign) is applied."""

    keys: tuple[str, ...]
    direction: Callable[[DictConfig], optax.GradientTransformation]


def _sgd_direction(opt: DictConfig) -> optax.GradientTransformation:
    # torch.optim.SGD: the buffer accumulates raw gradients, lr multiplies afterwards.
    if not opt.momentum:
        return optax.identity()
    return optax.trace(decay=opt.momentum, nesterov=bool(opt.nesterov))


_SGD = Optimizer(("momentum", "nesterov"), _sgd_direction)
_ADAM = Optimizer(("b1", "b2", "eps"),
                  lambda opt: optax.scale_by_adam(b1=opt.b1, b2=opt.b2, eps=opt.eps))
OPTIMIZERS: Registry[Optimizer] = Registry("optimizer")
# torch.optim.SGD under three names: plain, heavy-ball and Nesterov presets.
for _name in ("sgd", "momentum", "nesterov"):
    OPTIMIZERS.register(_name, _SGD)
OPTIMIZERS.register("adadelta", Optimizer(
    ("rho", "eps"), lambda opt: optax.scale_by_adadelta(rho=opt.rho, eps=opt.eps)))
OPTIMIZERS.register("adam", _ADAM)
OPTIMIZERS.register("adamw", _ADAM)

# Where weight decay joins the update (module docstring): coupled, before the direction (so
# momentum and Adam's moments see it); decoupled, after it.
DECAY_MODES: Registry[Callable[[Any, Any], tuple]] = Registry("optimizer.decay")
DECAY_MODES.register("coupled", lambda direction, decay: (decay, direction))
DECAY_MODES.register("decoupled", lambda direction, decay: (direction, decay))
OPTIONAL_KEYS = ("momentum", "nesterov", "b1", "b2", "eps", "rho")


def make_optimizer(opt: DictConfig, schedule: optax.Schedule,
                   clip: bool = True) -> optax.GradientTransformation:
    """The optimizer the `optimizer` config names (module docstring: the exact update rules).

    `clip=False` leaves out `optimizer.clip_norm`, for callers that apply the optimizer to parts
    of the parameters (cnnlab/transfer) and clip the whole gradient in front of it themselves.
    """
    direction = OPTIMIZERS.get(opt.name).direction(opt)
    decay = optax.add_decayed_weights(opt.weight_decay)
    tx = optax.chain(*DECAY_MODES.get(opt.decay)(direction, decay),
                     optax.scale_by_learning_rate(schedule))
    return with_clipping(opt, tx) if clip else tx


def with_clipping(opt: DictConfig,
                  tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`tx` after `optimizer.clip_norm`'s rescaling of the whole gradient (if set)."""
    if opt.clip_norm is None:
        return tx
    return optax.chain(optax.clip_by_global_norm(opt.clip_norm), tx)


def _unit_interval(key: str, value: float) -> None:
    require(0 <= value < 1, f"{key}={value} must be in [0, 1)")


def _validate_optimizer_keys(opt: DictConfig) -> None:
    """Each optimizer reads its keys; the others must stay null, so that no value in a run's
    config is silently unused."""
    takes = OPTIMIZERS.get(opt.name).keys
    for key in OPTIONAL_KEYS:
        value = opt[key]
        if key in takes:
            require(value is not None,
                    f"optimizer '{opt.name}' needs optimizer.{key}, which is null; select it "
                    f"with optimizer={opt.name} to get its defaults")
        else:
            require(value is None,
                    f"optimizer.{key}={value} is not used by optimizer '{opt.name}' (it reads "
                    f"{', '.join(takes)}); set optimizer.{key}=null")


def _validate_sgd_names(opt: DictConfig) -> None:
    # The name is logged with the run, so it must say what ran; `sgd` is torch.optim.SGD and
    # may carry any momentum.
    require(not opt.nesterov or opt.momentum > 0,
            f"optimizer.nesterov=true needs optimizer.momentum > 0 (got {opt.momentum})")
    require(opt.name == "sgd" or opt.momentum > 0,
            f"optimizer '{opt.name}' needs optimizer.momentum in (0, 1), got {opt.momentum}; "
            "optimizer=sgd is plain SGD")
    require(opt.name == "sgd" or opt.nesterov == (opt.name == "nesterov"),
            f"optimizer '{opt.name}' with optimizer.nesterov={str(opt.nesterov).lower()} "
            f"is optimizer={'nesterov' if opt.nesterov else 'momentum'}")


def validate_optimizer(opt: DictConfig) -> None:
    _validate_optimizer_keys(opt)
    require(opt.lr > 0, f"optimizer.lr={opt.lr} must be positive")
    for key in ("momentum", "b1", "b2", "rho"):
        if opt[key] is not None:
            _unit_interval(f"optimizer.{key}", opt[key])
    require(opt.eps is None or opt.eps > 0, f"optimizer.eps={opt.eps} must be positive")
    if OPTIMIZERS.get(opt.name) is _SGD:
        _validate_sgd_names(opt)
    require(opt.weight_decay >= 0, f"optimizer.weight_decay={opt.weight_decay} must be >= 0")
    DECAY_MODES.get(opt.decay)
    require(opt.name != "adamw" or opt.decay == "decoupled",
            "optimizer 'adamw' is Adam with decoupled weight decay (optimizer.decay=decoupled); "
            "for Adam with an L2 term use optimizer=adam")
    require(opt.clip_norm is None or opt.clip_norm > 0,
            f"optimizer.clip_norm={opt.clip_norm} must be positive or null")


# ------------------------------------------------------------------ the regularized objective


def _is_kernel(path: tuple, _: Any) -> bool:
    last = path[-1] if path else None
    return getattr(last, "key", getattr(last, "name", None)) == "kernel"


# Which parameters the penalties reach: `kernels` = conv and dense kernels, which flax names
# `kernel`; biases, norm scales and shifts and other learned scalars are left out, as they set
# a layer's offset or scale rather than its capacity.
PENALTY_TARGETS: Registry[Callable[[tuple, Any], bool]] = Registry("regularization.apply_to")
PENALTY_TARGETS.register("kernels", _is_kernel)
PENALTY_TARGETS.register("all", lambda path, leaf: True)


def penalty_mask(params: Any, apply_to: str) -> Any:
    """True for the parameters `regularization.apply_to` selects."""
    return jax.tree_util.tree_map_with_path(PENALTY_TARGETS.get(apply_to), params)


def validate_regularization(reg: DictConfig) -> None:
    for key in ("l1", "l2"):
        require(reg[key] >= 0, f"regularization.{key}={reg[key]} must be >= 0")
    PENALTY_TARGETS.get(reg.apply_to)
    _unit_interval("regularization.label_smoothing", reg.label_smoothing)


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
