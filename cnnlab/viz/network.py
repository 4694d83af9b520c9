"""A trained run as pure functions of pixel batches, for the visualisations.

The run is rebuilt the way `cnnlab eval` rebuilds it (cnnlab/training/build.py's `build` from the
saved
config, the newest checkpoint of `weights` restored into its state) and its data comes through
`run.load_data`. Pixels are float (N, H, W, C) on the [0, 1] scale and the run's own
`preprocess` is part of every function, so gradients and ascent live in the space people look
at, whatever the preprocessing (channel, mean image, ZCA).

Layers are named as `cnnlab summary` names them: the '/'-joined path of the Flax module, its
output captured by intercepting module calls (the mechanism of cnnlab/models/summary.py), so the
names cannot drift from the modules actually built.
"""

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from omegaconf import DictConfig

from cnnlab.config.load import load_run_config
from cnnlab.data.preprocess import PreprocessStats, preprocess
from cnnlab.data.types import Dataset
from cnnlab.errors import ConfigError
from cnnlab.models import FAMILIES, input_fit, model_options
from cnnlab.models.layers import Activation, Identity, build_layers
from cnnlab.models.scan import unrolled
from cnnlab.runs.rundir import RunDir
from cnnlab.runs.weights import WEIGHTS, check_weights, ema_variables

ModelFactory = Callable[[Activation | None], nn.Module]


def model_factory(cfg: DictConfig, num_classes: int) -> ModelFactory:
    """`factory(act)`: the run's model, with `act` in place of its ReLU (None: as trained).

    Only ReLU is swapped: guided backprop and deconvnet are backward rules for ReLU, so a
    network without ReLUs keeps its plain gradient under them.
    """
    layers = build_layers(cfg.init, cfg.activation, cfg.norm)
    family = FAMILIES.get(cfg.model.family)
    options, fit = model_options(cfg.model), input_fit(cfg.model)
    is_relu = cfg.activation.name == "relu"

    def factory(act: Activation | None = None) -> nn.Module:
        swapped = layers if act is None or not is_relu else dataclasses.replace(layers, act=act)
        # Unrolled: the backward rules and layer hooks act per module.
        return unrolled(family.build(options, num_classes, swapped, fit))

    return factory


