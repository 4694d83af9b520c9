"""Every job a command line describes, composed and checked before anything runs or compiles.

Each module checks its own keys (`CHECKS` calls them in turn), so a bad value is one line naming
it and the valid choices, exit 2. This sits above every module it asks, which is why it lives in
cli/ and not in config/ (config/ is read by the modules it checks).
"""

import dataclasses
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from omegaconf import DictConfig, OmegaConf

from cnnlab import models, parallel
from cnnlab.cli import hydra_compat
from cnnlab.cli.args import fail
from cnnlab.config import load
from cnnlab.config.schema import Config
from cnnlab.data import placement, preprocess
from cnnlab.data import validate as dataset_checks
from cnnlab.data.augment import pipeline as augment
from cnnlab.errors import ConfigError, require
from cnnlab.models import layers
from cnnlab.models import summary as model_summary
from cnnlab.runs import tracking
from cnnlab.training import actions, diagnostics, evaluate, losses, numerics, optim, selection
from cnnlab.transfer import plan as transfer_plan


def _validate_model(cfg: DictConfig) -> None:
    models.model_options(cfg.model)
    for key, registry in (("init.conv", layers.INITIALIZERS), ("init.dense", layers.INITIALIZERS),
                          ("init.bias", layers.INITIALIZERS),
                          ("activation.name", layers.ACTIVATIONS), ("norm.name", layers.NORMS)):
        registry.get(OmegaConf.select(cfg, key))
    require(cfg.init.bias in layers.BIAS_INITIALIZERS,
            f"init.bias='{cfg.init.bias}' scales by a weight's fan, which a bias does not have; "
            f"valid choices: {', '.join(layers.BIAS_INITIALIZERS)}")


def _validate_loop(cfg: DictConfig) -> None:
    """train.*, checkpoint.*, seed: the loop acts between compiled chunks of steps."""
    for key in ("train.steps", "train.batch_size", "train.steps_per_call", "train.log_every",
                "train.eval_batch_size", "checkpoint.every", "checkpoint.keep"):
        value = OmegaConf.select(cfg, key)
        require(value > 0, f"{key}={value} must be a positive integer")
    require(cfg.train.eval_every >= 0, f"train.eval_every={cfg.train.eval_every} must be >= 0")
    per_call = cfg.train.steps_per_call
    for key in ("train.log_every", "train.eval_every", "checkpoint.every"):
        value = OmegaConf.select(cfg, key)
        require(value % per_call == 0,
                f"{key}={value} must be a multiple of train.steps_per_call={per_call}")
    # PRNGKey keeps the low 32 bits: seed 2**32 would silently be seed 0's run.
    require(0 <= cfg.seed < 2**32, f"seed={cfg.seed} must be in [0, 2**32)")
    devices = cfg.train.devices
    require(devices is None or devices > 0,
            f"train.devices={devices} must be a positive integer or null (every device)")
    parallel.check_distributed(cfg.train.distributed)
    threshold = cfg.train.divergence_threshold
    require(threshold is None or threshold > 0,
            f"train.divergence_threshold={threshold} must be positive or null (null: only "
            "NaN/inf count as diverged)")


def _validate_scale(cfg: DictConfig) -> None:
    """train.precision, train.matmul_precision, train.conv_impl, train.cpu_kernels and
    train.grad_accum; null (configs saved before them) is fp32, highest, xla, ynnpack and 1."""
    models.compute_dtype(cfg)
    models.conv_impl_choice(cfg)
    numerics.validate(cfg.train)
    accum, batch = cfg.train.grad_accum, cfg.train.batch_size
    if accum is None:
        return
    require(accum >= 1, f"train.grad_accum={accum} must be a positive integer")
    require(batch % accum == 0,
            f"train.batch_size={batch} must be a multiple of train.grad_accum={accum} (the "
            "microbatches are batch_size / grad_accum each)")


def _own_keys(cfg: DictConfig) -> list[str]:
    """The config's keys without `hydra` (there when composed with Hydra's own config, and not
    resolvable outside a Hydra job)."""
    return [key for key in cfg.keys() if key != "hydra"]


