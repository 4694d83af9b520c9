"""From overrides to a checked config: compose with Hydra, resolve presets, validate.

Every entry point (the CLI, the Hydra app, `cnnlab eval`, the tests) goes through `compose` or
`validate`; each module checks its own keys (`validate` below calls them in turn), so a bad value
is one line naming it and the valid choices, before anything compiles.
"""

from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cnnlab import augment, data, evaluate, models, optim, preprocess, selection, tracking
from cnnlab.config import CONF_DIR, Config, resolve_presets
from cnnlab.errors import ConfigError, require
from cnnlab.models import layers
from cnnlab.models import summary as model_summary
from cnnlab.rundir import CONFIG


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
    require(cfg.seed >= 0, f"seed={cfg.seed} must be a non-negative integer")


# Each check takes the whole config and raises ConfigError; order: cheap before tracing.
CHECKS = (
    _validate_model,
    lambda cfg: augment.validate(cfg.augment),
    lambda cfg: preprocess.validate(cfg.preprocess, cfg.dataset.image_shape),
    _validate_loop,
    lambda cfg: data.validate(cfg.dataset),
    lambda cfg: optim.validate_optimizer(cfg.optimizer),
    lambda cfg: optim.validate_regularization(cfg.regularization),
    lambda cfg: optim.validate_schedule(cfg.schedule, cfg.train),
    selection.validate,
    lambda cfg: evaluate.validate(cfg.eval, cfg.augment, cfg.dataset.image_shape),
    lambda cfg: tracking.validate(cfg.logger),
    lambda cfg: model_summary.validate(cfg.summary),
)


def validate(cfg: DictConfig) -> None:
    """Check values and names; raises ConfigError with a one-line message naming the choices."""
    for check in CHECKS:
        check(cfg)
    if cfg.dataset.image_shape is not None:
        models.check_geometry(cfg, tuple(cfg.dataset.image_shape))


def validate_for_training(cfg: DictConfig) -> None:
    validate(cfg)
    require(not cfg.dataset.summary_only,
            f"dataset={cfg.dataset.name} describes shapes for `cnnlab summary` only; cnnlab "
            "keeps datasets in device memory, which it does not fit")


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


def load_run_config(run_dir: Path) -> DictConfig:
    """The config a run was trained with (<run_dir>/.hydra/config.yaml), typed by the schema."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a cnnlab run directory: no {CONFIG}")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(path))
        resolve_presets(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path}: {str(e).splitlines()[0]}") from None
    return cfg
