"""The `cnnlab` command: sub-commands dispatch to Hydra apps over `conf/`.

User errors (unknown option, wrong type, impossible value, missing dataset) are caught before
anything compiles and reported as one line on stderr with exit code 2.
"""

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from cnnlab.errors import ConfigError

if TYPE_CHECKING:
    import argparse

    from omegaconf import DictConfig

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

Config groups and their options are the YAML files in conf/ (and experiments/ for
`experiment=NAME`); `cnnlab train --help` lists them."""

def _compare_schema() -> type:
    from cnnlab.analysis.compare import CompareConfig

    return CompareConfig


def _viz_schema() -> type:
    from cnnlab.viz.options import VizOptions

    return VizOptions


# Commands whose options are a dataclass of their own rather than a section of config.yaml.
OPTION_SCHEMAS: dict[str, Callable[[], type]] = {"compare": _compare_schema, "viz": _viz_schema}


def command_help(command: str) -> str:
    """`cnnlab COMMAND --help`: the command's usage and every `COMMAND.KEY` it takes, with its
    default, read from the config schema and conf/config.yaml (so the list cannot fall behind)."""
    import dataclasses

    from omegaconf import OmegaConf

    blocks = USAGE.split("\n\n")
    usage = next(b for b in blocks if b.lstrip().startswith(command + " "))
    if command in OPTION_SCHEMAS:
        defaults = {f.name: f.default for f in dataclasses.fields(OPTION_SCHEMAS[command]())}
    else:
        from cnnlab.config.schema import root_values

        defaults = OmegaConf.to_container(root_values(command))
        defaults.pop("ema_decay", None)  # a training setting: eval reads each run's own
    prefix = "" if command == "viz" else f"{command}."  # viz options are bare key=value
    options = "\n".join(f"  {prefix}{key}="
                         f"{OmegaConf.to_yaml({key: value}).split(': ', 1)[1].strip()}"
                         for key, value in defaults.items())
    return f"usage:\n{usage}\n\noptions (default values):\n{options}"


def fail(message: str) -> None:
    print(f"cnnlab: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _hydra_args(args: list[str]) -> "argparse.Namespace":
    """The command line as Hydra's own parser reads it (flags, then the overrides)."""
    from hydra._internal.utils import get_args_parser

    try:
        return get_args_parser().parse_args(args)
    except SystemExit:
        fail(f"could not parse the arguments {' '.join(args)}; see cnnlab train --help")


def _info_only(parsed: "argparse.Namespace") -> bool:
    """Flags after which Hydra prints something instead of running: nothing to validate."""
    return bool(parsed.help or parsed.hydra_help or parsed.info or parsed.cfg
                or parsed.shell_completion)


def _check_group_choices(parsed: list) -> None:
    """`model=resnt20` -> one line with the valid choices (and the closest one)."""
    from cnnlab.config.schema import CONF_DIR, group_options
    from cnnlab.registry import unknown_choice

    groups = {p.name for p in CONF_DIR.iterdir() if p.is_dir() and not p.name.startswith("_")}
    for override in parsed:
        key = override.get_key_element().lstrip("~+")
        if key not in groups or override.is_delete():
            continue
        values = (list(override.sweep_string_iterator()) if override.is_discrete_sweep()
                  else [override.get_value_element_as_str()])
        valid = group_options(key)
        for value in values:
            if value not in valid and value != "null":
                fail(unknown_choice(key, value, valid))


