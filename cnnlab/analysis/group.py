"""Grouping: runs -> configurations (their seeds), labelled, ordered and selected.

A configuration is a resolved config without `seed` and the bookkeeping keys below; the runs
of one configuration are its seeds. Labels come from the runs' command-line overrides, else from
the config keys that differ; `compare.select` then keeps all finished seeds or the best one.
"""

import dataclasses
import difflib
import json
from collections.abc import Callable, Sequence
from typing import Any

from cnnlab.analysis.load import Run, summary_numbers
from cnnlab.config.names import name_the_model
from cnnlab.errors import ConfigError

# Keys that say how a run was logged, stored or fetched, not what was trained: runs differing
# only there are seeds of one configuration. (`summary.*` configures `cnnlab summary`.)
# A cross-validation fold is a replicate like a seed: the folds of one configuration are
# averaged, so the table reports mean ± std over folds (and seeds).
BOOKKEEPING = ("seed", "logger", "progress", "checkpoint", "compile_cache_dir", "dataset.data_dir",
               "dataset.download", "dataset.cache_dir", "dataset.cache_max_gb", "summary", "hydra",
               "resume", "lr_find", "dataset.fold", "diagnostics")


@dataclasses.dataclass(frozen=True)
class Configuration:
    """Runs with one configuration: its seeds."""

    label: str
    config: dict[str, Any]  # flattened, without seed and bookkeeping keys
    runs: tuple[Run, ...]

    @property
    def finished(self) -> tuple[Run, ...]:
        return tuple(run for run in self.runs if run.finished)


def is_bookkeeping(key: str) -> bool:
    return any(key == b or key.startswith(f"{b}.") for b in BOOKKEEPING)


def configuration_of(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if not is_bookkeeping(k)}


