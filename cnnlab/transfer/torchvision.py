"""torchvision's published ImageNet weights as cnnlab variables, the same function exactly.

torchvision names its tensors after its own modules (`layer1.0.conv1.weight`) and stores them in
PyTorch's layouts; cnnlab's are Flax paths (`params/conv2_1/conv1/kernel`) in JAX's layouts.
`convert` renames by explicit tables, one per architecture (nothing is matched by guessing), and
changes the layouts:

    conv weight  (out, in, H, W)  ->  kernel (H, W, in, out)
    fc weight    (out, in)        ->  kernel (in, out); the first fc after a conv stack (VGG,
                                      AlexNet) also reorders its inputs from PyTorch's (C, H, W)
                                      flattening to cnnlab's NHWC (H, W, C) flattening
    batch norm   weight, bias, running_mean, running_var  ->  scale, bias (params) and
                                      mean, var (batch_stats)

Batch-normalized VGGs give their convs a bias, which cnnlab leaves out before a norm with a shift
(the norm subtracts it away): it is folded into the norm's running mean, BN(x + b) with mean m
being BN(x) with mean m - b. Everything is checked against the variables of the cnnlab model the
config builds: a tensor the model has no place for, a place no tensor fills, a shape that
differs, or a model setting that computes another function (torchvision's ResNet-50 is "v1.5",
its stride in the 3x3) is a one-line ConfigError saying what to set.
"""

import dataclasses
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flax import traverse_util
from omegaconf import DictConfig, OmegaConf

from cnnlab.config.groups import CONF_DIR
from cnnlab.errors import ConfigError
from cnnlab.models import FAMILIES, abstract_variables, input_fit, model_options
from cnnlab.models.layers import build_layers

TORCH_SUFFIXES = (".pth", ".pt")
SUFFIXES = (*TORCH_SUFFIXES, ".safetensors")
# torchvision's VGG and AlexNet reach their first fc through AdaptiveAvgPool2d, the identity
# only at this input size (7x7 and 6x6 maps); cnnlab has no adaptive pooling.
IMAGE_SIDE = 224


# ---------------------------------------------------------------------------------------------
# Reading a weights file


def _read_torch(path: Path) -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        raise ConfigError(f"reading {path} needs PyTorch: pip install 'cnnlab[transfer]', or "
                          "save the weights as .safetensors") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (pickle, zip and torch errors alike: one line)
        raise ConfigError(f"cannot read {path} as a PyTorch state dict ({_first_line(e)}); "
                          "give a file written by torch.save(model.state_dict())") from None
    if not isinstance(state, Mapping) or not all(map(torch.is_tensor, state.values())):
        raise ConfigError(f"{path} holds no state dict (name -> tensor); give a file written by "
                          "torch.save(model.state_dict())")
    return {name: value.detach().to(torch.float32).numpy() for name, value in state.items()}


def _read_safetensors(path: Path) -> dict[str, Any]:
    try:
        from safetensors.numpy import load_file
    except ImportError:
        raise ConfigError(f"reading {path} needs safetensors: pip install 'cnnlab[transfer]'"
                          ) from None
    try:
        return load_file(path)
    except Exception as e:  # noqa: BLE001 (header, dtype and I/O errors alike: one line)
        raise ConfigError(f"cannot read {path} as safetensors ({_first_line(e)}); give a file "
                          "written by safetensors' save_file") from None


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def read_weights_file(path: str | Path) -> dict[str, np.ndarray]:
    """A torchvision state dict from a `.pth`/`.pt` file (read with torch, weights only: a
    pickle runs no code) or a `.safetensors` file (read without torch): name -> float32 array.

    `num_batches_tracked` is dropped: it only sets a momentum PyTorch's defaults never use, and
    cnnlab has no counterpart. Any failure is one ConfigError naming the path and the fix.
    """
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise ConfigError(f"weights file {path}: unknown kind '{path.suffix}'; give a "
                          f"{', '.join(SUFFIXES)} file")
    if not path.is_file():
        raise ConfigError(f"weights file {path} does not exist; give the path of a torchvision "
                          "state dict (e.g. resnet18-f37072fd.pth from torchvision's model zoo)")
    raw = _read_safetensors(path) if path.suffix == ".safetensors" else _read_torch(path)
    return {name: np.asarray(value, dtype=np.float32) for name, value in raw.items()
            if not name.endswith("num_batches_tracked")}


