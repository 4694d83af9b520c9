"""What people see a run called: overrides that name the model as trained, and multirun job
folder names cut to a length every file system takes (the `${short_dirname:}` resolver)."""

import re

from omegaconf import OmegaConf

MAX_DIRNAME = 100


# `model=NAME` in a list of overrides (not `model.depth=8`): the choice of the model group.
_MODEL_CHOICE = re.compile(r"(?<![\w.+~])model=([\w-]+)")


def name_the_model(overrides: str, model_name: str | None) -> str:
    """`model=plain20` with `model.depth=8` trains a plain-8: overrides as shown to people
    (folder names, W&B names, compare labels) name the net trained, `model.name`."""
    if not model_name:
        return overrides
    return _MODEL_CHOICE.sub(f"model={model_name}", overrides)


def short_dirname(name: str, model_name: str | None = None) -> str:
    """A multirun job's folder name from its overrides (the model named as trained), cut to
    MAX_DIRNAME characters.

    Names past the file system's 255-byte limit would crash the sweep; the hash of the whole
    keeps cut names distinct. The job's full overrides are in `.hydra/overrides.yaml`. A job
    of a sweep that varies nothing (one model, one seed) is named by its model, not `0_`.
    """
    name = name_the_model(name, model_name) or (f"model={model_name}" if model_name else "")
    if len(name) <= MAX_DIRNAME:
        return name
    import hashlib

    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    return f"{name[:MAX_DIRNAME - 9]}~{digest}"


OmegaConf.register_new_resolver("short_dirname", short_dirname, replace=True)