def _expand(overrides: list[str]) -> list[list[str]]:
    """Every single-run override list a sweep describes, expanded by Hydra's basic sweeper (a
    later override of a key replaces an earlier one, so the command line wins over a config's
    `hydra.sweeper.params`). Ranges of a continuous search (Optuna's `interval(...)`) cannot be
    listed: those keys are checked in each job instead."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as e:
        fail(str(e).splitlines()[0] if str(e) else "could not parse the overrides")
    _check_group_choices(parsed)
    listable = [o for o in parsed if not o.is_sweep_override() or o.is_discrete_sweep()]
    [batch] = BasicSweeper.split_arguments(listable, max_batch_size=None)
    return batch


def _config_sweep(hydra_cfg: "DictConfig") -> list[str]:
    """The sweep a config declares in `hydra.sweeper.params`, as override strings."""
    params = hydra_cfg.sweeper.get("params") or {}
    return [f"{key}={value}" for key, value in params.items()]


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


class CheckedRuns(NamedTuple):
    cfg: "DictConfig"  # the last composed config, with its `hydra` node
    steps: list[int]  # train.steps of each run


def check_config(overrides: list[str], for_training: bool = True,
                 multirun: bool = False) -> CheckedRuns:
    """Compose and validate every run the command line describes; exit 2 on the first error.

    A multirun (`-m`) also expands the sweep that a config declares in `hydra.sweeper.params`
    (the experiments/ studies). A study started without -m is refused with its size: in Hydra
    projects `experiment=` usually means one run, and a study can be days of training.
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from cnnlab.config.load import validate, validate_for_training
    from cnnlab.config.schema import CONF_DIR, resolve_presets

    check = validate_for_training if for_training else validate

    def composed(combination: list[str]) -> "DictConfig":
        try:
            return compose(config_name="config", overrides=combination,
                           return_hydra_config=True)
        except (HydraException, OmegaConfBaseException, ValueError) as e:
            fail(_one_line(e))

    steps = []
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for combination in _expand(overrides):
            cfg = composed(combination)
            runs = [combination]
            declared = str(cfg.hydra.mode) in ("MULTIRUN", "RunMode.MULTIRUN")
            sweeping = multirun or declared
            _check_no_sweep_without_multirun(overrides, sweeping)
            if sweeping:
                runs = _expand(_config_sweep(cfg.hydra) + combination)
            if declared and not multirun and for_training:
                _refuse_study_without_multirun(cfg, len(runs))
            for run in runs:
                cfg = composed(run)
                _check_run_dir(cfg, sweeping)
                try:
                    resolve_presets(cfg)
                    check(cfg)
                except ConfigError as e:
                    fail(str(e))
                except (OmegaConfBaseException, ValueError) as e:
                    fail(_one_line(e))
                steps.append(int(cfg.train.steps))
    return CheckedRuns(cfg, steps)


def _refuse_study_without_multirun(cfg: "DictConfig", jobs: int) -> None:
    from omegaconf import OmegaConf

    name = OmegaConf.select(cfg, "hydra.runtime.choices.experiment") or "this config"
    fail(f"experiment={name} is a study of {jobs} runs of {cfg.train.steps:,} steps: run it "
         f"with -m (cnnlab train -m experiment={name} ...), or train one run of its recipe with "
         "hydra.mode=RUN")


def _check_no_sweep_without_multirun(overrides: list[str], sweeping: bool) -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if sweeping:
        return
    for override in OverridesParser.create().parse_overrides(overrides):
        if override.is_sweep_override():
            fail(f"{override.input_line} is a sweep: add -m (--multirun) to run each value, or "
                 "write a list as key=[a,b]")


def _check_run_dir(cfg: "DictConfig", multirun: bool) -> None:
    """A run directory that is a file, or that cannot be written (read-only, full), would fail
    inside Hydra's logging set-up with a traceback, before any of cnnlab's code runs."""
    import tempfile

    from omegaconf import OmegaConf

    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    path = Path(str(OmegaConf.select(cfg, key)))
    if path.exists() and not path.is_dir():
        fail(f"{key}={path} is a file; a run directory must be a folder")
    nearest = next(p for p in [path, *path.parents] if p.exists())  # created by Hydra if absent
    try:
        # A few KB through fsync: an empty file can still be created on a full disk.
        with tempfile.TemporaryFile(dir=nearest) as probe:
            probe.write(b"\0" * 8192)
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as e:
        fail(f"{key}={path} cannot be written: {e.strerror or e} ({nearest})")