# ---------------------------------------------------------------------------------------------
# The architectures: cnnlab module path -> torchvision module prefix


@dataclasses.dataclass(frozen=True)
class Source:
    """The torchvision network a cnnlab model takes its weights from."""

    torch_name: str
    # cnnlab module path -> torchvision module prefix (None: not a torchvision module).
    rename: Callable[[str], str | None]
    # torchvision's classifier: its weight's rows are the number of classes.
    classifier: str
    # model.<key> -> (the value torchvision's network computes with, why), checked first.
    settings: dict[str, tuple[Any, str]]
    # The norm torchvision's network uses: "batch" or "none" (a VGG's weights tell: _bn or not).
    norm: str
    # (cnnlab dense module, channels, side): the fc that flattens the last C x side x side maps.
    flatten: tuple[str, int, int] | None = None
    # cnnlab norm module -> torchvision conv whose bias is folded into that norm's mean.
    folds: Callable[[str], str | None] = lambda module: None


def _block(match: re.Match) -> str:
    """cnnlab's residual block conv<S>_<B> is torchvision's layer<S-1>.<B-1>."""
    return f"layer{int(match[1]) - 1}.{int(match[2]) - 1}"


_RESNET_RULES: list[tuple[str, Callable[[re.Match], str]]] = [
    (r"conv1/conv", lambda m: "conv1"),
    (r"conv1/norm/BatchNorm_0", lambda m: "bn1"),
    (r"conv(\d)_(\d+)/conv(\d)", lambda m: f"{_block(m)}.conv{m[3]}"),
    (r"conv(\d)_(\d+)/norm(\d)/BatchNorm_0", lambda m: f"{_block(m)}.bn{m[3]}"),
    (r"conv(\d)_(\d+)/shortcut/proj", lambda m: f"{_block(m)}.downsample.0"),
    (r"conv(\d)_(\d+)/shortcut/proj_norm/BatchNorm_0", lambda m: f"{_block(m)}.downsample.1"),
    (r"classifier/dense", lambda m: "fc"),
]


def _resnet_rename(module: str) -> str | None:
    for pattern, make in _RESNET_RULES:
        if match := re.fullmatch(pattern, module):
            return make(match)
    return None


_RESNET_SETTINGS = {
    "family": ("stack", "torchvision's ResNets are layer lists"),
    "residual": (True, "the weights were trained with shortcuts"),
    "shortcut": ("B", "torchvision projects with a 1x1 conv where the shape changes"),
    "stochastic_depth": (1.0, "stochastic depth rescales blocks at test time"),
    "width": (1.0, "the weights have torchvision's widths"),
}
# torchvision's bottleneck ResNets stride in the 3x3 ("v1.5"), not the paper's first 1x1.
_V15 = {"stride_at": ("3x3", "torchvision's ResNet-50/101/152 are 'v1.5', stride in the 3x3")}


def _resnet(depth: int, bottleneck: bool) -> Source:
    settings = {**_RESNET_SETTINGS, **(_V15 if bottleneck else {})}
    return Source(f"resnet{depth}", _resnet_rename, "fc.weight", settings, "batch")


# torchvision.models.vgg's `cfgs`: output channels of each 3x3 conv, "M" a 2x2 max pooling.
_VGG_CFGS: dict[str, list[int | str]] = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "B": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512,
          "M"],
    "E": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512,
          512, 512, 512, "M"],
}
# torchvision's classifier: Linear, ReLU, Dropout, Linear, ReLU, Dropout, Linear.
_VGG_HEAD = {"fc1/dense": "classifier.0", "fc2/dense": "classifier.3",
             "classifier/dense": "classifier.6"}


def _vgg_conv_indices(cfg: list[int | str]) -> list[int]:
    """Where torchvision's make_layers puts each conv in the plain network's `features`: a conv
    and its ReLU take two places, a pooling one. With batch norm (conv, BN, ReLU) the k-th conv
    (from 0) sits k places further, one BN for each conv before it."""
    indices, index = [], 0
    for entry in cfg:
        if entry == "M":
            index += 1
        else:
            indices.append(index)
            index += 2
    return indices


def _table_rename(table: dict[str, str]) -> Callable[[str], str | None]:
    return table.get


