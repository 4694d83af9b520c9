"""From overrides to a checked config: compose with Hydra, resolve presets, validate.

Every entry point (the CLI, the Hydra app, `cnnlab eval`, the tests) goes through `compose` or
`validate`; each module checks its own keys (`validate` below calls them in turn), so a bad value
is one line naming it and the valid choices, before anything compiles.
"""

import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cnnlab import models, parallel
from cnnlab.config.schema import CONF_DIR, Config, resolve_presets
from cnnlab.data import placement as stream_config
from cnnlab.data import preprocess
from cnnlab.data import validate as dataset_checks
from cnnlab.data.augment import pipeline as augment
from cnnlab.errors import ConfigError, require
from cnnlab.models import layers
from cnnlab.models import summary as model_summary
from cnnlab.runs import tracking
from cnnlab.runs.rundir import CONFIG
from cnnlab.training import actions, diagnostics, evaluate, losses, optim, selection
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
    devices = cfg.train.get("devices")
    require(devices is None or devices > 0,
            f"train.devices={devices} must be a positive integer or null (every device)")
    parallel.check_distributed(cfg.train.get("distributed"))
    threshold = cfg.train.divergence_threshold
    require(threshold is None or threshold > 0,
            f"train.divergence_threshold={threshold} must be positive or null (null: only "
            "NaN/inf count as diverged)")


def _validate_scale(cfg: DictConfig) -> None:
    """train.precision and train.grad_accum; null (configs saved before them) is fp32 and 1."""
    models.compute_dtype(cfg)
    accum, batch = cfg.train.get("grad_accum"), cfg.train.batch_size
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
    stream_config.validate,
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
    lambda cfg: actions.validate_profile(cfg.train.get("profile"), cfg.train),
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
    parallel.initialize_distributed(cfg.train.get("distributed"))
    validate(cfg)
    require(not cfg.dataset.summary_only,
            f"dataset={cfg.dataset.name} describes shapes for `cnnlab summary` only; set "
            "dataset.summary_only=false to train on it (streamed: docs/data.md)")


def compose(overrides: list[str] | None = None, for_training: bool = True,
            check: bool = True) -> DictConfig:
    """The config of one run from overrides of conf/config.yaml (no Hydra app), presets
    resolved and, unless `check` is false, validated."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=list(overrides or []))
    resolve_presets(cfg)
    if check:
        (validate_for_training if for_training else validate)(cfg)
    return cfg


def _todays_defaults(run_dir: Path) -> DictConfig | dict:
    """Today's config for the group choices the run was made with (Hydra keeps them in
    .hydra/hydra.yaml), so that keys added to cnnlab since the run get their defaults; {} when
    the choices are unknown (no hydra.yaml) or no longer compose."""
    try:
        choices = OmegaConf.load(Path(run_dir) / ".hydra" / "hydra.yaml").hydra.runtime.choices
        return compose([f"{group}={choice}" for group, choice in choices.items()
                        if not group.startswith("hydra") and choice is not None], check=False)
    except Exception:  # noqa: BLE001 (only a convenience: the saved config is still read)
        return {}


def load_run_config(run_dir: Path) -> DictConfig:
    """The config a run was trained with (<run_dir>/.hydra/config.yaml), typed by the schema;
    keys added to cnnlab since then take today's defaults for the run's choices."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a cnnlab run directory: no {CONFIG}")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Config), _todays_defaults(run_dir),
                              OmegaConf.load(path))
        resolve_presets(cfg)
    except (OmegaConfBaseException, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: unreadable config ({str(e).splitlines()[0]})") from None
    return cfg
