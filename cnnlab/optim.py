"""Optax optimizers and learning-rate schedules from the `optimizer` and `schedule` configs."""

import jax.numpy as jnp
import optax
from omegaconf import DictConfig


def make_schedule(sched: DictConfig, lr: float, total_steps: int) -> optax.Schedule:
    """The lr at each step; milestones are fractions of `total_steps`."""
    if sched.name == "step":
        boundaries = {int(round(m * total_steps)): sched.factor for m in sched.milestones}
        main = optax.piecewise_constant_schedule(lr, boundaries)
    elif sched.name == "cosine":
        main = optax.cosine_decay_schedule(lr, max(total_steps, 1), alpha=sched.final_factor)
    else:
        main = optax.constant_schedule(lr)
    warmup = sched.warmup_steps
    if not warmup:
        return main

    def with_warmup(step: jnp.ndarray) -> jnp.ndarray:
        # Linear ramp to the scheduled value; milestones keep counting from step 0.
        return jnp.where(step < warmup, lr * (step + 1) / warmup, main(step))

    return with_warmup


def make_optimizer(opt: DictConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    """SGD with momentum and coupled weight decay (the L2 gradient term, applied to all params,
    as PyTorch's `SGD(weight_decay=...)` and the ResNet paper do)."""
    return optax.chain(
        optax.add_decayed_weights(opt.weight_decay),
        optax.sgd(schedule, momentum=opt.momentum or None, nesterov=opt.nesterov),
    )