def _vgg_table(cfg: list[int | str], batch_norm: bool) -> dict[str, str]:
    table = dict(_VGG_HEAD)
    for k, index in enumerate(_vgg_conv_indices(cfg)):
        at = index + k if batch_norm else index
        table[f"conv{k + 1}/conv"] = f"features.{at}"
        if batch_norm:
            table[f"conv{k + 1}/norm/BatchNorm_0"] = f"features.{at + 1}"
    return table


_VGG_SETTINGS = {
    "family": ("stack", "torchvision's VGGs are layer lists"),
    "input_size": (IMAGE_SIDE, "the first fc sees 7x7 maps, as torchvision's at 224 pixels"),
    "width": (1.0, "the weights have torchvision's widths"),
}
# cnnlab model -> (torchvision name, configuration).
_VGGS = {"vgg_a": ("vgg11", "A"), "vgg_b": ("vgg13", "B"), "vgg_d": ("vgg16", "D"),
         "vgg_e": ("vgg19", "E")}


def _vgg(name: str, batch_norm: bool) -> Source:
    torch_name, letter = _VGGS[name]
    table = _vgg_table(_VGG_CFGS[letter], batch_norm)
    folds = {cnnlab.replace("/conv", "/norm/BatchNorm_0"): torch for cnnlab, torch in table.items()
             if batch_norm and cnnlab.endswith("/conv")}
    return Source(torch_name + ("_bn" if batch_norm else ""), _table_rename(table),
                  "classifier.6.weight", _VGG_SETTINGS, "batch" if batch_norm else "none",
                  flatten=("fc1/dense", 512, 7), folds=folds.get)


# torchvision.models.AlexNet: features = conv, ReLU, pool, conv, ReLU, pool, conv, ReLU, conv,
# ReLU, conv, ReLU, pool; classifier = Dropout, Linear, ReLU, Dropout, Linear, ReLU, Linear.
_ALEXNET = {"conv1/conv": "features.0", "conv2/conv": "features.3", "conv3/conv": "features.6",
            "conv4/conv": "features.8", "conv5/conv": "features.10", "fc6/dense": "classifier.1",
            "fc7/dense": "classifier.4", "classifier/dense": "classifier.6"}
_ALEXNET_SOURCE = Source("alexnet", _table_rename(_ALEXNET), "classifier.6.weight",
                         {**_VGG_SETTINGS, "input_size": (IMAGE_SIDE, "the first fc sees 6x6 "
                                                          "maps, as torchvision's at 224 pixels")},
                         "none", flatten=("fc6/dense", 256, 6))

RESNETS = {"resnet18": (18, False), "resnet34": (34, False), "resnet50": (50, True),
           "resnet101": (101, True), "resnet152": (152, True)}
SUPPORTED = (*RESNETS, *_VGGS, "alexnet_torchvision")


def _source(cfg_model: DictConfig, state_dict: Mapping[str, np.ndarray]) -> Source:
    name = cfg_model.get("name")
    if name in RESNETS:
        return _resnet(*RESNETS[name])
    if name in _VGGS:
        return _vgg(name, any(key.endswith("running_mean") for key in state_dict))
    if name == "alexnet_torchvision":
        return _ALEXNET_SOURCE
    raise ConfigError(f"model={name} has no torchvision weights; valid choices: "
                      f"{', '.join(SUPPORTED)} (model=alexnet_torchvision for AlexNet)")


def _check_settings(source: Source, cfg_model: DictConfig, norm: str) -> None:
    for key, (want, why) in source.settings.items():
        got = cfg_model.get(key)
        if got != want:
            raise ConfigError(f"torchvision {source.torch_name} weights need model.{key}={want}, "
                              f"not {got} ({why}); set model.{key}={want}")
    if source.norm != norm:
        kind = "with batch norm" if source.norm == "batch" else "without batch norm"
        raise ConfigError(f"torchvision {source.torch_name} weights ({kind}) need "
                          f"norm={source.norm}, not {norm}; set norm={source.norm}")


# ---------------------------------------------------------------------------------------------
# Converting


def _cnnlab_shapes(cfg_model: DictConfig, norm: str, num_classes: int) -> dict[str, tuple]:
    """path -> shape of every variable of the cnnlab model (traced, nothing computed); init and
    activation do not change the variables, so the defaults stand in."""
    nodes = [OmegaConf.load(CONF_DIR / group / f"{choice}.yaml")
             for group, choice in (("init", "he_normal"), ("activation", "relu"), ("norm", norm))]
    model = FAMILIES.get(cfg_model.family).build(model_options(cfg_model), num_classes,
                                                 build_layers(*nodes), input_fit(cfg_model))
    side = cfg_model.get("input_size") or IMAGE_SIDE
    variables = abstract_variables(model, (side, side, 3))
    return {path: tuple(leaf.shape)
            for path, leaf in traverse_util.flatten_dict(variables, sep="/").items()}


