"""Which layers a transfer run loads, freezes and trains, decided from the config and the model.

Layers are the model's top-level layers in the order `cnnlab summary` lists them (`stem`,
`stage1_block1`, ... `head`; `conv1`, `pool1`, `conv2_1`, ... `classifier`). A name in
`transfer.load_through` / `freeze_through` is one of them, or a stage: the prefix before `_` of
consecutive layers (`stage2`, `conv3`), which stands for its last layer.

Every layer with parameters gets one role:

* `frozen`: no gradient is computed for it (the step stops the backward pass below the lowest
  trainable layer), and the optimizer gives it no update, no weight decay and no state.
* `backbone`: loaded from the source and trained, at lr x `transfer.backbone_lr_mult`; held
  still during two_phase's probe phase.
* `head`: trained at the full lr: the classifier, and any layer after `load_through` (freshly
  initialized, so nothing to preserve).

The roles depend on the config and the model only, never on the source's contents, so a run's
optimizer state has the same structure when it resumes without reading the source again.
"""

import dataclasses
from collections.abc import Callable, Sequence

from omegaconf import DictConfig

from cnnlab.errors import ConfigError, require
from cnnlab.registry import Registry
from cnnlab.transfer.adapt import ADAPTERS

FROZEN, BACKBONE, HEAD = "frozen", "backbone", "head"
BN_MODES = ("frozen", "train")
PREPROCESS_CHOICES = ("source", "own")


@dataclasses.dataclass(frozen=True)
class Mode:
    """A transfer mode: whether it needs a source, and its frozen layers (phase 2 for
    two_phase) given (loaded layers without the classifier, freeze_through's layers)."""

    needs_source: bool
    frozen: Callable[[list[str], list[str]], list[str]]
    # two_phase: a linear probe first, then this mode's roles.
    probes_first: bool = False
    # Keys only this mode reads (besides source, weights, load_through, reset_head, bn).
    keys: tuple[str, ...] = ()


MODES: Registry[Mode] = Registry("transfer")
MODES.register("scratch", Mode(needs_source=False, frozen=lambda loaded, named: []))
MODES.register("linear_probe", Mode(needs_source=True, frozen=lambda loaded, named: loaded))
MODES.register("finetune_top", Mode(needs_source=True, frozen=lambda loaded, named: named,
                                    keys=("freeze_through",)))
MODES.register("finetune_all", Mode(needs_source=True, frozen=lambda loaded, named: [],
                                    keys=("backbone_lr_mult",)))
MODES.register("two_phase", Mode(needs_source=True, frozen=lambda loaded, named: [],
                                 probes_first=True, keys=("backbone_lr_mult", "probe_steps")))
# Values a mode that does not read the key must leave alone (conf/transfer/_base.yaml's).
_UNUSED = {"freeze_through": None, "backbone_lr_mult": 1.0, "probe_steps": 0}


def validate(cfg: DictConfig) -> None:
    """The transfer keys alone (layer names are checked against the model in `make_plan`)."""
    tr = cfg.transfer
    mode = MODES.get(tr.mode)
    if not mode.needs_source:
        require(tr.source is None, f"transfer.source={tr.source} is set but transfer=scratch "
                "trains from the initializer; choose transfer=linear_probe, finetune_top, "
                "finetune_all or two_phase")
        return
    require(tr.source is not None, f"transfer={tr.mode} needs transfer.source=RUN_DIR or a "
            "torchvision .pth/.safetensors file")
    for key, default in _UNUSED.items():
        if key not in mode.keys:
            require(tr[key] == default, f"transfer.{key}={tr[key]} is not used by "
                    f"transfer={tr.mode}; leave it at {default}")
    require(tr.mode != "finetune_top" or tr.freeze_through is not None
            or tr.load_through is not None,
            "transfer=finetune_top needs transfer.freeze_through=LAYER (a layer or stage name "
            "as `cnnlab summary` prints them), or transfer.load_through to freeze all it loads")
    require(tr.backbone_lr_mult > 0,
            f"transfer.backbone_lr_mult={tr.backbone_lr_mult} must be positive")
    require(tr.bn in BN_MODES, f"transfer.bn='{tr.bn}'; valid choices: {', '.join(BN_MODES)}")
    require(tr.preprocess in PREPROCESS_CHOICES, f"transfer.preprocess='{tr.preprocess}'; "
            f"valid choices: {', '.join(PREPROCESS_CHOICES)}")
    ADAPTERS.get(tr.adapt_input)
    if mode.probes_first:
        steps, per_call = cfg.train.steps, cfg.train.steps_per_call
        require(0 < tr.probe_steps < steps, f"transfer.probe_steps={tr.probe_steps} must be "
                f"between 1 and train.steps={steps} - 1")
        require(tr.probe_steps % per_call == 0,
                f"transfer.probe_steps={tr.probe_steps} must be a multiple of "
                f"train.steps_per_call={per_call} (the phases switch between compiled calls)")


