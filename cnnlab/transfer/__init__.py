"""Transfer learning: the `transfer=` config group (conf/transfer/).

* `scratch`: the initializer's weights (the default).
* `linear_probe`: the source's layers frozen, a new classifier trained on their features.
* `finetune_top`: frozen through `transfer.freeze_through`, the layers above it trained.
* `finetune_all`: everything trains, the loaded layers at lr x `transfer.backbone_lr_mult`.
* `two_phase`: a linear probe for `transfer.probe_steps` steps, then `finetune_all`.

The source is an earlier cnnlab run or published PyTorch weights (cnnlab/transfer/sources.py);
its layers are copied by path (load.py); each layer's role, frozen, backbone or head, is decided
from the config and the model alone (plan.py) and given to the optimizer (built by training:
cnnlab/training/transfer_optimizer.py), to the training step (no gradient for frozen layers:
`steps.make_train_step(frozen=...)`) and to batch norm (frozen layers normalize with their
running statistics unless `transfer.bn=train`).
"""

import dataclasses
import logging
from typing import Any

import flax.linen as nn
import jax
import optax
from omegaconf import DictConfig

from cnnlab.models import abstract_variables, build_model
from cnnlab.models.summary import summarize
from cnnlab.transfer.load import Loaded, load
from cnnlab.transfer.plan import FROZEN, MODES, Plan, make_plan, validate
from cnnlab.transfer.sources import read_source

__all__ = ["MODES", "Plan", "Setup", "frozen_mask", "load_source", "plan_for", "setup",
           "validate"]

log = logging.getLogger(__name__)


def plan_for(cfg: DictConfig, model: nn.Module, image_shape: tuple[int, ...]) -> Plan | None:
    """The run's plan (None for scratch, which traces nothing): layer names from the model's
    own summary, the layers with parameters from its variables' shapes."""
    if not MODES.get(cfg.transfer.mode).needs_source:
        return None
    order = [row.name for row in summarize(model, image_shape).at_depth(1)]
    return make_plan(cfg.transfer, order, list(abstract_variables(model, image_shape)["params"]))


def frozen_mask(params: Any, frozen: tuple[str, ...]) -> Any:
    """True for the parameters of the `frozen` layers (static: the step stops their gradient)."""
    return {layer: jax.tree.map(lambda _, f=layer in frozen: f, subtree)
            for layer, subtree in params.items()}


@dataclasses.dataclass
class Setup:
    """A transfer run's pieces beyond a scratch run's: its plan and, for two_phase, the model and
    optimizer of the probe phase (same variables and optimizer-state structure as the main
    ones: only which layers train, and batch norm's mode in them, differ)."""

    plan: Plan
    tx: optax.GradientTransformation
    probe_model: nn.Module | None = None
    probe_tx: optax.GradientTransformation | None = None
    loaded: Loaded | None = None

    def frozen(self, phase: str) -> tuple[str, ...]:
        return self.plan.frozen_in(phase)


def setup(cfg: DictConfig, plan: Plan, num_classes: int, tx: optax.GradientTransformation,
          probe_tx: optax.GradientTransformation | None = None) -> tuple[nn.Module, Setup]:
    """The main phase's model and the transfer `Setup`; `tx`/`probe_tx`: the main and probe
    phases' optimizers (cnnlab/training/transfer_optimizer.py), the probe's for two_phase."""

    def norms_frozen(phase: str) -> tuple[str, ...]:
        return plan.frozen_in(phase) if cfg.transfer.bn == "frozen" else ()

    model = build_model(cfg, num_classes, norms_frozen("main"))
    if not plan.probe_steps:
        return model, Setup(plan, tx)
    return model, Setup(plan, tx, build_model(cfg, num_classes, norms_frozen("probe")), probe_tx)


def load_source(cfg: DictConfig, plan: Plan, variables: dict[str, Any]) -> Loaded:
    """`variables` with the source's weights in `plan.loaded`'s layers; says what it did."""
    source = read_source(cfg)
    loaded = load(variables, source, plan, cfg.transfer.reset_head, cfg.transfer.adapt_input)
    log.info("transfer (%s): loaded %d layers (%d tensors) from %s%s%s%s", plan.mode,
             len(loaded.layers), loaded.tensors, source.description,
             "; new classifier" if loaded.head_reset else "",
             f"; {', '.join(loaded.adapted)} adapted to the data's channels "
             f"(transfer.adapt_input={cfg.transfer.adapt_input})" if loaded.adapted else "",
             f"; not in the source, left at their initialization: {', '.join(loaded.missing)}"
             if loaded.missing else "")
    frozen = plan.with_role(FROZEN)
    if frozen:
        log.info("transfer: frozen %s", ", ".join(frozen))
    return loaded

