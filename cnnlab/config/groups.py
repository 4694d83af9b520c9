"""The config groups as files: `conf/<group>/*.yaml` options, their values with their bases
merged, and the sections of conf/config.yaml that no group chooses."""

from importlib.resources import files
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from cnnlab.errors import ConfigError


def find_conf_dir() -> Path:
    """Where the configs are: the repo's conf/ when cnnlab runs from a checkout (an editable
    install included), else the copy an installed wheel carries in `cnnlab/conf/` (setup.py puts
    conf/ there, with experiments/ as `experiment/`, without its results/)."""
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").is_file() and (checkout / "conf" / "config.yaml").is_file():
        return checkout / "conf"
    packaged = Path(str(files("cnnlab") / "conf"))
    if not (packaged / "config.yaml").is_file():
        raise ConfigError(f"cnnlab's configs are missing: neither {checkout / 'conf'} (a "
                          f"checkout) nor {packaged} (an installed wheel) has config.yaml")
    return packaged


# A real folder: Hydra's initialize_config_dir and group_options' file listing need one.
CONF_DIR = find_conf_dir()


def group_options(group: str, conf_dir: Path = CONF_DIR) -> list[str]:
    """The option names of a config group, from the YAML files in `conf/<group>/`.

    Options in sub-folders are named by their path, as Hydra names them (`smoke/init_study`).
    Private bases (`_stack`), hidden folders and `results/` are not options: `experiment` is the
    experiments/ folder, whose results/ keeps finished runs' logs with their saved configs.
    """
    root = conf_dir / group
    if not root.is_dir():
        return []

    def is_option(path: Path) -> bool:
        parts = path.relative_to(root).parts
        return parts[0] != "results" and not any(part[0] in "_." for part in parts)

    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml")
                  if is_option(p))


def help_groups() -> str:
    """The config groups and their options for `cnnlab train --help` (Hydra's own listing shows
    the private bases, `_stack` and `_cifar_resnet`, as if they were models)."""
    groups = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "hydra")
    return "\n".join(f"{group}: {', '.join(group_options(group))}" for group in groups)


OmegaConf.register_new_resolver("cnnlab_help_groups", help_groups, replace=True)


# The augment option every preset includes (all augmentations off): what "not overridden" means.
AUGMENT_BASE = "_base"


def option_values(group: str, name: str) -> DictConfig:
    """`conf/<group>/<name>.yaml` with the bases its defaults list names merged in, in order.

    Entries are options of the same group (`defaults: [_base, _self_]`); `_self_` marks where
    the file's own keys go (last if it is not listed), as Hydra composes a group option.
    """
    path = CONF_DIR / group / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"{group}={name}: no such option; valid choices: "
                          + ", ".join(group_options(group)))
    own = OmegaConf.load(path)
    with open_dict(own):
        defaults = own.pop("defaults", None)
    entries = list(defaults) if defaults is not None else []
    if "_self_" not in entries:
        entries.append("_self_")
    parts = []
    for entry in entries:
        if not isinstance(entry, str):
            raise ConfigError(f"{path}: option_values follows plain same-group entries only, "
                              f"not {entry}")
        parts.append(own if entry == "_self_" else option_values(group, entry))
    return OmegaConf.merge(*parts)


def root_values(key: str) -> DictConfig:
    """The section `key` of conf/config.yaml (one no group chooses: train, eval, ...)."""
    return OmegaConf.load(CONF_DIR / "config.yaml")[key]
