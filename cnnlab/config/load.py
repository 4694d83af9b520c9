"""Reading configs: compose one from overrides of conf/config.yaml, and load the config a saved
run was trained with. Nothing here validates (cnnlab/cli/preflight.py does, once per job), so
every reader of a saved run sits below every module that checks a value.
"""

from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

# conf/ calls these modules' resolvers (${short_dirname:...}, ${cnnlab_help:}): importing
# them here registers them before anything composes.
from cnnlab.config import groups, keys, names  # noqa: F401
from cnnlab.config.groups import CONF_DIR
from cnnlab.config.presets import resolve_presets
from cnnlab.config.schema import Config
from cnnlab.errors import ConfigError

# Where Hydra saves a run's config in its run directory (cnnlab/runs/rundir.py names the others).
SAVED_CONFIG = ".hydra/config.yaml"


def compose(overrides: list[str] | None = None) -> DictConfig:
    """The config of one run from overrides of conf/config.yaml (no Hydra app), presets
    resolved, not validated (cnnlab.cli.preflight.compose validates too)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=list(overrides or []))
    resolve_presets(cfg)
    return cfg


def _todays_defaults(run_dir: Path) -> DictConfig | dict:
    """Today's config for the group choices the run was made with (Hydra keeps them in
    .hydra/hydra.yaml), so that keys added to cnnlab since the run get their defaults; {} when
    the choices are unknown (no hydra.yaml) or no longer compose."""
    try:
        choices = OmegaConf.load(Path(run_dir) / ".hydra" / "hydra.yaml").hydra.runtime.choices
        return compose([f"{group}={choice}" for group, choice in choices.items()
                        if not group.startswith("hydra") and choice is not None])
    except Exception:  # noqa: BLE001 (only a convenience: the saved config is still read)
        return {}


def load_run_config(run_dir: Path) -> DictConfig:
    """The config a run was trained with (<run_dir>/.hydra/config.yaml), typed by the schema;
    keys added to cnnlab since then take today's defaults for the run's choices."""
    path = Path(run_dir) / SAVED_CONFIG
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a cnnlab run directory: no {SAVED_CONFIG}")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Config), _todays_defaults(run_dir),
                              OmegaConf.load(path))
        resolve_presets(cfg)
    except (OmegaConfBaseException, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: unreadable config ({str(e).splitlines()[0]})") from None
    return cfg