def format_value(value: Any) -> str:
    """A config value as it would be written on the command line."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)  # true/false/null
    if isinstance(value, list):
        return "[" + ",".join(map(format_value, value)) + "]"
    return str(value)


def display_value(value: Any) -> str:
    """A config value as pandas and Python print it (True, None), for titles and tables."""
    return str(value) if isinstance(value, bool) or value is None else format_value(value)


# Short names of the keys figures are most often split by. Other keys are named by their last
# part (train.batch_size -> batch size), GROUP.name by its group (norm.name -> norm).
KEY_NAMES = {"model.name": "model", "model.depth": "depth", "model.residual": "residual",
             "optimizer.lr": "learning rate", "optimizer.weight_decay": "weight decay",
             "train.steps": "iterations", "norm.name": "normalization",
             "init.name": "initialization"}


def readable_key(key: str) -> str:
    if key in KEY_NAMES:
        return KEY_NAMES[key]
    group, _, last = key.rpartition(".")
    name = group.rpartition(".")[2] if last == "name" and group else last
    return name.replace("_", " ")


def panel_title(key: str, value: Any) -> str:
    """`model.residual`, True -> "residual: True"."""
    return f"{readable_key(key)}: {display_value(value)}"


# Panels sort by value within a kind: False before True, numbers ascending, strings
# alphabetically, then anything else (lists, unset) by its text. bool first: it is an int too.
_VALUE_RANKS = ((bool, 0), (int | float, 1), (str, 2))


def value_order(value: Any) -> tuple[int, Any]:
    rank = next((r for kind, r in _VALUE_RANKS if isinstance(value, kind)), len(_VALUE_RANKS))
    return rank, value if rank < len(_VALUE_RANKS) else format_value(value)


def _override_key(override: str) -> str:
    return override.partition("=")[0].lstrip("+~")


DEFAULTS_LABEL = "defaults"
# Fallback labels name every differing config key up to this many; beyond, the fewest keys
# (in config order, keys all configurations have first) that tell the configurations apart.
MAX_LABEL_KEYS = 4


def _override_labels(groups: Sequence[Sequence[Run]]) -> list[str] | None:
    """Labels from the overrides not shared by all runs; None when they cannot tell apart."""
    runs = [run for group in groups for run in group]
    if any(run.overrides is None for run in runs):
        return None
    kept = {id(run): [name_the_model(o, run.config.get("model.name"))
                      for o in run.overrides if not is_bookkeeping(_override_key(o))]
            for run in runs}
    shared = set.intersection(*(set(k) for k in kept.values()))
    if len(groups) == 1:  # nothing to tell apart: say what the one configuration was
        return [", ".join(kept[id(groups[0][0])])]
    labels = [", ".join(o for o in kept[id(group[0])] if o not in shared) for group in groups]
    if labels.count("") == 1:  # the one configuration run with the defaults (of the others)
        labels[labels.index("")] = DEFAULTS_LABEL
    return labels if all(labels) and len(set(labels)) == len(labels) else None


UNSET = "<unset>"  # a key of another config version, or of another model family


def _label_value(config: dict[str, Any], key: str) -> str:
    return format_value(config.get(key, UNSET))


def differing_keys(configs: Sequence[dict[str, Any]]) -> list[str]:
    """The flattened keys whose values differ between configurations, in config order, keys
    all configurations have first."""
    keys = list(dict.fromkeys(k for config in configs for k in config))
    differing = [k for k in keys if len({_label_value(c, k) for c in configs}) > 1]
    differing.sort(key=lambda k: not all(k in c for c in configs))  # stable: config order
    return differing


def distinguishing_keys(configs: Sequence[dict[str, Any]]) -> list[str]:
    """All differing keys up to MAX_LABEL_KEYS; beyond, the fewest leading ones that tell the
    configurations apart."""
    differing = differing_keys(configs)
    if len(differing) <= MAX_LABEL_KEYS:
        return differing
    for count in range(1, len(differing) + 1):
        chosen = differing[:count]
        if len({tuple(_label_value(c, k) for k in chosen) for c in configs}) == len(configs):
            return chosen
    return differing


def _config_labels(configs: Sequence[dict[str, Any]]) -> list[str]:
    """Labels from the flattened keys whose values differ between configurations."""
    chosen = distinguishing_keys(configs)
    more = ", …" if len(chosen) < len(differing_keys(configs)) else ""
    return [", ".join(f"{k}={_label_value(c, k)}" for k in chosen) + more for c in configs]


def group_runs(runs: Sequence[Run]) -> list[Configuration]:
    """Runs grouped by configuration, in order of first appearance, each labelled."""
    groups: dict[str, list[Run]] = {}
    configs: dict[str, dict[str, Any]] = {}
    for run in runs:
        config = configuration_of(run.config)
        key = json.dumps(config, sort_keys=True, default=str)
        groups.setdefault(key, []).append(run)
        configs.setdefault(key, config)
    members = list(groups.values())
    labels = _override_labels(members) or _config_labels(list(configs.values()))
    return [
        Configuration(label or str(config.get("model.name", "all runs")), config, tuple(group))
        for label, config, group in zip(labels, configs.values(), members, strict=True)
    ]


def check_panel_key(runs: Sequence[Run], key: str) -> None:
    keys = {k for run in runs for k in run.config}
    if key not in keys:
        close = difflib.get_close_matches(key, sorted(keys), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"compare.panel_by: no run has config key '{key}'{hint}")


SELECT_KEY = "final/val/error"


def _select_all(configuration: Configuration) -> Configuration:
    return configuration


def _select_best(configuration: Configuration) -> Configuration:
    """The configuration with one finished run, the lowest final validation error of its
    finished runs (ties: the first given); its unfinished runs stay listed as failed."""
    scored = [run for run in configuration.finished if summary_numbers([run], SELECT_KEY)]
    if configuration.finished and not scored:
        raise ConfigError(f"compare.select=best picks by {SELECT_KEY}, which no finished run of "
                          f"'{configuration.label}' logged: train with dataset.val_size > 0 or "
                          "dataset.folds")
    best = min(scored, key=lambda run: summary_numbers([run], SELECT_KEY)[0], default=None)
    kept = tuple(run for run in configuration.runs if run is best or not run.finished)
    return dataclasses.replace(configuration, runs=kept)


# What `compare.select` does to each configuration before anything is averaged.
SELECTIONS: dict[str, Callable[[Configuration], Configuration]] = {
    "all": _select_all, "best": _select_best,
}