# cnnlab leaf name -> torchvision tensor name.
_LEAVES = {"kernel": "weight", "bias": "bias", "scale": "weight", "mean": "running_mean",
           "var": "running_var"}


def _layout(array: np.ndarray, module: str, leaf: str, source: Source) -> np.ndarray:
    """PyTorch's layout of one tensor -> cnnlab's."""
    if leaf != "kernel":
        return array
    if array.ndim == 4:  # (out, in, H, W) -> (H, W, in, out)
        return array.transpose(2, 3, 1, 0)
    if source.flatten and source.flatten[0] == module and array.ndim == 2:
        _, channels, side = source.flatten
        if array.shape[1] == channels * side * side:  # (out, C*H*W) -> (H*W*C, out)
            out = array.shape[0]
            return array.reshape(out, channels, side, side).transpose(0, 2, 3, 1).reshape(
                out, -1).T
    return array.T  # (out, in) -> (in, out)


class _Reader:
    """Takes tensors out of the state dict by name, remembering which were used."""

    def __init__(self, state_dict: Mapping[str, np.ndarray], torch_name: str) -> None:
        self.state_dict = {key: value for key, value in state_dict.items()
                           if not key.endswith("num_batches_tracked")}
        self.torch_name, self.used = torch_name, set()

    def take(self, key: str, needed_by: str) -> np.ndarray:
        if key not in self.state_dict:
            raise ConfigError(f"the state dict has no '{key}' (cnnlab's {needed_by} needs it); "
                              f"give torchvision {self.torch_name} weights")
        self.used.add(key)
        return np.asarray(self.state_dict[key], dtype=np.float32)

    def check_all_used(self, model_name: str) -> None:
        unused = sorted(set(self.state_dict) - self.used)
        if unused:
            raise ConfigError(f"the state dict's '{unused[0]}' has no place in model={model_name} "
                              f"({len(unused)} unused tensors); give torchvision "
                              f"{self.torch_name} weights, or a model that matches them")


def _variable(path: str, shape: tuple, source: Source, reader: _Reader) -> np.ndarray:
    """The value of one cnnlab variable `path` (collection/module.../leaf) from the state dict."""
    _, _, rest = path.partition("/")
    module, _, leaf = rest.rpartition("/")
    prefix = source.rename(module)
    if prefix is None or leaf not in _LEAVES:
        raise ConfigError(f"cnnlab's {path} has no counterpart in torchvision "
                          f"{source.torch_name}; use the model config as shipped")
    key = f"{prefix}.{_LEAVES[leaf]}"
    value = _layout(reader.take(key, path), module, leaf, source)
    if leaf == "mean" and (conv := source.folds(module)) is not None:
        value = value - reader.take(f"{conv}.bias", path)
    if value.shape != shape:
        raise ConfigError(f"the state dict's '{key}' has shape {reader.state_dict[key].shape}, "
                          f"which does not give cnnlab's {path} {shape}; give torchvision "
                          f"{source.torch_name} weights for this model config")
    return np.ascontiguousarray(value, dtype=np.float32)


def convert(state_dict: Mapping[str, np.ndarray], cfg_model: DictConfig,
            norm: str) -> dict[str, np.ndarray]:
    """torchvision weights -> the variables of the cnnlab model `cfg_model` with norm `norm`
    (cfg.model, cfg.norm.name), as one flat dict "params/<path>" / "batch_stats/<path>": the
    paths of flax.traverse_util.flatten_dict(variables, sep="/"), every one of them.

    The classifier keeps torchvision's classes (its weight's rows); replacing it for another
    task is the caller's. Settings that would compute another function are refused first.
    """
    source = _source(cfg_model, state_dict)
    _check_settings(source, cfg_model, norm)
    reader = _Reader(state_dict, source.torch_name)
    num_classes = reader.take(source.classifier, "classifier").shape[0]
    shapes = _cnnlab_shapes(cfg_model, norm, num_classes)
    converted = {path: _variable(path, shape, source, reader) for path, shape in shapes.items()}
    reader.check_all_used(cfg_model.name)
    return converted