def _walk(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _walk(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _validate_numbers(cfg: DictConfig) -> None:
    """No setting is NaN or infinite (an infinite lr would run, then be reported diverged)."""
    values = {key: OmegaConf.to_container(cfg[key], resolve=True)
              if OmegaConf.is_config(cfg[key]) else cfg[key] for key in _own_keys(cfg)}
    for key, value in _walk(values):
        for item in value if isinstance(value, list) else [value]:
            require(not isinstance(item, float) or math.isfinite(item),
                    f"{key}={value} must be a finite number")


def _validate_known_keys(cfg: DictConfig) -> None:
    """`+train.stepz=1` adds a key the schema does not have (Hydra's `+` bypasses it): refuse
    it rather than store a setting nothing reads. Model keys are checked by their family."""
    sections = {f.name: f.type for f in dataclasses.fields(Config)}
    for section in _own_keys(cfg):
        node = cfg[section]
        require(section in sections,
                f"unknown key '{section}'; valid: {', '.join(sections)}")
        if not dataclasses.is_dataclass(sections[section]):
            continue  # model (typed by its family), scalars
        known = [f.name for f in dataclasses.fields(sections[section])]
        for key in node:
            require(key in known, f"unknown key '{section}.{key}'; valid keys of {section}: "
                    f"{', '.join(known)}")


def _validate_norm_values(cfg: DictConfig) -> None:
    norm = cfg.norm
    require(norm.momentum is None or 0 <= norm.momentum < 1,
            f"norm.momentum={norm.momentum} must be in [0, 1) (the running average's decay)")
    require(norm.epsilon is None or norm.epsilon > 0,
            f"norm.epsilon={norm.epsilon} must be positive")


# Each check takes the whole config and raises ConfigError; order: cheap before tracing.
CHECKS = (
    _validate_known_keys,
    _validate_numbers,
    _validate_model,
    _validate_norm_values,
    lambda cfg: augment.validate(cfg.augment, cfg.dataset.image_shape),
    lambda cfg: preprocess.validate(cfg.preprocess, cfg.dataset.image_shape),
    _validate_loop,
    _validate_scale,
    lambda cfg: dataset_checks.validate(cfg.dataset),
    placement.validate,
    lambda cfg: optim.validate_optimizer(cfg.optimizer),
    lambda cfg: optim.validate_regularization(cfg.regularization),
    lambda cfg: losses.validate(cfg.loss),
    transfer_plan.validate,
    lambda cfg: optim.validate_schedule(cfg.schedule, cfg.train),
    selection.validate,
    lambda cfg: evaluate.validate(cfg.eval, cfg.augment, cfg.dataset.image_shape),
    lambda cfg: tracking.validate(cfg.logger),
    lambda cfg: model_summary.validate(cfg.summary),
    diagnostics.validate,
    lambda cfg: actions.validate_profile(cfg.train.profile, cfg.train),
)


def validate(cfg: DictConfig) -> None:
    """Check values and names; raises ConfigError with a one-line message naming the choices."""
    for check in CHECKS:
        check(cfg)
    if cfg.dataset.image_shape is not None:
        models.check_geometry(cfg, tuple(cfg.dataset.image_shape))
    evaluate.validate_scales(cfg.eval, cfg)


def validate_for_training(cfg: DictConfig) -> None:
    # A multi-host job's processes meet before anything touches a device (the geometry check
    # below does: layers choose their conv kernel by backend).
    parallel.initialize_distributed(cfg.train.distributed)
    validate(cfg)
    require(not cfg.dataset.summary_only,
            f"dataset={cfg.dataset.name} describes shapes for `cnnlab summary` only; set "
            "dataset.summary_only=false to train on it (streamed: docs/data.md)")


def compose(overrides: list[str] | None = None, for_training: bool = True) -> DictConfig:
    """The config of one run from overrides of conf/config.yaml, presets resolved, validated."""
    cfg = load.compose(overrides)
    (validate_for_training if for_training else validate)(cfg)
    return cfg


def _searched_folders(parsed: list, config_dir: str | None) -> list[Path] | None:
    """The config folders composition reads: CONF_DIR, a user's `--config-dir` and the file://
    entries of a `hydra.searchpath` override; None when one is a package (pkg://), whose
    options are not listed here."""
    from cnnlab.config.groups import CONF_DIR

    folders = [CONF_DIR] + ([Path(config_dir).absolute()] if config_dir is not None else [])
    for override in parsed:
        if override.get_key_element().lstrip("+") == "hydra.searchpath":
            for entry in override.value() or []:
                if not str(entry).startswith("file://"):
                    return None
                folders.append(Path(str(entry).removeprefix("file://")).absolute())
    return folders


def _check_group_choices(parsed: list, config_dir: str | None = None) -> None:
    """`model=resnt20` -> one line with the valid choices (and the closest one), the options of
    a user's config folders (`--config-dir`, `hydra.searchpath`) among them."""
    from cnnlab.config.groups import CONF_DIR, group_options
    from cnnlab.registry import unknown_choice

    folders = _searched_folders(parsed, config_dir)
    if folders is None:
        return  # Hydra's own error names an unknown option
    groups = {p.name for p in CONF_DIR.iterdir() if p.is_dir() and not p.name.startswith("_")}
    for override in parsed:
        key = override.get_key_element().lstrip("~+")
        if key not in groups or override.is_delete():
            continue
        values = (list(override.sweep_string_iterator()) if override.is_discrete_sweep()
                  else [override.get_value_element_as_str()])
        valid = sorted({name for root in folders for name in group_options(key, root)})
        for value in values:
            if value not in valid and value != "null":
                fail(unknown_choice(key, value, valid))


def _expand(overrides: list[str], config_dir: str | None = None) -> list[list[str]]:
    """Every single-run override list a sweep describes, expanded by Hydra's basic sweeper (a
    later override of a key replaces an earlier one, so the command line wins over a config's
    `hydra.sweeper.params`). Ranges of a continuous search (Optuna's `interval(...)`) cannot be
    listed: those keys are checked in each job instead."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as e:
        fail(str(e).splitlines()[0] if str(e) else "could not parse the overrides")
    _check_group_choices(parsed, config_dir)
    listable = [o for o in parsed if not o.is_sweep_override() or o.is_discrete_sweep()]
    return hydra_compat.expand_sweep(listable)


def _config_sweep(hydra_cfg: DictConfig) -> list[str]:
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
    cfg: DictConfig  # the last composed config, with its `hydra` node
    steps: list[int]  # train.steps of each run
    # Each run as composed (what Hydra saves in .hydra/) and as checked (presets resolved).
    composed: list[DictConfig]
    checked: list[DictConfig]


def check_config(overrides: list[str], for_training: bool = True,
                 multirun: bool = False, config_dir: str | None = None) -> CheckedRuns:
    """Compose and validate every run the command line describes; exit 2 on the first error.

    A multirun (`-m`) also expands the sweep that a config declares in `hydra.sweeper.params`
    (the experiments/ studies). A study started without -m is refused with its size: in Hydra
    projects `experiment=` usually means one run, and a study can be days of training.
    `config_dir` (Hydra's `--config-dir`) adds a user's config folder to the search path.
    """
    import copy

    from hydra import compose
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from cnnlab.config.presets import resolve_presets

    check = validate_for_training if for_training else validate

    def composed(combination: list[str]) -> DictConfig:
        try:
            return compose(config_name="config", overrides=combination,
                           return_hydra_config=True)
        except (HydraException, OmegaConfBaseException, ValueError) as e:
            fail(_one_line(e))

    steps, composed_runs, checked_runs = [], [], []
    with hydra_compat.initialize(config_dir):
        for combination in _expand(overrides, config_dir):
            cfg = composed(combination)
            runs = [combination]
            declared = str(cfg.hydra.mode) in ("MULTIRUN", "RunMode.MULTIRUN")
            sweeping = multirun or declared
            _check_no_sweep_without_multirun(overrides, sweeping)
            if sweeping:
                runs = _expand(_config_sweep(cfg.hydra) + combination, config_dir)
            if declared and not multirun and for_training:
                _refuse_study_without_multirun(cfg, len(runs))
            for run in runs:
                raw = composed(run)
                _check_run_dir(raw, sweeping)
                cfg = copy.deepcopy(raw)
                try:
                    resolve_presets(cfg)
                    check(cfg)
                except ConfigError as e:
                    fail(str(e))
                except (OmegaConfBaseException, ValueError) as e:
                    fail(_one_line(e))
                steps.append(int(cfg.train.steps))
                composed_runs.append(raw)
                checked_runs.append(cfg)
    return CheckedRuns(cfg, steps, composed_runs, checked_runs)


def without_hydra(cfg: DictConfig) -> DictConfig:
    """What a run sees: a copy of a checked config without Hydra's own node (resolvable outside
    a Hydra job)."""
    import copy

    from omegaconf import open_dict

    run = copy.deepcopy(cfg)
    with open_dict(run):
        del run["hydra"]
    return run


def _refuse_study_without_multirun(cfg: DictConfig, jobs: int) -> None:
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


def _check_run_dir(cfg: DictConfig, multirun: bool) -> None:
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
