"""The `cnnlab` command: sub-commands dispatch to Hydra apps over `conf/`.

User errors (unknown option, wrong type, impossible value, missing dataset) are caught before
anything compiles and reported as one line on stderr with exit code 2.
"""

import itertools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from cnnlab.errors import ConfigError

if TYPE_CHECKING:
    from omegaconf import DictConfig

USAGE = """usage: cnnlab COMMAND [HYDRA OVERRIDES...]

commands:
  train    train a model: cnnlab train model=resnet56 dataset=cifar10 seed=1
           sweep with Hydra's multirun: cnnlab train -m model=plain20,resnet20 seed=0,1,2
           see the composed config: cnnlab train --cfg job

  summary  per-layer output shapes, parameters and multiply-adds, without data:
           cnnlab summary model=vgg_d dataset=imagenet [summary.format=json] [summary.depth=2]

  eval     evaluate trained runs on their test split, several runs as an ensemble:
           cnnlab eval RUN_DIR [RUN_DIR ...] [eval.tta=none|flip|ten_crop]
           [eval.weights=final|best|ema|snapshots] [eval.format=json] [eval.output=FILE]

Config groups and their options are the YAML files in conf/ (and experiments/ for
`experiment=NAME`); `cnnlab train --help` lists them."""

# Hydra flags that take a value in the next argument.
_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name",
                     "-cn", "--config-dir", "-cd", "--experimental-rerun"}
# Flags after which Hydra prints something instead of running: nothing to validate.
_INFO_FLAGS = {"--help", "-h", "--hydra-help", "--info", "-i", "--version", "--shell-completion",
               "-sc"}
MAX_CHECKED_COMBINATIONS = 512


