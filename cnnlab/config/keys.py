"""What `cnnlab train --help` lists: each config group with its options, and each key with its
value and the one-line description kept beside its schema field (cnnlab.registry.described).
The listing is the `${cnnlab_help:}` resolver of conf/config.yaml's hydra.help.template, so
Hydra's own --help prints it for the config the command line composes."""

import dataclasses
import re
import textwrap
import typing
from collections.abc import Iterable
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cnnlab.config.groups import CONF_DIR, group_options
from cnnlab.config.schema import Config
from cnnlab.registry import field_help

WIDTH = 100
# Values longer than this (a stack model's layer list) are summarized: --cfg job prints them.
VALUE_WIDTH = 36
# Keys only another command reads (None: the whole section): its own --help lists them.
OTHER_COMMANDS: dict[str, tuple[str, ...] | None] = {
    "summary": None, "lr_find": None,
    "eval": ("eval.weights", "eval.format", "eval.output", "eval.batch_size", "eval.confusion_dir"),
}
# The key=value column: descriptions start here unless the key and value are longer.
COLUMN = 34


def key_descriptions(schema: type, prefix: str = "") -> dict[str, str]:
    """Every key of the dataclass `schema`, dotted, with its description; a nested section's
    key and each of its own keys (`augment.affine`, `augment.affine.rotate`)."""
    found: dict[str, str] = {}
    hints = typing.get_type_hints(schema)
    for name, text in field_help(schema).items():
        found[prefix + name] = text
        if dataclasses.is_dataclass(hints[name]):
            found.update(key_descriptions(hints[name], f"{prefix}{name}."))
    return found


def config_descriptions(model_family: str | None) -> dict[str, str]:
    """The descriptions of a run config's keys, the model's by its family's schemas."""
    from cnnlab.models import model_schemas

    found = key_descriptions(Config)
    if model_family is not None:
        for schema in model_schemas(model_family):
            found.update(key_descriptions(schema, "model."))
    return found


def format_value(value: Any) -> str:
    """A value as it is written on the command line (`[0.5,0.75]`, `null`, `true`)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{format_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def short_value(value: Any) -> str:
    text = format_value(value)
    if len(text) <= VALUE_WIDTH:
        return text
    return f"[{len(value)} entries]" if isinstance(value, list) else text[:VALUE_WIDTH - 3] + "..."


def key_lines(rows: Iterable[tuple[str, str]], indent: str = "  ") -> list[str]:
    """`KEY=VALUE  description` lines, the descriptions aligned where the keys allow."""
    return [f"{indent}{left:<{COLUMN}}  {text}".rstrip() for left, text in rows]


def leaves(section: Any, prefix: str) -> Iterable[tuple[str, Any]]:
    """(dotted key, value) of every leaf of a container (a nested section's keys each)."""
    if isinstance(section, dict) and section:
        for key, value in section.items():
            yield from leaves(value, f"{prefix}.{key}")
    else:
        yield prefix, section


def wrapped(text: str) -> list[str]:
    return textwrap.wrap(text, WIDTH, subsequent_indent="    ", break_on_hyphens=False)


def compact(options: list[str]) -> list[str]:
    """Numbered variants as one entry (`resnet18/20/32`), in order of their first variant."""
    numbered: dict[str, list[str]] = {}
    for option in options:
        match = re.fullmatch(r"([a-z_]+?)(\d+)", option)
        if match:
            numbered.setdefault(match[1], []).append(match[2])
    entries: list[str] = []
    for option in options:
        match = re.fullmatch(r"([a-z_]+?)(\d+)", option)
        if not match or len(numbered[match[1]]) == 1:
            entries.append(option)
        elif numbered[match[1]][0] == match[2]:
            digits = sorted(numbered[match[1]], key=int)
            entries.append(match[1] + "/".join(digits))
    return entries


def _group_header(name: str, about: str, choices: DictConfig) -> list[str]:
    choice = choices.get(name) if choices is not None else None
    now = f" {name}={choice};" if choice is not None else ""
    return wrapped(f"{name} ({about}):{now} options: {', '.join(compact(group_options(name)))}")


def _experiments() -> list[str]:
    """experiment=NAME's options, a study with a CI size (smoke/NAME) marked by a star."""
    options = group_options("experiment")
    names = [f"{o}*" if f"smoke/{o}" in options else o for o in options
             if not o.startswith("smoke/")]
    return wrapped("experiment (a study or recipe of experiments/; *: also smoke/NAME, its CI "
                   f"size): experiment=NAME of {', '.join(names)}")


def _for_other_options(group: str, choice: str | None, description: str) -> bool:
    """Whether a key is for other options of `group` only: its description names the options
    that read it (`lrn: window size`, `adam, adamw: beta1`) and `choice` is not one of them.
    Such a key is null under `choice` (the schema's convention), so help lists only its name."""
    named = description.split(": ", 1)[0].split(", ") if ": " in description else []
    return (choice is not None and bool(named) and choice not in named
            and set(named) <= set(group_options(group)))


def _sections(cfg: dict, choices: DictConfig | None) -> list[str]:
    family = cfg.get("model", {}).get("family")
    described = config_descriptions(family)
    groups = {p.name for p in CONF_DIR.iterdir() if p.is_dir()}
    lines: list[str] = []
    plain: list[tuple[str, str]] = []
    for name, about in field_help(Config).items():
        if OTHER_COMMANDS.get(name, ()) is None:
            continue
        # Plain keys, and sections of one key (resume, diagnostics), go under "other keys".
        if not isinstance(cfg.get(name), dict) or (len(cfg[name]) == 1 and name not in groups):
            plain += [(f"{key}={short_value(value)}", described.get(key, about))
                      for key, value in leaves(cfg.get(name), name)]
            continue
        keys = [(key, value) for key, value in leaves(cfg[name], name)
                if key not in OTHER_COMMANDS.get(name, ())]
        choice = choices.get(name) if choices is not None and name in groups else None
        unused = [key for key, value in keys
                  if value is None and _for_other_options(name, choice, described.get(key, ""))]
        rows = [(f"{key}={short_value(value)}", described.get(key, ""))
                for key, value in keys if key not in unused]
        short = [key.removeprefix(f"{name}.") for key in unused]
        other = wrapped(f"  null, for other options: {', '.join(short)}") if unused else []
        header = (_group_header(name, about, choices) if name in groups
                  else [f"{name} ({about}):"])
        lines += ["", *header, *key_lines(rows), *other]
    others = ", ".join(f"cnnlab {name} --help" for name in OTHER_COMMANDS)
    return lines + ["", "other keys:", *key_lines(plain), "", f"Other commands' keys: {others}"]


def help_listing(root: DictConfig) -> str:
    """The groups and keys of the composed config `root` (hydra's section gives the choices)."""
    cfg = OmegaConf.to_container(root, resolve=False)
    cfg.pop("hydra", None)
    choices = OmegaConf.select(root, "hydra.runtime.choices")
    # Hydra substitutes $NAME in its help template after this resolver: `$$` is a literal `$`.
    return "\n".join(["", *_experiments(), *_sections(cfg, choices)]).replace("$", "$$")


def _resolver(*, _root_: DictConfig) -> str:
    return help_listing(_root_)


OmegaConf.register_new_resolver("cnnlab_help", _resolver, replace=True)
