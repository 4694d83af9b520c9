"""The `key=value` options of `cnnlab viz KIND RUN_DIR`, typed and checked before anything runs."""

import dataclasses
from collections.abc import Sequence

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cnnlab.errors import ConfigError, require
from cnnlab.registry import described, unknown_choice

WANDB_MODES = ("run", "offline", "disabled")
CLASS_TARGETS = ("label", "predicted")
NEURON_AT = ("center", "mean")


@dataclasses.dataclass
class VizOptions:
    """Every option of every kind; `READS` says which kinds read which (`cnnlab viz --help`)."""

    weights: str = described("final (the newest checkpoint), best, or ema, as in cnnlab eval",
                             "final")
    images: int = described("test images shown: the first N", 8)
    indices: list[int] | None = described("these test images instead of the first N", None)
    target: str = described("class explained: label, predicted, or a class number", "label")
    # Several for `activations` (layer=[stem,stage1_block3]).
    layer: list[str] | None = described("a layer as cnnlab summary names it, or [a,b]", None)
    channels: list[int] | None = described("channels of `layer` (a neuron each)", None)
    neuron_at: str = described("a channel's centre unit (center) or its mean over the map",
                               "center")
    maps: int = described("feature maps drawn per layer", 16)
    # Gradient ascent (class_model, neuron_ascent): Yosinski et al. 2015's regularizers.
    steps: int = described("ascent steps", 200)
    lr: float = described("ascent step in pixel units (normalized by the mean |gradient|)",
                          0.05)
    l2: float = described("L2 decay per step: x <- (1 - l2) x about the mean colour", 1e-3)
    blur_every: int = described("Gaussian blur every N steps", 4)
    blur_sigma: float = described("blur width in pixels (0: none)", 0.5)
    clip_norm_pct: float = described("pixels of norm below this percentile reset to the mean",
                                     10.0)
    clip_contrib_pct: float = described("pixels of |x * gradient| below this percentile reset",
                                        10.0)
    seed: int = described("seed of the start noise, t-SNE and the points drawn", 0)
    size: int = described("occluding square's side in pixels", 6)
    stride: int = described("occluding square's stride in pixels", 2)
    fill: float = described("occluding square's grey level on [0, 1]", 0.5)
    k: int = described("nearest training images per test image, in each space", 6)
    points: int | None = described("test points embedded (null: all)", 2000)
    perplexity: float = described("t-SNE perplexity", 30.0)
    thumbnails: int = described("images drawn on the t-SNE map", 300)
    # Training images by `neighbors`, test images by `patches`.
    search: int | None = described("images searched: the first N (null: all)", 10000)
    top: int = described("patches per channel", 9)
    bins: int = described("histogram bins of the weights", 50)
    dpi: int = described("PNG resolution", 100)
    wandb: str = described("W&B: run (the run's own logger.mode), offline, or disabled", "run")


# Which options each kind reads: one table that `cnnlab viz --help`, docs/viz.md's table and
# the refusal of an option a kind does not read all come from (tests/test_help.py checks each
# kind reads what it says). Every kind also reads COMMON; REQUIRES: options a kind needs set.
COMMON = ("weights", "dpi", "wandb")
_IMAGES = ("images", "indices")
_GRADIENTS = (*_IMAGES, "target", "layer", "channels", "neuron_at")
_ASCENT = ("steps", "lr", "l2", "blur_every", "blur_sigma", "clip_norm_pct", "clip_contrib_pct",
           "seed")
READS: dict[str, tuple[str, ...]] = {
    "filters": ("bins",),
    "activations": ("layer", *_IMAGES, "maps"),
    "saliency": _GRADIENTS,
    "guided_backprop": _GRADIENTS,
    "deconvnet": _GRADIENTS,
    "occlusion": (*_IMAGES, "target", "size", "stride", "fill"),
    "patches": ("layer", "channels", "search", "top"),
    "neighbors": (*_IMAGES, "search", "k"),
    "class_model": ("target", *_ASCENT),
    "neuron_ascent": ("layer", "channels", "neuron_at", *_ASCENT),
    "embedding": ("points", "perplexity", "thumbnails", "seed"),
}
REQUIRES: dict[str, tuple[str, ...]] = {"patches": ("layer",), "neuron_ascent": ("layer",)}


def readers(option: str) -> list[str]:
    """The kinds that read `option` (every kind for the COMMON ones)."""
    return sorted(kind for kind, reads in READS.items() if option in COMMON + reads)


def markdown_table() -> str:
    """docs/viz.md's table of the options, from VizOptions and READS (a test compares them)."""
    lines = ["| option | default | read by | meaning |", "| --- | --- | --- | --- |"]
    for field in dataclasses.fields(VizOptions):
        default = "null" if field.default is None else field.default
        meaning = field.metadata["help"].replace("|", "\\|")
        lines.append(f"| `{field.name}` | `{default}` | {read_by(field.name)} | {meaning} |")
    return "\n".join(lines)


def read_by(option: str) -> str:
    """`every kind`, or the kinds that read `option`, for help and docs."""
    kinds = readers(option)
    return "every kind" if len(kinds) == len(READS) else ", ".join(kinds)


def check_reads(kind: str, keys: Sequence[str]) -> None:
    """An option given to a kind that does not read it is refused (it would change nothing)."""
    for key in keys:
        if key not in COMMON + READS[kind]:
            raise ConfigError(f"viz {kind} does not read {key}=; it is read by "
                              f"{', '.join(readers(key))}")


def valid_keys() -> list[str]:
    return [f.name for f in dataclasses.fields(VizOptions)]


def parse(overrides: Sequence[str], kind: str | None = None) -> VizOptions:
    """`key=value` (or `viz.key=value`) strings -> VizOptions; ConfigError names the key, or
    one that `kind` does not read."""
    dotlist = [o.removeprefix("viz.") for o in overrides]
    for item in dotlist:
        key = item.partition("=")[0]
        if key not in valid_keys():
            raise ConfigError(unknown_choice("option", key, valid_keys()))
    if kind is not None:
        check_reads(kind, [item.partition("=")[0] for item in dotlist])
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
