"""Model families, looked up by the `family` key of a `conf/model/*.yaml` file."""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cnnlab import parallel
from cnnlab.errors import ConfigError
from cnnlab.models import cifar_resnet, pattern, stack
from cnnlab.models.conv_choice import ConvChoice, check_mode
from cnnlab.models.layers import PRECISIONS, BatchNorm, InputFit, Layers, build_layers
from cnnlab.models.scan import scans_blocks, unrolled
from cnnlab.registry import Registry, described


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """A family's options and its module.

    `options` is a dataclass, the one place each of the family's options is declared:
    it is the config schema (its defaults are MISSING: conf/model/ holds the values), its
    `validate()` checks them, and the module holds it whole as its `options` field, so adding
    an option means adding one field there and reading it where it is used.
    """

    options: type
    # (options=, num_classes=, layers=, fit=) -> the Flax module: its class, or a function.
    module: Callable[..., nn.Module]

    def build(self, options: Any, num_classes: int, layers: Layers, fit: InputFit) -> nn.Module:
        """The module of `options` (from `model_options`): the same call for every family, as
        the module takes the options whole rather than a field-by-field copy of them."""
        return self.module(options=options, num_classes=num_classes, layers=layers, fit=fit)


FAMILIES: Registry[ModelFamily] = Registry("model family")
FAMILIES.register("cifar_resnet",
                  ModelFamily(cifar_resnet.CifarResNetOptions, cifar_resnet.CifarResNet))
FAMILIES.register("stack", ModelFamily(stack.StackOptions, stack.Stack))
FAMILIES.register("pattern", ModelFamily(pattern.PatternOptions, pattern.as_stack))

@dataclasses.dataclass
class ModelCommon:
    """Keys every model config has besides its family's own options (checked by
    `input_fit` and the family lookup; this declares them and their descriptions)."""

    name: str = described("the model's name in run folders, tables and W&B")
    family: str = described("the family that builds it: cifar_resnet, stack, pattern")
    input_size: int | None = described("side the images are brought to (null: their own)")
    input_fit: str = described("how: resize | pad (zero padding, e.g. LeNet-5's 28 -> 32)")


COMMON_KEYS = tuple(f.name for f in dataclasses.fields(ModelCommon))
INPUT_FITS = ("resize", "pad")


def model_schemas(family: str) -> tuple[type, type]:
    """The dataclasses a `family`'s model config is typed by: common keys, then its own."""
    return ModelCommon, FAMILIES.get(family).options


def input_fit(model_cfg: DictConfig) -> InputFit:
    """The model's `input_size` (null: the dataset's own) and how images are brought to it."""
    size, mode = model_cfg.get("input_size"), model_cfg.get("input_fit")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
        raise ConfigError(f"model.input_size={size!r} must be a positive integer or null")
    if mode not in INPUT_FITS:
        raise ConfigError(f"model.input_fit='{mode}'; valid choices: {', '.join(INPUT_FITS)}")
    return InputFit(size, mode)


def model_options(model_cfg: DictConfig) -> Any:
    """Type-check a model config against its family's schema and validate the values."""
    family = FAMILIES.get(model_cfg.family)
    own = {k: v for k, v in OmegaConf.to_container(model_cfg).items() if k not in COMMON_KEYS}
    try:
        merged = OmegaConf.merge(OmegaConf.structured(family.options), own)
    except OmegaConfBaseException as e:
        key = f"model.{e.full_key}" if getattr(e, "full_key", None) else "model"
        raise ConfigError(f"{key}: {e.msg.splitlines()[0]}") from None
    options = OmegaConf.to_object(merged)
    options.validate()
    input_fit(model_cfg)
    if getattr(options, "scan_blocks", False) is None:
        options = dataclasses.replace(options, scan_blocks=scans_on(parallel.platform()))
    return options


def scans_on(platform: str) -> bool:
    """What `model.scan_blocks: null` means on `platform` (`parallel.platform()`'s names):
    unrolled on CPU, where ResNet-56's step was 1.4-1.7x faster in 60% of the scan's memory;
    a scan on GPU and TPU, where it compiles faster in fewer collectives (ResNet-56 for a TPU
    v5e 2x2 slice: 21 s and 28 all-reduces a step, unrolled 72 s and 113; docs/speed.md)."""
    return platform != "cpu"


