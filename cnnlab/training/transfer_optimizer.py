"""The optimizer of a transfer run: the run's own optimizer (cnnlab/training/optim.py) per role
(cnnlab/transfer/plan.py) through `optax.multi_transform`, so frozen parameters get no update, no
weight decay and no optimizer state at all (not a zeroed gradient that still costs an update).

Here rather than in cnnlab/transfer/: building the optimizer is training's job; transfer decides
each layer's role and is handed the optimizers built from it (cnnlab/training/build.py)."""

from typing import Any

import jax
import jax.numpy as jnp
import optax
from omegaconf import DictConfig

from cnnlab.training.optim import make_optimizer, with_clipping
from cnnlab.transfer.plan import BACKBONE, FROZEN, HEAD, Plan


def layer_labels(params: Any, plan: Plan) -> Any:
    """The role of every parameter: its top-level layer's."""
    return {layer: jax.tree.map(lambda _, role=plan.roles[layer]: role, subtree)
            for layer, subtree in params.items()}


def hold(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner`'s state, left as it is, with zero updates: the backbone during a probe phase.

    Its state does not advance, so its first real update (the fine-tuning phase) starts with
    fresh moments and a step count of zero, as if the parameters had just been created.
    """

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        return jax.tree.map(jnp.zeros_like, updates), state

    return optax.GradientTransformation(inner.init, update)


def make_transfer_optimizer(opt: DictConfig, schedule: optax.Schedule, plan: Plan,
                            backbone_lr_mult: float, probing: bool) -> optax.GradientTransformation:
    """The run's optimizer over `plan`'s roles; `probing`: two_phase's first phase.

    The backbone's own step count only starts once it trains, so its schedule is shifted by
    the probe steps: it follows the run's lr at the run's step, times `backbone_lr_mult`.
    `optimizer.clip_norm` clips the whole gradient, in front of the partition.
    """
    offset = plan.probe_steps

    def backbone_schedule(count: jax.Array) -> jax.Array:
        return backbone_lr_mult * schedule(count + offset)

    backbone = make_optimizer(opt, backbone_schedule, clip=False)
    transforms = {HEAD: make_optimizer(opt, schedule, clip=False),
                  BACKBONE: hold(backbone) if probing else backbone,
                  FROZEN: optax.set_to_zero()}
    return with_clipping(opt, optax.multi_transform(
        transforms, lambda params: layer_labels(params, plan)))


def phase_optimizers(cfg: DictConfig, schedule: optax.Schedule, plan: Plan
                     ) -> tuple[optax.GradientTransformation, optax.GradientTransformation | None]:
    """The main phase's optimizer and, with probe steps (two_phase), the probe phase's."""

    def tx(probing: bool) -> optax.GradientTransformation:
        return make_transfer_optimizer(cfg.optimizer, schedule, plan,
                                       cfg.transfer.backbone_lr_mult, probing)

    return tx(False), tx(True) if plan.probe_steps else None
