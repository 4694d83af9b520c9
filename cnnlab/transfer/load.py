"""Copying a source's weights into a freshly initialized model, matched by path.

A variable of a loaded layer (cnnlab/transfer/plan.py) takes the source's array at the same path
(`params/stage1_block1/conv1/kernel`); everything else keeps its initialization. So a deeper net
loads a shallower one's layers where the names agree (ResNet-20 -> ResNet-56: the stem, the
first three blocks of each stage and the classifier), and `transfer.load_through` cuts the copy
after a layer (Yosinski et al. 2014's first k layers; VGG's warm start from net A).

The classifier is re-initialized when `transfer.reset_head` says so, or (null) when its shape
differs from the source's, as it does when the class counts differ. A first layer's kernel that
differs only in its input channels (RGB weights on greyscale data) is adapted by
`transfer.adapt_input` (cnnlab/transfer/adapt.py), or refused in one line naming that key. Any
other shape mismatch is an error naming the variable; so is a loaded layer the source lacks only
in part.
"""

import dataclasses
import logging
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from cnnlab.errors import ConfigError
from cnnlab.transfer.adapt import adapt_kernel
from cnnlab.transfer.plan import Plan
from cnnlab.transfer.sources import Source

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Loaded:
    """What a load did, for the log and the run's summary."""

    variables: dict[str, Any]
    # Layers whose variables all came from the source.
    layers: tuple[str, ...]
    # Loaded layers the source does not have (kept at their initialization).
    missing: tuple[str, ...]
    head_reset: bool
    tensors: int
    # First-layer kernels adapted to the data's channel count (transfer.adapt_input).
    adapted: tuple[str, ...] = ()

    def summary(self) -> dict[str, Any]:
        return {"loaded_layers": len(self.layers), "missing_layers": list(self.missing),
                "head_reset": self.head_reset, "tensors": self.tensors,
                "adapted_input": list(self.adapted)}


def layer_of(key: str) -> str:
    """`params/stage1_block1/conv1/kernel` -> `stage1_block1`."""
    return key.split("/")[1]


def _shape(array: Any) -> tuple[int, ...]:
    return tuple(np.shape(array))


def _head_reset(reset: bool | None, plan: Plan, target: dict, source: dict) -> bool:
    if reset is not None:
        if reset is False:
            _check_shapes([k for k in target if layer_of(k) == plan.classifier], target, source,
                          "transfer.reset_head=false keeps the source's classifier, whose")
        return reset
    keys = [k for k in target if layer_of(k) == plan.classifier and k in source]
    return any(_shape(target[k]) != _shape(source[k]) for k in keys)


def _check_shapes(keys: list[str], target: dict, source: dict, what: str) -> None:
    for key in keys:
        if key in source and _shape(target[key]) != _shape(source[key]):
            raise ConfigError(f"{what} variable {key} is {_shape(source[key])} in the source "
                              f"but {_shape(target[key])} in this model; the source does not fit "
                              f"layer {layer_of(key)}")


def _layer_keys(target: dict[str, Any]) -> dict[str, list[str]]:
    keys: dict[str, list[str]] = {}
    for key in target:
        keys.setdefault(layer_of(key), []).append(key)
    return keys


def _input_channel_mismatch(key: str, target: dict, arrays: dict, first: str) -> bool:
    """A kernel of the first layer that differs from the source's in its input axis alone: it
    reads the image, whose channel count differs (a deeper conv's inputs are the same widths)."""
    if layer_of(key) != first or not key.endswith("/kernel") or key not in arrays:
        return False
    want, have = _shape(target[key]), _shape(arrays[key])
    return (len(want) == len(have) == 4 and want[2] != have[2]
            and want[:2] + want[3:] == have[:2] + have[3:])


def _adapt_input(target: dict, arrays: dict, plan: Plan, adapt_input: str,
                 description: str) -> tuple[str, ...]:
    """Adapts (in `arrays`) the first layer's kernels to the data's channels; their keys."""
    keys = [k for k in target if _input_channel_mismatch(k, target, arrays, plan.layers[0])]
    for key in keys:
        arrays[key] = adapt_kernel(adapt_input, arrays[key], _shape(target[key])[2],
                                   f"transfer.source ({description})")
    return tuple(keys)


def load(variables: dict[str, Any], source: Source, plan: Plan,
         reset_head: bool | None, adapt_input: str = "strict") -> Loaded:
    """`variables` (the model's initial ones) with `plan.loaded`'s layers from `source`;
    `adapt_input`: how a first conv trained on another channel count fits (adapt.py)."""
    target = flatten_dict(variables, sep="/")
    # The source's arrays under this model's names (transfer.layer_map renames layers).
    arrays = {key: source.arrays[plan.source_key(key)] for key in target
              if plan.source_key(key) in source.arrays}
    adapted = (_adapt_input(target, arrays, plan, adapt_input, source.description)
               if plan.layers[0] in plan.loaded else ())
    head_reset = _head_reset(reset_head, plan, target, arrays)
    layers = [layer for layer in plan.loaded if not (head_reset and layer == plan.classifier)]
    by_layer = _layer_keys(target)
    copied, missing = [], []
    for layer in layers:
        keys = by_layer.get(layer, [])
        present = [k for k in keys if k in arrays]
        if not present:
            if layer in plan.layer_map:
                raise ConfigError(f"transfer.layer_map: the source has no layer "
                                  f"{plan.layer_map[layer]} (for {layer})")
            missing.append(layer)
            continue
        if len(present) < len(keys):
            absent = next(k for k in keys if k not in arrays)
            raise ConfigError(f"transfer.source has layer {layer} but not its variable "
                              f"{absent}; it is a different kind of layer there")
        _check_shapes(keys, target, arrays, "transfer.source:")
        for key in keys:
            target[key] = jnp.asarray(arrays[key], dtype=target[key].dtype)
        copied.append(layer)
    if not copied:
        raise ConfigError(f"transfer.source ({source.description}) has none of this model's "
                          f"layers ({', '.join(plan.loaded[:4])}, ...); is it the same kind "
                          "of network?")
    merged = {collection: {} for collection in variables}  # unflatten drops empty collections
    merged.update(unflatten_dict(target, sep="/"))
    return Loaded(merged, tuple(copied), tuple(missing), head_reset,
                  sum(len(by_layer[layer]) for layer in copied), adapted)
