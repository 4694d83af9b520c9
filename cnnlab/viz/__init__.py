"""`cnnlab viz KIND RUN_DIR [key=value ...]`: pictures of what a trained run has learned.

Each kind (cnnlab/viz/draw_*.py, registered in `KINDS`) writes PNGs and the numbers behind them
(.npz, .json) into RUN_DIR/viz/ and logs the PNGs to the run's W&B run and TensorBoard event
files (cnnlab/viz/output.py).
All computation is jitted JAX on batches, on the run's rebuilt model (cnnlab/viz/network.py).
Options: cnnlab/viz/options.py and docs/viz.md.
"""

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from cnnlab.config.load import load_run_config
from cnnlab.errors import require
from cnnlab.runs import tensorboard
from cnnlab.runs.weights import check_weights
from cnnlab.viz import (  # noqa: F401  (each module registers its kinds)
    draw_activations,
    draw_ascent,
    draw_embedding,
    draw_filters,
    draw_gradients,
    draw_neighbors,
    draw_occlusion,
    draw_patches,
)
from cnnlab.viz.common import KINDS
from cnnlab.viz.network import check_layers, layer_names, model_factory, restore
from cnnlab.viz.options import VizOptions, parse
from cnnlab.viz.output import Output, log_images, tensorboard_images, wandb_mode


@dataclasses.dataclass
class Result:
    written: list[Path]
    wandb_folder: Path | None


def check(kind_name: str, run_dir: Path, overrides: Sequence[str]) -> VizOptions:
    """Every check that needs no data and no compiling: kind, options, checkpoint, layers."""
    kind = KINDS.get(kind_name)
    options = parse(overrides, kind_name)
    cfg = load_run_config(run_dir)
    tensorboard.require_available(bool(cfg.logger.get("tensorboard")),
                                  f"logger.tensorboard: false in {run_dir}/.hydra/config.yaml")
    check_weights(run_dir, cfg, options.weights)
    for key in kind.requires:
        require(getattr(options, key) is not None, f"viz {kind_name} needs {key}=...")
    shape, classes = cfg.dataset.image_shape, cfg.dataset.num_classes
    if options.layer and shape is not None and classes is not None:
        check_layers(options.layer, layer_names(model_factory(cfg, classes)(None), shape))
    return options


def visualize(kind_name: str, run_dir: Path, overrides: Sequence[str]) -> Result:
    options = check(kind_name, Path(run_dir), overrides)
    restored = restore(Path(run_dir), options.weights, KINDS.get(kind_name).splits)
    if options.layer:  # datasets that do not declare their shape are checked once loaded
        check_layers(options.layer, restored.network.layer_names())
    out = Output(Path(run_dir), kind_name, options.dpi)
    KINDS.get(kind_name).draw(restored, options, out)
    folder = log_images(Path(run_dir), restored.cfg.logger,
                        wandb_mode(options.wandb, restored.cfg.logger), kind_name, out.pngs)
    tensorboard_images(Path(run_dir), restored.cfg.logger, kind_name, out.pngs)
    return Result(out.written, folder)