def compute_dtype(cfg: DictConfig) -> Any:
    """The dtype `train.precision` computes in; ConfigError names the choices. Configs saved
    before the key existed have none (null): fp32, as they were trained."""
    precision = OmegaConf.select(cfg, "train.precision")
    dtype = PRECISIONS.get("fp32" if precision is None else precision)
    # fp32 forces no dtype: layers compute in their inputs' and parameters' (float32, or float64
    # where the fidelity tests enable x64), as before train.precision existed.
    return None if dtype == jnp.float32 else dtype


def conv_impl_choice(cfg: DictConfig) -> ConvChoice:
    """`train.conv_impl` (ConfigError names the choices; null, from configs saved before the
    key: xla), its choices cached beside the compiled programs (`compile_cache_dir`)."""
    mode = check_mode(OmegaConf.select(cfg, "train.conv_impl"))
    return ConvChoice(mode, OmegaConf.select(cfg, "compile_cache_dir"))


def build_model(cfg: DictConfig, num_classes: int,
                frozen_norms: tuple[str, ...] = ()) -> nn.Module:
    """The Flax module a full run config describes; batch norms in the top-level layers
    `frozen_norms` normalize with their running statistics in training too (cnnlab/transfer).
    Its layers compute in `train.precision`'s dtype; its logits are float32 whatever it is."""
    layers = build_layers(cfg.init, cfg.activation, cfg.norm, compute_dtype(cfg),
                          conv_impl_choice(cfg))
    if frozen_norms and getattr(layers.norm, "func", None) is BatchNorm:
        layers = dataclasses.replace(
            layers, norm=functools.partial(layers.norm, frozen_layers=tuple(frozen_norms)))
    family = FAMILIES.get(cfg.model.family)
    model = family.build(model_options(cfg.model), num_classes, layers, input_fit(cfg.model))
    # A batch norm knows it is frozen by its path, which a scanned block's has lost.
    return unrolled(model) if frozen_norms else model


def abstract_variables(model: nn.Module, image_shape: tuple[int, ...]) -> Any:
    """The model's variables as shapes only: traces the model without compiling or computing.

    Tracing runs every layer's geometry check, so an impossible configuration fails here with
    a ConfigError naming the layer, before anything is compiled.
    """
    dummy = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), dummy)


def count_params(params: Any) -> int:
    return int(sum(p.size for p in jax.tree_util.tree_leaves(params)))


def init_variables(model: nn.Module, key: jax.Array, image_shape: tuple[int, ...]) -> Any:
    """Initialize on a single dummy image; shapes only depend on the input's H, W, C.

    Init runs once, so it is compiled without XLA's backend optimizations: on CPU that cuts its
    compile time about five-fold (ResNet-20: 10 s -> 2 s), far more than it could ever save.
    A model that scans its blocks (a deep one) is initialized op by op instead: init always
    unrolls the blocks (cnnlab/models/scan.py), and compiling that grows with depth (here
    ResNet-56 5 s, ResNet-110 11 s, ResNet-1202 8 min) while running it eagerly costs about
    10 s at any depth, most of it compiling each distinct op once. The weights are the same
    draws either way, up to one-ulp differences in rounding the normal's inverse CDF.
    """
    dummy = jnp.zeros((1, *image_shape), jnp.float32)
    if scans_blocks(model):
        return model.init(key, dummy, train=False)
    lowered = jax.jit(model.init, static_argnames="train").lower(key, dummy, train=False)
    compiled = lowered.compile(compiler_options={"xla_backend_optimization_level": 0})
    return compiled(key, dummy)


_checked: set[str] = set()


def check_geometry(cfg: DictConfig, image_shape: tuple[int, ...]) -> None:
    """Trace the model on `image_shape` (no compiling); ConfigError names an impossible layer."""
    key = OmegaConf.to_yaml({k: cfg[k] for k in ("model", "init", "activation", "norm")})
    key += f"{image_shape}{cfg.dataset.num_classes}"
    if key not in _checked:
        abstract_variables(build_model(cfg, cfg.dataset.num_classes or 10), image_shape)
        _checked.add(key)