def _name_jobs_by_swept_keys(overrides: list[str], cfg: "DictConfig") -> list[str]:
    """Name multirun job folders by what varies (`3_model=plain56,seed=1`), not by every
    override: settings shared by the whole sweep would repeat in each name and can push it past
    the file system's limit. Returns the Hydra override that says so (none if the user set one).
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    key_setting = "hydra.job.config.override_dirname.exclude_keys"
    parsed = OverridesParser.create().parse_overrides(overrides)
    if any(o.get_key_element() == key_setting for o in parsed):
        return []
    swept = {o.get_key_element() for o in parsed if o.is_sweep_override()}
    fixed = [o.get_key_element() for o in parsed if o.get_key_element() not in swept
             and not o.get_key_element().startswith("hydra")]
    excluded = list(cfg.hydra.job.config.override_dirname.exclude_keys)
    return [f"{key_setting}=[{','.join(dict.fromkeys(excluded + fixed))}]"]


def _sweep_size(cfg: "DictConfig", steps: list[int]) -> str:
    """What a multirun will run: a basic sweep's jobs, or an Optuna search's trials (its listed
    choices were each checked, but only n_trials of them run)."""
    trials = cfg.hydra.sweeper.get("n_trials")
    if trials is None:
        from cnnlab.cli.sweep import job_count

        return f"cnnlab: sweep of {job_count(len(steps))}, {sum(steps):,} training steps in all"
    return (f"cnnlab: search of {trials} trials of up to {max(steps):,} training steps "
            f"({len(steps)} combinations of its choices checked)")


def train_command(args: list[str]) -> None:
    parsed = _hydra_args(args)
    argv = args
    if not _info_only(parsed):
        cfg, steps = check_config(parsed.overrides, multirun=parsed.multirun)
        if parsed.multirun:
            print(_sweep_size(cfg, steps), file=sys.stderr)
        if parsed.overrides and parsed.multirun:
            # Hydra reads its overrides as one group of arguments: the naming joins that group.
            # A single run keeps every override in its name (its W&B name, cnnlab.cli.app.run_name).
            first = args.index(parsed.overrides[0])
            argv = [*args[:first], *_name_jobs_by_swept_keys(parsed.overrides, cfg),
                    *args[first:]]
    from cnnlab.cli import sweep
    from cnnlab.cli.app import run_train_app

    sweep.current_sweep_dir = None  # set again by a multirun that starts now
    sys.argv = ["cnnlab train", *argv]
    try:
        run_train_app()
    finally:
        # Hydra exits 1 after a sweep with failed jobs (the others have all run); say how many.
        if sweep.current_sweep_dir is not None and sweep.current_sweep_dir.is_dir():
            line, _ = sweep.report(sweep.current_sweep_dir)
            print(f"cnnlab: {line}", file=sys.stderr)


def summary_command(args: list[str]) -> None:
    if any(arg.startswith("-") for arg in args):
        print(command_help("summary"))
        return
    cfg, _ = check_config(args, for_training=False)
    if cfg.dataset.image_shape is None or cfg.dataset.num_classes is None:
        fail(f"dataset {cfg.dataset.name} does not declare image_shape and num_classes; "
             "set dataset.image_shape=[H,W,C] dataset.num_classes=N")
    from cnnlab.models import build_model
    from cnnlab.models.summary import FORMATS, summarize

    model = build_model(cfg, cfg.dataset.num_classes)
    summary = summarize(model, tuple(cfg.dataset.image_shape), cfg.model.name)
    print(FORMATS.get(cfg.summary.format)(summary, cfg.summary.depth))


def _is_override(arg: str) -> bool:
    # Multirun job folders are named `<n>_key=value,...`, so a folder that exists is a run
    # directory even when its name holds '='.
    key, sep, _ = arg.partition("=")
    return bool(sep) and not Path(arg).is_dir() and key.replace(".", "_").isidentifier()


def _paths_and_overrides(args: list[str], command: str, what: str,
                         example: str) -> tuple[list[str], list[str]]:
    """Split `cnnlab eval|compare` arguments into directories and `<command>.KEY=VALUE`."""
    overrides = [arg for arg in args if _is_override(arg)]
    paths = [arg for arg in args if not _is_override(arg)]
    for arg in paths:
        if arg.startswith("-"):
            fail(f"{command} takes {what} and {command}.* overrides, not '{arg}' ({example})")
    for override in overrides:
        if not override.startswith(f"{command}."):
            fail(f"{command} takes {command}.* overrides only, got '{override}'; the model, "
                 "data and training settings come from each run's saved config")
    return paths, overrides


def eval_command(args: list[str]) -> None:
    """`cnnlab eval RUN_DIR [RUN_DIR ...] [eval.KEY=VALUE ...]` (cnnlab/training/evaluate.py)."""
    if any(arg in ("-h", "--help") for arg in args):
        print(command_help("eval"))
        return
    run_dirs, overrides = _paths_and_overrides(args, "eval", "run directories",
                                               "JSON output: eval.format=json")
    if "eval.ema_decay" in {o.partition("=")[0] for o in overrides}:
        fail("eval.ema_decay is a training setting; cnnlab eval reads each run's own "
             "(use eval.weights=ema)")
    if not run_dirs:
        fail("eval needs at least one run directory: cnnlab eval RUN_DIR [RUN_DIR ...] "
             "[eval.tta=flip]")

    import json

    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from cnnlab.config.schema import EvalConfig, root_values

    try:
        # conf/config.yaml's eval section on the schema, then the command line's eval.* keys.
        ev = OmegaConf.merge(OmegaConf.structured(EvalConfig), root_values("eval"),
                             OmegaConf.from_dotlist([o.removeprefix("eval.") for o in overrides]))
    except OmegaConfBaseException as e:
        key = f"eval.{e.full_key}" if getattr(e, "full_key", None) else "eval"
        fail(f"{key}: {str(getattr(e, 'msg', e)).splitlines()[0]}")
    from cnnlab.cli.app import quiet_library_logs
    from cnnlab.data.types import DatasetUnavailableError
    from cnnlab.progress import console_log
    from cnnlab.training.ensemble import evaluate_runs, format_report

    quiet_library_logs()
    try:
        # Which run and split is being evaluated, and how long each took, on stderr.
        with console_log():
            report = evaluate_runs([Path(d) for d in run_dirs], ev)
    except (ConfigError, DatasetUnavailableError) as e:
        fail(str(e))
    print(format_report(report, ev.format))
    if ev.output is not None:
        Path(ev.output).write_text(json.dumps(report, indent=2) + "\n")


def compare_command(args: list[str]) -> None:
    """`cnnlab compare PATH [PATH ...] [compare.KEY=VALUE ...]` (cnnlab/analysis/compare.py)."""
    if any(arg in ("-h", "--help") for arg in args):
        print(command_help("compare"))
        return
    paths, overrides = _paths_and_overrides(args, "compare", "run or multirun directories",
                                            "CSV output: compare.format=csv")
    from cnnlab.analysis.compare import compare, parse_config
    from cnnlab.analysis.contrast import contrast_outputs
    from cnnlab.analysis.versus import versus_outputs

    try:
        cfg = parse_config(overrides)
        extras = [e for e in (versus_outputs(cfg), contrast_outputs(cfg)) if e is not None]
        text, written = compare(paths, cfg, extras)
    except ConfigError as e:
        fail(str(e))
    print(text, end="")
    folders = sorted({str(path.parent) for path in written})
    print(f"cnnlab compare: wrote {', '.join(p.name for p in written)} to {', '.join(folders)}",
          file=sys.stderr)


def lr_find_command(args: list[str]) -> None:
    """`cnnlab lr_find [OVERRIDES]` (cnnlab/training/lr_find.py): train's run at exponentially
    growing
    lrs; prints the suggested lr, writes the plot and the (lr, loss) pairs."""
    if any(arg.startswith("-") for arg in args):
        print(command_help("lr_find"))
        return
    from omegaconf import open_dict

    from cnnlab.training import lr_find

    cfg, _ = check_config(args)
    with open_dict(cfg):
        del cfg["hydra"]  # what a run sees: resolvable outside a Hydra job
    try:
        lr_find.validate(cfg.lr_find)
    except ConfigError as e:
        fail(str(e))
    from cnnlab.cli.app import quiet_library_logs
    from cnnlab.data.types import DatasetUnavailableError
    from cnnlab.progress import console_log
    from cnnlab.training.build import use_compile_cache

    quiet_library_logs()
    use_compile_cache(cfg.compile_cache_dir)
    try:
        with console_log():
            result = lr_find.range_test(cfg)
    except (ConfigError, DatasetUnavailableError) as e:
        fail(str(e))
    written = lr_find.write(result, Path(cfg.lr_find.output),
                            title=f"LR range test: {' '.join(args) or 'defaults'}")
    print(lr_find.report(result), end="")
    print(f"cnnlab lr_find: wrote {', '.join(p.name for p in written)} to "
          f"{cfg.lr_find.output}", file=sys.stderr)


def viz_command(args: list[str]) -> None:
    """`cnnlab viz KIND RUN_DIR [key=value ...]` (cnnlab/viz/)."""
    if any(arg in ("-h", "--help") for arg in args):
        print(command_help("viz"))
        return
    from cnnlab.viz.common import KINDS

    if not args or args[0] not in KINDS:
        from cnnlab.registry import unknown_choice

        fail(unknown_choice("viz kind", args[0] if args else "", KINDS.names()) + " (usage: "
             "cnnlab viz KIND RUN_DIR [key=value ...])")
    kind, rest = args[0], args[1:]
    paths = [a for a in rest if not _is_override(a)]
    if len(paths) != 1:
        fail(f"viz {kind} takes one run directory, got {len(paths)}: cnnlab viz {kind} RUN_DIR "
             "[key=value ...]")
    from cnnlab import viz
    from cnnlab.cli.app import quiet_library_logs
    from cnnlab.data.types import DatasetUnavailableError

    quiet_library_logs()
    try:
        result = viz.visualize(kind, Path(paths[0]), [a for a in rest if _is_override(a)])
    except (ConfigError, DatasetUnavailableError) as e:
        fail(str(e))
    for path in result.written:
        print(path)
    where = f"; logged to W&B ({result.wandb_folder})" if result.wandb_folder else ""
    print(f"cnnlab viz: wrote {len(result.written)} files to {Path(paths[0]) / 'viz'}{where}",
          file=sys.stderr)


COMMANDS: dict[str, Callable[[list[str]], None]] = {
    "train": train_command,
    "summary": summary_command,
    "eval": eval_command,
    "compare": compare_command,
    "lr_find": lr_find_command,
    "viz": viz_command,
}


def version() -> str:
    """`cnnlab --version`: this package's version and those of the libraries that decide the
    numbers (for bug reports and for papers' reproducibility sections)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    def of(package: str) -> str:
        try:
            return installed(package)
        except PackageNotFoundError:
            return "not installed"

    libraries = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "hydra-core",
                 "tensorflow-datasets", "wandb")
    return f"cnnlab {of('cnnlab')} (" + ", ".join(f"{p} {of(p)}" for p in libraries) + ")"


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    if args[0] in ("-V", "--version"):
        print(version())
        return
    command, rest = args[0], args[1:]
    # A log file that cannot be written (disk full, read-only) must not print a traceback per
    # message: the run reports the underlying failure itself, in one line.
    logging.raiseExceptions = False
    if command not in COMMANDS:
        fail(f"unknown command '{command}'; valid choices: {', '.join(COMMANDS)}")
    COMMANDS[command](rest)


if __name__ == "__main__":
    main()
