"""The PyTorch reference for cnnlab's CIFAR nets: He et al. 2016 section 4.2, written the way
the paper and the common PyTorch ports (e.g. akamaster/pytorch_resnet_cifar10) write them, with
no cnnlab code.

Depth 6n+2: a 3x3 conv (16 filters), three stages of n two-conv blocks with 16/32/64 filters,
the first block of stages 2 and 3 striding by 2, global average pooling and a linear layer.
Convolutions have no bias and are followed by BatchNorm (PyTorch's defaults: momentum 0.1,
eps 1e-5) and ReLU. `residual=False` gives the plain counterpart. Shortcuts are option A: the
identity, or where the shape changes x[:, :, ::2, ::2] with the new channels zero-padded half on
each side. Padding is PyTorch's symmetric `padding=1`. Convolution weights are He normal
(`kaiming_normal_`, fan_in, plain normal), the linear layer keeps PyTorch's default.

`from_cnnlab` loads cnnlab's Flax parameters and BN statistics into this net, names and layouts
mapped explicitly, so the two can be compared on the same weights (tests/test_fidelity.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class ShortcutA(nn.Module):
    """Option A: subsample by 2 and zero-pad the new channels (no parameters)."""

    def __init__(self, in_planes: int, planes: int) -> None:
        super().__init__()
        self.extra = planes - in_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = self.extra // 2
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, low, self.extra - low))


class Block(nn.Module):
    """conv-BN-ReLU-conv-BN, plus the shortcut when residual, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int, residual: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.residual = residual
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = ShortcutA(in_planes, planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        if self.residual:
            out = out + self.shortcut(x)
        return F.relu(out)


class CifarNet(nn.Module):
    def __init__(self, depth: int, residual: bool = True, in_channels: int = 3,
                 num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        blocks, in_planes = [], width
        for stage in range(3):
            planes = width * 2**stage
            for i in range(n):
                blocks.append(Block(in_planes, planes, 2 if stage and not i else 1, residual))
                in_planes = planes
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(in_planes, num_classes)
        self.n = n
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.blocks(F.relu(self.bn1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


# ------------------------------------------------------------------ cnnlab weights -> PyTorch


def _conv(kernel: Any) -> torch.Tensor:
    """Flax HWIO (kh, kw, in, out) -> PyTorch OIHW (out, in, kh, kw)."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(kernel).transpose(3, 2, 0, 1)))


def _tensor(value: Any) -> torch.Tensor:
    return torch.from_numpy(np.array(value, dtype=np.float32))


def _bn(module: nn.BatchNorm2d, params: Mapping, stats: Mapping) -> dict[str, torch.Tensor]:
    # cnnlab's BatchNorm wraps Flax's as its only child, `BatchNorm_0`.
    p, s = params["BatchNorm_0"], stats["BatchNorm_0"]
    return {"weight": _tensor(p["scale"]), "bias": _tensor(p["bias"]),
            "running_mean": _tensor(s["mean"]), "running_var": _tensor(s["var"])}


def cnnlab_names(n: int) -> list[tuple[str, str]]:
    """(PyTorch module path, cnnlab module name) of every conv and BN, in network order."""
    pairs = [("conv1", "stem"), ("bn1", "stem_norm")]
    for stage in range(3):
        for block in range(n):
            here = f"blocks.{stage * n + block}"
            there = f"stage{stage + 1}_block{block + 1}"
            pairs += [(f"{here}.conv1", f"{there}/conv1"), (f"{here}.bn1", f"{there}/norm1"),
                      (f"{here}.conv2", f"{there}/conv2"), (f"{here}.bn2", f"{there}/norm2")]
    return pairs


def _at(tree: Mapping, path: str) -> Mapping:
    for part in path.split("/"):
        tree = tree[part]
    return tree


def from_cnnlab(net: CifarNet, params: Mapping, batch_stats: Mapping) -> CifarNet:
    """Loads cnnlab's CifarResNet variables into `net` (every tensor, checked by shape)."""
    state: dict[str, torch.Tensor] = {}
    for here, there in cnnlab_names(net.n):
        module = net.get_submodule(here)
        if isinstance(module, nn.Conv2d):
            state[f"{here}.weight"] = _conv(_at(params, there)["kernel"])
        else:
            bn = _bn(module, _at(params, there), _at(batch_stats, there))
            state.update({f"{here}.{k}": v for k, v in bn.items()})
    state["fc.weight"] = _tensor(np.asarray(params["head"]["kernel"]).T)
    state["fc.bias"] = _tensor(params["head"]["bias"])
    own = net.state_dict()
    missing = sorted(k for k in own if k not in state and not k.endswith("num_batches_tracked"))
    if missing:
        raise KeyError(f"no cnnlab value for {missing}")
    for key, value in state.items():
        if own[key].shape != value.shape:
            raise ValueError(f"{key}: PyTorch {tuple(own[key].shape)}, cnnlab {tuple(value.shape)}")
    net.load_state_dict(state, strict=False)
    return net


def to_cnnlab(net: CifarNet, params: Mapping, batch_stats: Mapping) -> tuple[dict, dict]:
    """`net`'s weights and BN statistics in cnnlab's layout (the structure of `params` and
    `batch_stats`), for comparing a trained PyTorch state with cnnlab's."""
    import copy

    params, batch_stats = copy.deepcopy(_plain(params)), copy.deepcopy(_plain(batch_stats))
    for here, there in cnnlab_names(net.n):
        module = net.get_submodule(here)
        if isinstance(module, nn.Conv2d):
            _at(params, there)["kernel"] = module.weight.detach().numpy().transpose(2, 3, 1, 0)
        else:
            p, s = _at(params, there)["BatchNorm_0"], _at(batch_stats, there)["BatchNorm_0"]
            p["scale"], p["bias"] = module.weight.detach().numpy(), module.bias.detach().numpy()
            s["mean"], s["var"] = module.running_mean.numpy(), module.running_var.numpy()
    params["head"]["kernel"] = net.fc.weight.detach().numpy().T
    params["head"]["bias"] = net.fc.bias.detach().numpy()
    return params, batch_stats


def _plain(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _plain(v) for k, v in tree.items()}
    return np.asarray(tree)