def resolve_layer(key: str, name: str, order: Sequence[str]) -> int:
    """The index in `order` of layer `name`, or of the last layer of stage `name`."""
    if name in order:
        return list(order).index(name)
    in_stage = [i for i, layer in enumerate(order) if layer.startswith(f"{name}_")]
    if in_stage:
        return in_stage[-1]
    stages = sorted({layer.split("_")[0] for layer in order if "_" in layer} - set(order))
    raise ConfigError(f"transfer.{key}={name} is not a layer of this model; valid: "
                      f"{', '.join(order)}{'; stages: ' + ', '.join(stages) if stages else ''}")


@dataclasses.dataclass(frozen=True)
class Plan:
    """The roles of a transfer run's layers (module docstring)."""

    mode: str
    # Top-level layers with parameters, in order; the last one is the classifier.
    layers: tuple[str, ...]
    # Layers whose weights come from the source (the classifier too unless it is reset).
    loaded: tuple[str, ...]
    roles: dict[str, str]
    probe_steps: int = 0
    # {layer here: the source's layer it loads from}; a layer not in it loads its namesake.
    layer_map: dict[str, str] = dataclasses.field(default_factory=dict)

    def source_key(self, key: str) -> str:
        """The source's path for this model's variable `key` (`params/<layer>/...`)."""
        collection, layer, *rest = key.split("/")
        return "/".join([collection, self.layer_map.get(layer, layer), *rest])

    @property
    def classifier(self) -> str:
        return self.layers[-1]

    def with_role(self, role: str) -> tuple[str, ...]:
        return tuple(layer for layer in self.layers if self.roles[layer] == role)

    def frozen_in(self, phase: str) -> tuple[str, ...]:
        """Layers frozen in `phase`: "probe" (two_phase's first steps) or "main"."""
        if phase == "probe":
            return self.with_role(FROZEN) + self.with_role(BACKBONE)
        return self.with_role(FROZEN)


def make_plan(tr: DictConfig, order: Sequence[str], with_params: Sequence[str]) -> Plan | None:
    """The plan for a model whose summary lists `order` (top-level layers) of which
    `with_params` have parameters; None for scratch (nothing to plan)."""
    mode = MODES.get(tr.mode)
    if not mode.needs_source:
        return None
    layers = [layer for layer in order if layer in with_params]
    require(not (tr.layer_map and tr.load_through is not None),
            "transfer.layer_map names the layers to load; leave transfer.load_through=null")
    for target in tr.layer_map:
        require(target in layers, f"transfer.layer_map: {target} is not a layer with "
                f"parameters of this model; valid: {', '.join(layers)}")
    last_loaded = (len(order) - 1 if tr.load_through is None
                   else resolve_layer("load_through", tr.load_through, order))
    loaded = [layer for layer in layers if order.index(layer) <= last_loaded
              and (not tr.layer_map or layer in tr.layer_map)]
    body = [layer for layer in loaded if layer != layers[-1]]
    named = []
    # finetune_top without freeze_through freezes all it loads (Yosinski et al.'s AnB).
    freeze_through = tr.freeze_through
    if freeze_through is None and tr.mode == "finetune_top":
        freeze_through = tr.load_through
    if freeze_through is not None:
        last_frozen = resolve_layer("freeze_through", freeze_through, order)
        named = [layer for layer in layers if order.index(layer) <= last_frozen]
        require(last_frozen <= last_loaded, f"transfer.freeze_through={freeze_through} is "
                f"past transfer.load_through={tr.load_through}: it would freeze random weights")
        require(layers[-1] not in named, f"transfer.freeze_through={freeze_through} "
                "freezes every layer, the classifier included: nothing would train")
    frozen = set(mode.frozen(body, named))
    roles = {layer: FROZEN if layer in frozen else BACKBONE if layer in body else HEAD
             for layer in layers}
    return Plan(tr.mode, tuple(layers), tuple(loaded), roles,
                tr.probe_steps if mode.probes_first else 0, dict(tr.layer_map))