@dataclasses.dataclass
class Network:
    """A model with its variables and preprocessing, as functions of [0, 1] pixel batches."""

    factory: ModelFactory
    variables: dict[str, Any]
    stats: PreprocessStats
    image_shape: tuple[int, int, int]
    num_classes: int

    def logits(self, pixels: jax.Array, act: Activation | None = None) -> jax.Array:
        return self.factory(act).apply(self.variables, preprocess(pixels, self.stats),
                                       train=False)

    def capture(self, pixels: jax.Array, names: Sequence[str],
                act: Activation | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(logits, {name: the output of that layer}) for layers named as by `cnnlab summary`;
        `"penultimate"` is the input of the model's last layer (its classifier), flattened."""
        found: dict[str, jax.Array] = {}
        wanted = set(names)

        def record(next_fun: Any, args: tuple, kwargs: dict, context: Any) -> Any:
            out = next_fun(*args, **kwargs)
            module = context.module
            if context.method_name != "__call__" or module.scope is None or not module.path:
                return out
            name = "/".join(module.path)
            if name in wanted and name not in found:  # a module's first call
                found[name] = out
            if len(module.path) == 1 and args:  # the last top-level layer is the classifier
                found["penultimate"] = args[0].reshape(args[0].shape[0], -1)
            return out

        with nn.intercept_methods(record):
            logits = self.logits(pixels, act)
        missing = [n for n in names if n not in found]
        if missing:
            raise ConfigError(unknown_layer(missing[0], self.layer_names()))
        return logits, {n: found[n] for n in names}

    def features(self, pixels: jax.Array) -> jax.Array:
        """The penultimate features: what the classifier reads, flattened (N, D)."""
        return self.capture(pixels, ["penultimate"])[1]["penultimate"]

    def layer_names(self) -> list[str]:
        return layer_names(self.factory(None), self.image_shape)

    def map_batches(self, fn: Callable[["Network", jax.Array], Any], images: np.ndarray,
                    batch_size: int = 250) -> Any:
        """`fn(network, pixels)` over uint8 `images` in batches, one jitted `lax.map`; the
        outputs (a pytree of arrays) joined along the first axis, tail padding removed."""
        n = len(images)
        padded = np.zeros((-(-n // batch_size) * batch_size, *images.shape[1:]), np.uint8)
        padded[:n] = images

        def run(network: Network, batches: jax.Array) -> Any:
            out = jax.lax.map(lambda b: fn(network, b.astype(jnp.float32) / 255.0), batches)
            return jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:])[:n], out)

        return self.jit(run)(padded.reshape(-1, batch_size, *images.shape[1:]))

    def jit(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """`fn(network, *args)` compiled with the variables and preprocessing statistics as
        arguments, not as constants baked into the program (VGG's weights are 0.5 GB)."""

        @jax.jit
        def compiled(variables: Any, stats: PreprocessStats, *args: Any) -> Any:
            return fn(dataclasses.replace(self, variables=variables, stats=stats), *args)

        return lambda *args: compiled(self.variables, self.stats, *args)


def layer_names(model: nn.Module, image_shape: Sequence[int]) -> list[str]:
    """Every module path of `model` in call order, as `cnnlab summary` names them (what
    `layer=` accepts); traced under eval_shape, so nothing is compiled."""
    names: list[str] = []

    def record(next_fun: Any, args: tuple, kwargs: dict, context: Any) -> Any:
        module = context.module
        if (context.method_name == "__call__" and module.scope is not None and module.path
                and not isinstance(module, Identity)):
            names.append("/".join(module.path))
        return next_fun(*args, **kwargs)

    def init(x: jax.Array) -> Any:
        with nn.intercept_methods(record):
            return model.init(jax.random.PRNGKey(0), x, train=False)

    jax.eval_shape(init, jax.ShapeDtypeStruct((1, *image_shape), jnp.float32))
    return list(dict.fromkeys(names))


def check_layers(names: Sequence[str], valid: Sequence[str]) -> None:
    for name in names:
        if name not in valid:
            raise ConfigError(unknown_layer(name, list(valid)))


def unknown_layer(name: str, valid: list[str]) -> str:
    from cnnlab.registry import unknown_choice

    top = [v for v in valid if "/" not in v]
    return unknown_choice("layer", name, top) + " (and their parts, as `cnnlab summary " \
        "summary.depth=2` lists them)"


@dataclasses.dataclass
class Restored:
    """A saved run ready to look at: its config, data (host arrays) and trained network."""

    run_dir: Path
    cfg: DictConfig
    dataset: Dataset
    network: Network
    step: int
    class_names: list[str]

    def pixels(self, split: str, indices: np.ndarray | Sequence[int]) -> jax.Array:
        images = getattr(self.dataset, split).images[np.asarray(indices)]
        return jnp.asarray(images, jnp.float32) / 255.0


def restore(run_dir: Path, weights: str = "final",
            splits: tuple[str, ...] = ("test",)) -> Restored:
    """Rebuild the run from its saved config and restore the newest checkpoint of `weights`;
    of its data only `splits` are read (the statistics come from the run directory)."""
    from cnnlab.training.build import build, load_for_evaluation

    cfg = load_run_config(run_dir)
    step = check_weights(run_dir, cfg, weights)
    source = WEIGHTS.get(weights)
    dataset = load_for_evaluation(cfg, Path(run_dir), splits)
    run = build(cfg, dataset)
    checkpoints = RunDir(run_dir).checkpointer(source.folder)
    try:
        state, _ = checkpoints.restore(step, run.state)
    finally:
        checkpoints.close()
    params, batch_stats = state.params, state.batch_stats
    if source.averaged:
        params, batch_stats = ema_variables(state.ema, cfg.eval.ema_decay)
    variables = {"params": params, "batch_stats": batch_stats}
    network = Network(model_factory(cfg, dataset.num_classes), variables, dataset.preprocess,
                      tuple(dataset.image_shape), dataset.num_classes)
    return Restored(Path(run_dir), cfg, dataset, network, step, class_names(cfg, dataset))


def class_names(cfg: DictConfig, dataset: Dataset) -> list[str]:
    """The label names TFDS declares (fashion_mnist: T-shirt/top, ...), else the numbers."""
    numbers = [str(i) for i in range(dataset.num_classes)]
    try:
        import tensorflow_datasets as tfds

        names = tfds.builder(cfg.dataset.name, data_dir=cfg.dataset.data_dir).info.features[
            cfg.dataset.label_key].names
    except Exception:  # any dataset without names (or a builder that fails): numbers
        return numbers
    return list(names) if len(names) == dataset.num_classes else numbers