def fail(message: str) -> None:
    print(f"cnnlab: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _split_args(args: list[str]) -> tuple[list[str], bool]:
    """Separate overrides from Hydra's flags; returns (overrides, info_only)."""
    overrides, skip_next, info_only = [], False, False
    for arg in args:
        if skip_next:
            skip_next = False
        elif arg in _FLAGS_WITH_VALUE:
            skip_next = True
        elif arg in _INFO_FLAGS:
            info_only = True
        elif not arg.startswith("-"):
            overrides.append(arg)
    return overrides, info_only


def _group_dirs(conf_dir: Path) -> set[str]:
    return {p.name for p in conf_dir.iterdir() if p.is_dir() and not p.name.startswith("_")}


def _expand(overrides: list[str], conf_dir: Path) -> list[list[str]]:
    """Check group choices and expand sweeps into the list of single-run override lists."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from cnnlab.config import group_options

    groups = _group_dirs(conf_dir)
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as e:
        fail(str(e).splitlines()[0] if str(e) else "could not parse the overrides")
    axes: list[list[str]] = []
    for override in parsed:
        key = override.get_key_element().lstrip("~+")
        if key.startswith("hydra"):
            continue
        values = (list(override.sweep_string_iterator()) if override.is_sweep_override()
                  else [override.get_value_element_as_str()])
        if key in groups and not override.is_delete():
            valid = group_options(key)
            for value in values:
                if value not in valid and value != "null":
                    fail(f"unknown {key} '{value}'; valid choices: {', '.join(valid)}")
        prefix = override.get_key_element()
        axes.append([f"{prefix}={v}" if not override.is_delete() else prefix for v in values])
    return [list(c) for c in itertools.islice(itertools.product(*axes), MAX_CHECKED_COMBINATIONS)]


def _one_line(error: Exception) -> str:
    """Hydra/OmegaConf errors span lines; keep what names the key and the value."""
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(error, OmegaConfBaseException) and getattr(error, "full_key", None):
        return f"{error.full_key}: {str(error.msg).splitlines()[0]}"
    cause = error.__cause__
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        return f"{cause.full_key}: {str(cause.msg).splitlines()[0]}"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ".join(lines[:2]) if lines else type(error).__name__


def check_config(overrides: list[str], for_training: bool = True) -> "DictConfig":
    """Compose and validate every run the command line describes; exit 2 on the first error.

    Returns the last composed config (the only one when there is no sweep).
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from cnnlab.config import CONF_DIR, resolve_presets, validate, validate_for_training

    check = validate_for_training if for_training else validate
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for combination in _expand(overrides, CONF_DIR):
            try:
                cfg = compose(config_name="config", overrides=combination)
                resolve_presets(cfg)
                check(cfg)
            except ConfigError as e:
                fail(str(e))
            except (HydraException, OmegaConfBaseException, ValueError) as e:
                fail(_one_line(e))
    return cfg


def train_command(args: list[str]) -> None:
    overrides, info_only = _split_args(args)
    if not info_only:
        check_config(overrides)
    from cnnlab.app import run_train_app

    sys.argv = ["cnnlab train", *args]
    run_train_app()


def summary_command(args: list[str]) -> None:
    overrides, info_only = _split_args(args)
    if info_only or len(overrides) != len(args):
        fail("summary takes overrides only, e.g. cnnlab summary model=vgg_d dataset=imagenet "
             "summary.format=json")
    cfg = check_config(overrides, for_training=False)
    if cfg.dataset.image_shape is None or cfg.dataset.num_classes is None:
        fail(f"dataset {cfg.dataset.name} does not declare image_shape and num_classes; "
             "set dataset.image_shape=[H,W,C] dataset.num_classes=N")
    from cnnlab.models import build_model
    from cnnlab.models.summary import summarize

    model = build_model(cfg, cfg.dataset.num_classes)
    summary = summarize(model, tuple(cfg.dataset.image_shape), cfg.model.name)
    if cfg.summary.format == "json":
        print(summary.to_json(cfg.summary.depth))
    else:
        print(summary.to_table(cfg.summary.depth))


def _is_override(arg: str) -> bool:
    # Multirun job folders are named `<n>_key=value,...`, so a folder that exists is a run
    # directory even when its name holds '='.
    key, sep, _ = arg.partition("=")
    return bool(sep) and not Path(arg).is_dir() and key.replace(".", "_").isidentifier()


def eval_command(args: list[str]) -> None:
    """`cnnlab eval RUN_DIR [RUN_DIR ...] [eval.KEY=VALUE ...]` (cnnlab/evaluate.py)."""
    if any(arg in _INFO_FLAGS for arg in args):
        print(USAGE)
        return
    overrides = [arg for arg in args if _is_override(arg)]
    run_dirs = [arg for arg in args if not _is_override(arg)]
    for arg in run_dirs:
        if arg.startswith("-"):
            fail(f"eval takes run directories and eval.* overrides, not '{arg}' (JSON output: "
                 "eval.format=json)")
    for override in overrides:
        key = override.partition("=")[0]
        if not key.startswith("eval."):
            fail(f"eval takes eval.* overrides only, got '{override}'; the model, data and "
                 "training settings come from each run's saved config")
        if key == "eval.ema_decay":
            fail("eval.ema_decay is a training setting; cnnlab eval reads each run's own "
                 "(use eval.weights=ema)")
    if not run_dirs:
        fail("eval needs at least one run directory: cnnlab eval RUN_DIR [RUN_DIR ...] "
             "[eval.tta=flip]")

    import json
    import logging

    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from cnnlab.config import EvalConfig

    try:
        ev = OmegaConf.merge(OmegaConf.structured(EvalConfig), OmegaConf.from_dotlist(
            [o.removeprefix("eval.") for o in overrides]))
    except OmegaConfBaseException as e:
        key = f"eval.{e.full_key}" if getattr(e, "full_key", None) else "eval"
        fail(f"{key}: {str(getattr(e, 'msg', e)).splitlines()[0]}")
    from cnnlab.data import DatasetUnavailableError
    from cnnlab.evaluate import evaluate_runs, format_report

    for noisy in ("absl", "jax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        report = evaluate_runs([Path(d) for d in run_dirs], ev)
    except (ConfigError, DatasetUnavailableError) as e:
        fail(str(e))
    print(format_report(report, ev.format))
    if ev.output is not None:
        Path(ev.output).write_text(json.dumps(report, indent=2) + "\n")


COMMANDS: dict[str, Callable[[list[str]], None]] = {
    "train": train_command,
    "summary": summary_command,
    "eval": eval_command,
}


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        fail(f"unknown command '{command}'; valid choices: {', '.join(COMMANDS)}")
    COMMANDS[command](rest)


if __name__ == "__main__":
    main()
