"""What `cnnlab --help` and `cnnlab COMMAND --help` print: each command's usage, and every
`COMMAND.KEY` it takes with its default, read from the schema (so the list cannot fall behind)."""

import dataclasses
import textwrap
from collections.abc import Callable
from typing import Any

USAGE = """usage: cnnlab COMMAND [HYDRA OVERRIDES...]
       cnnlab --version

commands:
  train    train a model: cnnlab train model=resnet56 dataset=cifar10 seed=1
           sweep with Hydra's multirun: cnnlab train -m model=plain20,resnet20 seed=0,1,2
           [hydra/launcher=parallel|slurm] [hydra/sweeper=search]
           run a study of experiments/: cnnlab train -m experiment=resnet_vs_plain
           (its CI size: experiment=smoke/resnet_vs_plain)
           see the composed config: cnnlab train --cfg job

  summary  per-layer output shapes, parameters, multiply-adds, receptive fields and activation
           memory (forward, kept for training), without data:
           cnnlab summary model=vgg_d dataset=imagenet [summary.format=json] [summary.depth=2]

  eval     evaluate trained runs on their test split, several runs as an ensemble:
           cnnlab eval RUN_DIR [RUN_DIR ...] [eval.tta=none|flip|ten_crop]
           [eval.weights=final|best|ema|snapshots] [eval.format=json] [eval.output=FILE]
           [eval.top_k=5|null] [eval.confusion_dir=DIR]
           [eval.scales=[28,36,44] eval.scale_mode=dense|crop]

  lr_find  the LR range test (Smith 2017) of the run `cnnlab train` would make, with its
           overrides: cnnlab lr_find model=resnet20 optimizer=momentum [lr_find.start=1e-6]
           [lr_find.end=10] [lr_find.steps=100] [lr_find.output=DIR]; writes lr_find.png, .json

  compare  tables (mean ± std over seeds) and error curves of runs, from their files:
           cnnlab compare MULTIRUN_DIR|RUN_DIR [...] [compare.panel_by=model.residual]
           [compare.metric=error|loss] [compare.ylim=[0,20]] [compare.format=markdown|csv]
           [compare.output=DIR] [compare.select=all|best] [compare.versus=KEY]
           [compare.contrast=KEY];
           a W&B group (online):
           cnnlab compare wandb:ENTITY/PROJECT/GROUP

  viz      pictures of a trained run into RUN_DIR/viz/ (and its W&B run), see docs/viz.md:
           cnnlab viz KIND RUN_DIR [key=value ...], KIND one of filters, activations,
           neighbors, embedding, patches, saliency, guided_backprop, deconvnet, class_model,
           neuron_ascent, occlusion; e.g. cnnlab viz saliency RUN_DIR images=8 target=predicted
           cnnlab viz neuron_ascent RUN_DIR layer=stage3_block3 channels=[0,1,2,3]

compile  the run the overrides describe compiled for an accelerator this host lacks (memory per
           device, fits, compile time, FLOPs, collectives, roofline step time; last line JSON):
           cnnlab compile tpu:v5e:2x2 model=resnet50 dataset=imagenet train.precision=bf16
           targets: tpu:v4|v5e|v5p|v6e:TOPOLOGY, gpu:h100|a100:1x1xN; needs the tpu or gpu
           extra (docs/scale.md)

Config groups and their options are the YAML files in conf/ (and experiments/ for
`experiment=NAME`); `cnnlab train --help` lists them and describes every key."""


def _compare_schema() -> type:
    from cnnlab.analysis.compare import CompareConfig

    return CompareConfig


def _viz_schema() -> type:
    from cnnlab.viz.options import VizOptions

    return VizOptions


# Commands whose options are a dataclass of their own rather than a section of config.yaml.
OPTION_SCHEMAS: dict[str, Callable[[], type]] = {"compare": _compare_schema, "viz": _viz_schema}


def _option_rows(command: str) -> list[tuple[str, Any, str]]:
    """(key, default, description) of every option `command` takes."""
    import typing

    from omegaconf import OmegaConf

    from cnnlab.registry import field_help

    if command in OPTION_SCHEMAS:
        schema = OPTION_SCHEMAS[command]()
        defaults = {f.name: f.default for f in dataclasses.fields(schema)}
    else:
        from cnnlab.config.groups import root_values
        from cnnlab.config.schema import Config

        schema = typing.get_type_hints(Config)[command]
        defaults = OmegaConf.to_container(root_values(command))
        defaults.pop("ema_decay", None)  # a training setting: eval reads each run's own
    described = field_help(schema)
    return [(key, value, described[key]) for key, value in defaults.items()]


def _viz_kinds() -> list[str]:
    """Each viz kind and the options it reads besides the common ones."""
    from cnnlab.viz.options import COMMON, READS

    return [f"kinds (each also reads {', '.join(COMMON)}):",
            *(line for kind, reads in READS.items()
              for line in textwrap.wrap(f"{kind:<16} {', '.join(reads)}", 100, initial_indent="  ",
                                        subsequent_indent=" " * 19))]


def command_help(command: str) -> str:
    """`cnnlab COMMAND --help`: the command's usage and every `COMMAND.KEY` it takes, with its
    default and description, read from the option schemas and conf/config.yaml (so the list
    cannot fall behind); for viz, the kinds that read each option."""
    from cnnlab.config.keys import COLUMN, format_value, key_lines

    blocks = USAGE.split("\n\n")
    usage = next(b for b in blocks if b.lstrip().startswith(command + " "))
    prefix = "" if command == "viz" else f"{command}."  # viz options are bare key=value
    lines: list[str] = []
    for key, value, text in _option_rows(command):
        lines += key_lines([(f"{prefix}{key}={format_value(value)}", text)])
        if command == "viz":
            from cnnlab.viz.options import read_by

            lines += textwrap.wrap(f"read by: {read_by(key)}", 100,
                                   initial_indent=" " * (COLUMN + 4),
                                   subsequent_indent=" " * (COLUMN + 13))
    kinds = ["", *_viz_kinds()] if command == "viz" else []
    return "\n".join([f"usage:\n{usage}", "", "options (default, meaning):", *lines, *kinds])
