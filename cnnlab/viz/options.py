"""The `key=value` options of `cnnlab viz KIND RUN_DIR`, typed and checked before anything runs."""

import dataclasses
from collections.abc import Sequence

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cnnlab.errors import ConfigError, require
from cnnlab.registry import unknown_choice

WANDB_MODES = ("run", "offline", "disabled")
CLASS_TARGETS = ("label", "predicted")
NEURON_AT = ("center", "mean")


@dataclasses.dataclass
class VizOptions:
    """Every option of every kind (a kind reads the ones it needs; `cnnlab viz --help`)."""

    # Which weights: final (the newest checkpoint), best, or ema (as in cnnlab eval).
    weights: str = "final"
    # Test images shown (the first N, or `indices`).
    images: int = 8
    indices: list[int] | None = None
    # Class scores: `label` (each image's true class), `predicted`, or a class number.
    target: str = "label"
    # A layer as `cnnlab summary` names it (e.g. stage2_block1 or stage2_block1/conv1); several
    # for `activations` (layer=[stem,stage1_block3]). With a layer, gradient kinds and
    # neuron_ascent follow a neuron: `channel` at the map's centre (or mean over the map).
    layer: list[str] | None = None
    channels: list[int] | None = None
    neuron_at: str = "center"
    # Maps drawn per layer by `activations`.
    maps: int = 16
    # Gradient ascent (class_model, neuron_ascent): Yosinski et al. 2015's regularizers.
    steps: int = 200
    lr: float = 0.05
    l2: float = 1e-3
    blur_every: int = 4
    blur_sigma: float = 0.5
    clip_norm_pct: float = 10.0
    clip_contrib_pct: float = 10.0
    seed: int = 0
    # Occlusion: square side and stride in pixels, its grey level on the [0, 1] scale.
    size: int = 6
    stride: int = 2
    fill: float = 0.5
    # neighbors: nearest training images per test image; embedding: test points (null: all).
    k: int = 6
    points: int | None = 2000
    perplexity: float = 30.0
    thumbnails: int = 300
    # Images searched: training images by `neighbors`, test images by `patches` (null: all);
    # `top` patches per channel.
    search: int | None = 10000
    top: int = 9
    bins: int = 50
    dpi: int = 100
    # W&B: the run's own logger.mode, offline, or disabled (files only).
    wandb: str = "run"


def valid_keys() -> list[str]:
    return [f.name for f in dataclasses.fields(VizOptions)]


def parse(overrides: Sequence[str]) -> VizOptions:
    """`key=value` (or `viz.key=value`) strings -> VizOptions; ConfigError names the key."""
    dotlist = [o.removeprefix("viz.") for o in overrides]
    for item in dotlist:
        key = item.partition("=")[0]
        if key not in valid_keys():
            raise ConfigError(unknown_choice("option", key, valid_keys()))
    # A bare `layer=stem` is one layer; lists are written layer=[stem,stage1_block1].
    dotlist = [f"{item}" if not item.startswith(("layer=", "channels=")) or "[" in item
               else f"{item.partition('=')[0]}=[{item.partition('=')[2]}]" for item in dotlist]
    try:
        merged = OmegaConf.merge(OmegaConf.structured(VizOptions),
                                 OmegaConf.from_dotlist(dotlist))
        options = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = e.full_key if getattr(e, "full_key", None) else "option"
        raise ConfigError(f"{key}: {str(getattr(e, 'msg', e)).splitlines()[0]}") from None
    validate(options)
    return options


def _target_ok(target: str) -> bool:
    return target in CLASS_TARGETS or target.lstrip("-").isdigit()


def validate(o: VizOptions) -> None:
    require(o.wandb in WANDB_MODES, unknown_choice("wandb", o.wandb, list(WANDB_MODES)))
    require(o.neuron_at in NEURON_AT, unknown_choice("neuron_at", o.neuron_at, list(NEURON_AT)))
    require(_target_ok(o.target), f"target='{o.target}'; valid choices: "
            f"{', '.join(CLASS_TARGETS)} or a class number")
    for key in ("images", "maps", "steps", "size", "stride", "k", "thumbnails", "top", "bins",
                "dpi", "blur_every"):
        value = getattr(o, key)
        require(value > 0, f"{key}={value} must be a positive integer")
    for key in ("points", "search"):
        value = getattr(o, key)
        require(value is None or value > 0, f"{key}={value} must be a positive integer or null")
    for key in ("clip_norm_pct", "clip_contrib_pct"):
        value = getattr(o, key)
        require(0 <= value < 100, f"{key}={value} must be a percentile in [0, 100)")
    require(o.l2 >= 0 and o.lr > 0 and o.blur_sigma >= 0,
            "l2 and blur_sigma must be >= 0 and lr > 0")
    require(0 <= o.fill <= 1, f"fill={o.fill} must be a grey level in [0, 1]")
    require(o.perplexity > 0, f"perplexity={o.perplexity} must be positive")
    require(not o.indices or min(o.indices) >= 0, "indices must be >= 0")
