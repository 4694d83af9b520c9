"""`cnnlab compare PATH...`: tables and training curves over runs, mean ± std over seeds.

Everything comes from the files each run wrote (cnnlab/runs/tracking.py): `.hydra/config.yaml` and
`.hydra/overrides.yaml`, `metrics.jsonl`, `summary.json`; `wandb:ENTITY/PROJECT/GROUP` reads the
same from W&B (online). The steps are pure functions over plain records, each testable alone:

    load (files -> Run) -> group (Runs -> Configuration) -> aggregate (Stat, Curve)
    -> render (markdown, CSV here; PNG in cnnlab/analysis/plots.py)

A configuration is a resolved config without `seed` and the bookkeeping keys below; the runs
of one configuration are its seeds. Only finished runs are averaged and drawn; the others are
listed with their reason.
"""

import csv
import dataclasses
import difflib
import fnmatch
import io
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cnnlab.analysis.plots import YSCALES, CurveSet, lr_drops, mean_curve, plot_curves, plot_pareto
from cnnlab.config.names import name_the_model
from cnnlab.errors import ConfigError
from cnnlab.runs.rundir import CONFIG, CURVES, RunDir, find_run_dirs, floats
from cnnlab.runs.tracking import flatten

if TYPE_CHECKING:
    import pandas as pd  # imported where tables are made: `cnnlab train` never needs it

COMPARE_DIR = "compare"
TABLE_MD, TABLE_CSV, FAILED_CSV = "table.md", "table.csv", "failed.csv"
PARETO_MD, PARETO_PNG = "pareto.md", "pareto.png"
WANDB_PREFIX = "wandb:"
NO_SUMMARY = "no summary.json (the job crashed before training started)"

# Only finished runs are averaged and drawn. The others are listed: diverged and failed runs
# failed; interrupted and running ones (a kill leaves "running" behind) are incomplete.
FINISHED = "finished"

# Keys that say how a run was logged, stored or fetched, not what was trained: runs differing
# only there are seeds of one configuration. (`summary.*` configures `cnnlab summary`.)
# A cross-validation fold is a replicate like a seed: the folds of one configuration are
# averaged, so the table reports mean ± std over folds (and seeds).
BOOKKEEPING = ("seed", "logger", "progress", "checkpoint", "compile_cache_dir", "dataset.data_dir",
               "dataset.download", "dataset.cache_dir", "dataset.cache_max_gb", "summary", "hydra",
               "resume", "lr_find", "dataset.fold", "diagnostics")


@dataclasses.dataclass
class CompareConfig:
    """`compare.KEY=VALUE` options of `cnnlab compare`."""

    # Where the files go; null: <PATH>/compare for a single directory PATH, else ./compare.
    output: str | None = None
    # What is printed: markdown (both tables) or csv (the configuration table; failed.csv is
    # written beside it). The files are always written in both formats.
    format: str = "markdown"
    # Curves of train/test error (%) or train/test loss.
    metric: str = "error"
    # A flattened config key (e.g. model.residual): one panel per value, side by side, as
    # He et al. 2016 Figure 6 has plain nets left and ResNets right. null: one panel.
    panel_by: str | None = None
    # y-axis range [lo, hi]; null: matplotlib's.
    ylim: list[float] | None = None
    # auto: logarithmic when the curves span more than two decades (losses), else linear.
    yscale: str = "auto"
    # Logged keys to draw instead of `metric`: exact keys or fnmatch globs of metrics.jsonl keys
    # (e.g. diag/grad_norm/*). One key: one line per configuration, like `metric`; several: one
    # panel per configuration, one line per key (see key_curves).
    keys: list[str] | None = None
    # Shade mean ± std over seeds around each curve.
    shade_std: bool = False
    dpi: int = 150
    # all: every finished seed of a configuration is averaged; best: only the one with the
    # lowest final validation error is reported ("random restarts": keep the best trial).
    select: str = "all"
    # Error against multiply-adds per image, one point per configuration (mean over seeds),
    # the Pareto front marked: pareto.md and pareto.png, and the table printed after the others.
    pareto: bool = False
    # A config key (e.g. transfer.load_through): also versus.md and versus.png, the final test
    # error against its values, a line per other differing setting (cnnlab/analysis/versus.py).
    versus: str | None = None
    # A config key (e.g. model.residual): also contrast.md, each of its values against the first
    # within groups that differ in nothing else, Welch's t-test over seeds
    # (cnnlab/analysis/contrast.py).
    contrast: str | None = None


@dataclasses.dataclass(frozen=True)
class Metric:
    train: str
    test: str | None  # None: a logged key of its own (compare.keys), drawn as a train curve
    axis_label: str


METRICS: dict[str, Metric] = {
    "error": Metric("train/error", "test/error", "error (%)"),
    "loss": Metric("train/loss", "test/loss", "loss"),
}


# ------------------------------------------------------------------------------------ loading


@dataclasses.dataclass(frozen=True)
class Run:
    """One run as its files describe it."""

    name: str  # for tables: the run dir relative to the compared path when possible
    source: str  # unique id (resolved path or W&B path), to drop runs given twice
    config: dict[str, Any]  # flattened resolved config, all keys
    overrides: tuple[str, ...] | None  # the job's command-line overrides; None: unknown
    summary: dict[str, Any]
    metrics: tuple[dict[str, Any], ...]  # events by step, non-finite strings made floats
    status: str
    reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.status == FINISHED

    @property
    def seed(self) -> Any:
        return self.summary.get("seed", self.config.get("seed"))


def _read_config(path: Path) -> dict[str, Any]:
    # Hydra saves the config unresolved (`name: plain${.depth}`); resolve like the run did.
    # An interpolation that only resolves inside Hydra (${hydra:...}) keeps its raw text.
    try:
        cfg = OmegaConf.load(path)
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: unreadable config ({str(e).splitlines()[0]})") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path}: not a config (a {type(cfg).__name__})")
    try:
        return flatten(OmegaConf.to_container(cfg, resolve=True))
    except OmegaConfBaseException:
        return flatten(OmegaConf.to_container(cfg, resolve=False))


# A kill leaves a summary that still says "running".
_RUNNING = "no final summary: still running, or killed"


def run_status(summary: dict[str, Any] | None) -> tuple[str, str | None]:
    """(status, reason) of a run; a missing summary.json means the job never trained."""
    if summary is None:
        return "failed", NO_SUMMARY
    status = str(summary.get("status", "failed"))
    if status == FINISHED:
        return status, None
    return status, summary.get("failure") or (_RUNNING if status == "running" else None)


def load_run(run_dir: Path, name: str | None = None) -> Run:
    """The Run record of one run directory (it must hold .hydra/config.yaml)."""
    files = RunDir(run_dir)
    metrics = files.read_metrics()
    summary = files.read_summary()
    status, reason = run_status(summary)
    return Run(
        name=name or str(run_dir), source=str(Path(run_dir).resolve()),
        config=_read_config(files / CONFIG), overrides=files.overrides(),
        summary=summary or {}, metrics=tuple(metrics), status=status, reason=reason,
    )


def _load_path(path: Path, relative_names: bool) -> list[Run]:
    if not path.exists():
        raise ConfigError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise ConfigError(f"{path} is not a directory; compare takes multirun directories, run "
                          f"directories or {WANDB_PREFIX}ENTITY/PROJECT/GROUP")
    run_dirs = find_run_dirs(path)
    if not run_dirs:
        raise ConfigError(f"no runs in {path}: no directory there holds {CONFIG}")

    def name(run_dir: Path) -> str:
        if run_dir == path:
            return str(path)
        relative = run_dir.relative_to(path)
        return str(relative if relative_names else path / relative)

    return [load_run(d, name(d)) for d in run_dirs]


def load_runs(paths: Sequence[str]) -> list[Run]:
    """The runs under each PATH, in order, each once."""
    if not paths:
        raise ConfigError("compare needs at least one multirun directory, run directory or "
                          f"{WANDB_PREFIX}ENTITY/PROJECT/GROUP")
    runs: dict[str, Run] = {}
    for spec in paths:
        loaded = (load_wandb_runs(spec) if spec.startswith(WANDB_PREFIX)
                  else _load_path(Path(spec), relative_names=len(paths) == 1))
        for run in loaded:
            runs.setdefault(run.source, run)
    return list(runs.values())


# W&B's run states, onto summary.json's statuses (for runs whose summary has none).
_WANDB_STATES = {"finished": "finished", "crashed": "failed", "failed": "failed",
                 "killed": "interrupted", "running": "running"}


def _wandb_run(remote: Any, project: str) -> Run:
    """A W&B public-API run as the Run its local files would give (no overrides in W&B)."""
    summary = floats({k: v for k, v in dict(remote.summary_metrics).items()
                       if not k.startswith("_")})
    summary.setdefault("status", _WANDB_STATES.get(remote.state, "failed"))
    metrics = []
    for row in remote.scan_history():
        if row.get("_step") is not None:
            values = {k: v for k, v in row.items() if not k.startswith("_") and v is not None}
            metrics.append({**floats(values), "step": int(row["_step"])})
    status, reason = run_status(summary)
    return Run(name=remote.name or remote.id, source=f"{WANDB_PREFIX}{project}/{remote.id}",
               config=flatten(dict(remote.config)), overrides=None, summary=summary,
               metrics=tuple(metrics), status=status, reason=reason)


def load_wandb_runs(spec: str) -> list[Run]:
    """The runs of `wandb:ENTITY/PROJECT/GROUP`, read online (needs `wandb login`)."""
    parts = spec.removeprefix(WANDB_PREFIX).split("/")
    if len(parts) != 3 or not all(parts):
        raise ConfigError(f"'{spec}': expected {WANDB_PREFIX}ENTITY/PROJECT/GROUP")
    entity, project, group = parts
    try:
        import wandb

        remote = wandb.Api(timeout=30).runs(f"{entity}/{project}", filters={"group": group})
        runs = [_wandb_run(r, f"{entity}/{project}") for r in remote]
    except Exception as e:  # no API key, no network, no such project: one line all the same
        lines = str(e).strip().splitlines() or [type(e).__name__]
        raise ConfigError(f"cannot read W&B group {entity}/{project}/{group}: {lines[0]}") from None
    if not runs:
        raise ConfigError(f"W&B project {entity}/{project} has no runs in group {group}")
    return runs


# ----------------------------------------------------------------------------------- grouping


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


# -------------------------------------------------------------------------------- aggregation


@dataclasses.dataclass(frozen=True)
class Stat:
    mean: float | None
    std: float | None  # sample std (ddof=1); None for fewer than 2 values
    n: int


def mean_std(values: Sequence[float]) -> Stat:
    if not values:
        return Stat(None, None, 0)
    array = np.asarray(values, dtype=float)
    std = float(array.std(ddof=1)) if len(array) > 1 else None
    return Stat(float(array.mean()), std, len(array))


@dataclasses.dataclass(frozen=True)
class Column:
    """A table column: mean ± std over finished seeds of one summary.json key."""

    name: str  # CSV: <name>_mean, <name>_std
    key: str
    header: str
    fmt: Callable[[float], str]
    spread: bool = True  # False: the same for every seed (architecture): show the value only
    optional: bool = False  # left out when no finished run has it (val split, older runs)


def _fixed(digits: int) -> Callable[[float], str]:
    return lambda value: f"{value:.{digits}f}"


def _count(value: float) -> str:
    # Like the papers' tables: 0.27M parameters, 1.82G multiply-adds.
    if value >= 1e9:
        return f"{value / 1e9:.2f}G"
    return f"{value / 1e6:.2f}M" if value >= 1e5 else f"{value:,.0f}"


COLUMNS = (
    Column("final_test_error", "final/test/error", "final test error (%)", _fixed(2)),
    Column("best_test_error", "best/test/error", "best test error (%)", _fixed(2)),
    Column("final_train_error", "final/train/error", "final train error (%)", _fixed(2)),
    Column("final_val_error", "final/val/error", "final val error (%)", _fixed(2),
           optional=True),
    Column("best_val_error", "best/val/error", "best val error (%)", _fixed(2), optional=True),
    Column("params", "params", "params", _count, spread=False),
    Column("macs", "macs", "MACs", _count, spread=False, optional=True),
    Column("images_per_sec", "images_per_sec", "images/s", _fixed(0)),
    Column("wall_time", "wall_time", "wall time (s)", _fixed(0)),
)


@dataclasses.dataclass(frozen=True)
class Row:
    label: str
    finished: int
    runs: int
    stats: dict[str, Stat]  # by column name
    config: dict[str, Any] = dataclasses.field(default_factory=dict)  # for the key columns


def _numbers(runs: Iterable[Run], key: str) -> list[float]:
    values = (run.summary.get(key) for run in runs)
    return [float(v) for v in values if isinstance(v, int | float) and not isinstance(v, bool)]


def table_rows(configurations: Sequence[Configuration]) -> list[Row]:
    return [
        Row(c.label, len(c.finished), len(c.runs),
            {col.name: mean_std(_numbers(c.finished, col.key)) for col in COLUMNS}, c.config)
        for c in configurations
    ]


def table_columns(rows: Sequence[Row]) -> list[Column]:
    """The columns to show: optional ones only when some row has a value."""
    return [col for col in COLUMNS
            if not col.optional or any(row.stats[col.name].n for row in rows)]


@dataclasses.dataclass(frozen=True)
class FailedRun:
    run: str
    label: str
    seed: Any
    status: str
    step: Any  # final_step, else the last step logged (a running or killed run); None: none
    reason: str | None
    config: dict[str, Any] = dataclasses.field(default_factory=dict)  # for the key columns
    keys: tuple[str, ...] = ()  # the keys that vary across all configurations compared


def failed_runs(runs: Sequence[Run], configurations: Sequence[Configuration]) -> list[FailedRun]:
    """The runs not averaged, in the order given (job order), with their configuration and
    the keys that vary across every configuration compared (so its columns are table.csv's)."""
    of_run = {id(run): c for c in configurations for run in c.runs}
    keys = tuple(differing_keys([c.config for c in configurations]))
    return [FailedRun(run.name, of_run[id(run)].label, run.seed, run.status, _reached(run),
                      run.reason, of_run[id(run)].config, keys)
            for run in runs if not run.finished]


def _reached(run: Run) -> int | None:
    """How far an unfinished run got: its final step, else the last one it logged."""
    if (step := run.summary.get("final_step")) is not None:
        return step
    return max((int(e["step"]) for e in run.metrics if "step" in e), default=None)


def check_panel_key(runs: Sequence[Run], key: str) -> None:
    keys = {k for run in runs for k in run.config}
    if key not in keys:
        close = difflib.get_close_matches(key, sorted(keys), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"compare.panel_by: no run has config key '{key}'{hint}")


def _panel_value(c: Configuration, key: str) -> Any:
    return c.runs[0].config.get(key)  # the full config: panel_by may name any key


def _curve_set(c: Configuration, metric: Metric, panel_by: str | None) -> CurveSet | None:
    histories = [run.metrics for run in c.finished]
    train = mean_curve(histories, metric.train)
    test = mean_curve(histories, metric.test) if metric.test is not None else None
    if train is None and test is None:
        return None
    panel = None if panel_by is None else panel_title(panel_by, _panel_value(c, panel_by))
    # Every seed's drops: equal for a step schedule, each seed's own on plateau.
    drops = sorted({step for history in histories for step in lr_drops(history)})
    return CurveSet(c.label, train, test, panel, tuple(drops))


def matching_keys(runs: Sequence[Run], patterns: Sequence[str]) -> list[str]:
    """The keys finished runs logged that match a pattern (fnmatch: `*` spans `/` too), in the
    order they were first logged; ConfigError when none does."""
    logged = dict.fromkeys(key for run in runs if run.finished for event in run.metrics
                           for key in event if key != "step")
    keys = [k for k in logged if any(fnmatch.fnmatchcase(k, p) for p in patterns)]
    if not keys:
        close = difflib.get_close_matches(patterns[0] if patterns else "", list(logged), n=3)
        hint = f"; logged keys include {', '.join(close)}" if close else ""
        raise ConfigError(f"compare.keys: no finished run logged a key matching "
                          f"{', '.join(patterns) or '(nothing)'}{hint}")
    return keys


def common_prefix(keys: Sequence[str]) -> str:
    """The `/`-separated path all keys share (`diag/grad_norm/` of its layers' keys)."""
    prefix = os.path.commonprefix(list(keys))
    return prefix[:prefix.rfind("/") + 1]


def key_curves(configurations: Sequence[Configuration], keys: Sequence[str],
               panel_by: str | None = None) -> list[CurveSet]:
    """Curves of logged `keys`, each the mean over a configuration's finished seeds.

    One key: a curve set per configuration, labelled and panelled like `metric`'s. Several:
    one panel per configuration, a line per key labelled by what is left after the keys' common
    prefix (the layer of `diag/grad_norm/<layer>`), coloured alike in every panel, so that,
    e.g., each layer's gradient norm in a plain net and a ResNet sit side by side.
    """
    if len(keys) == 1:
        return _panelled_curves(configurations, Metric(keys[0], None, keys[0]), panel_by)
    cut = len(common_prefix(keys))
    sets = []
    for c in configurations:
        histories = [run.metrics for run in c.finished]
        drops = tuple(sorted({s for history in histories for s in lr_drops(history)}))
        for key in keys:
            if (curve := mean_curve(histories, key)) is not None:
                sets.append(CurveSet(key[cut:] or key, curve, None, c.label, drops))
    return sets


def configuration_curves(configurations: Sequence[Configuration], metric: str = "error",
                         panel_by: str | None = None) -> list[CurveSet]:
    """The mean curves of each configuration's finished seeds (none: not drawn).

    In configuration order, stably sorted by the panel key's value, so that the panels (and
    legend entries) go False, True or 20, 56 whatever order the jobs ran in.
    """
    return _panelled_curves(configurations, METRICS[metric], panel_by)


def _panelled_curves(configurations: Sequence[Configuration], metric: Metric,
                     panel_by: str | None) -> list[CurveSet]:
    drawn = [(c, cs) for c in configurations
             if (cs := _curve_set(c, metric, panel_by)) is not None]
    if panel_by is not None:
        drawn.sort(key=lambda pair: value_order(_panel_value(pair[0], panel_by)))
    return [cs for _, cs in drawn]


SELECT_KEY = "final/val/error"


def _select_all(configuration: Configuration) -> Configuration:
    return configuration


def _select_best(configuration: Configuration) -> Configuration:
    """The configuration with one finished run, the lowest final validation error of its
    finished runs (ties: the first given); its unfinished runs stay listed as failed."""
    scored = [run for run in configuration.finished if _numbers([run], SELECT_KEY)]
    if configuration.finished and not scored:
        raise ConfigError(f"compare.select=best picks by {SELECT_KEY}, which no finished run of "
                          f"'{configuration.label}' logged: train with dataset.val_size > 0 or "
                          "dataset.folds")
    best = min(scored, key=lambda run: _numbers([run], SELECT_KEY)[0], default=None)
    kept = tuple(run for run in configuration.runs if run is best or not run.finished)
    return dataclasses.replace(configuration, runs=kept)


# What `compare.select` does to each configuration before anything is averaged.
SELECTIONS: dict[str, Callable[[Configuration], Configuration]] = {
    "all": _select_all, "best": _select_best,
}


# ---------------------------------------------------------------------------------- rendering


def format_stat(stat: Stat, column: Column) -> str:
    if stat.mean is None:
        return "-"
    if stat.std is None or not column.spread:
        return column.fmt(stat.mean)
    return f"{column.fmt(stat.mean)} ± {column.fmt(stat.std)}"


def _cell(value: Any) -> str:
    text = "-" if value is None or value == "" else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _markdown(headers: Sequence[str], rows: Iterable[Sequence[Any]],
              right: Sequence[bool]) -> str:
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---:" if r else "---" for r in right) + "|"]
    lines += ["| " + " | ".join(map(_cell, row)) + " |" for row in rows]
    return "\n".join(lines)


CONFIGURATION = "configuration"  # the label column, when no config key varies


def _key_cells(row: Row, keys: Sequence[str], value: Callable[[Any], Any]) -> list[Any]:
    """The row's value of each varying key (None where it has no such key); with no varying
    key, the configuration's label, so that a lone configuration still says what ran."""
    if not keys:
        return [row.label]
    return [value(row.config[k]) if k in row.config else None for k in keys]


def markdown_table(rows: Sequence[Row]) -> str:
    """One column per differing config key (the fewest that tell the rows apart when more than
    MAX_LABEL_KEYS differ: table.csv has them all), then seeds and the statistics."""
    columns = table_columns(rows)
    keys = distinguishing_keys([row.config for row in rows])
    return _markdown(
        [*(keys or [CONFIGURATION]), "seeds", *(col.header for col in columns)],
        ([*_key_cells(row, keys, display_value), f"{row.finished}/{row.runs}",
          *(format_stat(row.stats[col.name], col) for col in columns)] for row in rows),
        [*(False for _ in keys or [CONFIGURATION]), True, *(True for _ in columns)],
    )


FAILED_HEADERS = ("run", "seed", "status", "step", "reason")


def _failed_key_cells(run: FailedRun, value: Callable[[Any], Any]) -> list[Any]:
    if not run.keys:
        return [run.label]
    return [value(run.config[k]) if k in run.config else None for k in run.keys]


def _failed_cells(run: FailedRun, value: Callable[[Any], Any]) -> list[Any]:
    """run, the configuration's key values (or its label), seed, status, step, reason."""
    return [run.run, *_failed_key_cells(run, value), run.seed, run.status, run.step, run.reason]


def _failed_headers(failed: Sequence[FailedRun]) -> list[str]:
    keys = list(failed[0].keys) or [CONFIGURATION]
    return [FAILED_HEADERS[0], *keys, *FAILED_HEADERS[1:]]


def failed_markdown(failed: Sequence[FailedRun]) -> str:
    if not failed:
        return "none"
    headers = _failed_headers(failed)
    keys = len(headers) - len(FAILED_HEADERS)
    return _markdown(headers, (_failed_cells(f, display_value) for f in failed),
                     [False, *(False for _ in range(keys)), True, False, True, False])


def render_markdown(rows: Sequence[Row], failed: Sequence[FailedRun]) -> str:
    return (f"## Configurations (mean ± std over finished seeds)\n\n{markdown_table(rows)}\n\n"
            f"## Failed or incomplete runs\n\n{failed_markdown(failed)}\n")


def _csv(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    # repr-exact floats; None (no value, or no std for one seed) as an empty field.
    writer.writerows([["" if v is None else v for v in row] for row in rows])
    return out.getvalue()


# CSV statistics are cut to this many significant digits: means and stds over a few seeds
# mean nothing further, and 89.99 beats 89.99000000000001. Whole numbers stay exact.
CSV_DIGITS = 6


def _csv_key_value(value: Any) -> Any:
    return format_value(value) if isinstance(value, list | dict) else value


def _tidy(values: Sequence[float | None]) -> "pd.Series":
    """A statistic's column: integers when every value is whole (params, MACs), else floats
    at CSV_DIGITS significant digits; None (no value, or no std of one seed) stays empty."""
    import pandas as pd

    present = [v for v in values if v is not None]
    if present and all(math.isfinite(v) and v == round(v) for v in present):
        return pd.Series([None if v is None else round(v) for v in values], dtype="Int64")
    return pd.Series([None if v is None else float(f"{v:.{CSV_DIGITS}g}") for v in values],
                     dtype=float)


def table_frame(rows: Sequence[Row]) -> "pd.DataFrame":
    """The configuration table as a DataFrame: one column per differing config key (or the
    label column `configuration` when none differs), n (finished seeds), runs, then
    `<column>_mean` and `<column>_std` of each statistic."""
    import pandas as pd

    keys = differing_keys([row.config for row in rows])
    cells = [_key_cells(row, keys, _csv_key_value) for row in rows]
    data: dict[str, Any] = {key: pd.Series([c[i] for c in cells], dtype=object)
                            for i, key in enumerate(keys or [CONFIGURATION])}
    data["n"] = [row.finished for row in rows]
    data["runs"] = [row.runs for row in rows]
    for col in table_columns(rows):
        for part in ("mean", "std"):
            data[f"{col.name}_{part}"] = _tidy([getattr(row.stats[col.name], part)
                                                for row in rows])
    return pd.DataFrame(data)


def table_csv(rows: Sequence[Row]) -> str:
    return table_frame(rows).to_csv(index=False, lineterminator="\n")


def failed_csv(failed: Sequence[FailedRun]) -> str:
    """failed.csv: run, one column per varying config key (as in table.csv), seed, status,
    step, reason; only the header when every run finished."""
    if not failed:
        return _csv((FAILED_HEADERS[0], CONFIGURATION, *FAILED_HEADERS[1:]), [])
    return _csv(_failed_headers(failed), (_failed_cells(f, _csv_key_value) for f in failed))


# -------------------------------------------------------------------------------- the command


def parse_config(overrides: Sequence[str]) -> CompareConfig:
    """`compare.KEY=VALUE` strings -> CompareConfig; ConfigError names the bad key."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(CompareConfig), OmegaConf.from_dotlist(
            [o.removeprefix("compare.") for o in overrides]))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = f"compare.{e.full_key}" if getattr(e, "full_key", None) else "compare"
        raise ConfigError(f"{key}: {str(getattr(e, 'msg', e)).splitlines()[0]}") from None
    validate(cfg)
    return cfg


def validate(cfg: CompareConfig) -> None:
    for key, value, valid in (("format", cfg.format, RENDERERS), ("metric", cfg.metric, METRICS),
                              ("yscale", cfg.yscale, YSCALES), ("select", cfg.select, SELECTIONS)):
        if value not in valid:
            raise ConfigError(f"compare.{key}: unknown '{value}'; valid choices: "
                              f"{', '.join(valid)}")
    if cfg.ylim is not None and (len(cfg.ylim) != 2 or not cfg.ylim[0] < cfg.ylim[1]):
        raise ConfigError(f"compare.ylim: expected [lo,hi] with lo < hi, got {cfg.ylim}")
    if cfg.yscale == "log" and cfg.ylim is not None and cfg.ylim[0] <= 0:
        raise ConfigError(f"compare.ylim: a log y-axis (compare.yscale=log) needs lo > 0, got "
                          f"{cfg.ylim}")
    if cfg.dpi <= 0:
        raise ConfigError(f"compare.dpi: must be positive, got {cfg.dpi}")


def output_dir(paths: Sequence[str], cfg: CompareConfig) -> Path:
    if cfg.output is not None:
        return Path(cfg.output)
    if len(paths) == 1 and Path(paths[0]).is_dir():
        return Path(paths[0]) / COMPARE_DIR
    return Path(COMPARE_DIR)


@dataclasses.dataclass(frozen=True)
class Comparison:
    configurations: list[Configuration]
    rows: list[Row]
    failed: list[FailedRun]
    curves: list[CurveSet]
    ylabel: str = METRICS["error"].axis_label
    # False for curves of compare.keys: no train/test line widths in the legend.
    line_styles: bool = True


def build(runs: Sequence[Run], cfg: CompareConfig) -> Comparison:
    """The pure part: runs -> everything the files show."""
    if cfg.panel_by is not None:
        check_panel_key(runs, cfg.panel_by)
    configurations = [SELECTIONS[cfg.select](c) for c in group_runs(runs)]
    tables = (configurations, table_rows(configurations), failed_runs(runs, configurations))
    if cfg.keys is None:
        return Comparison(*tables, configuration_curves(configurations, cfg.metric, cfg.panel_by),
                          METRICS[cfg.metric].axis_label)
    keys = matching_keys(runs, cfg.keys)
    if len(keys) > 1 and cfg.panel_by is not None:
        raise ConfigError(f"compare.keys matches {len(keys)} keys, drawn one panel per "
                          "configuration: compare.panel_by applies to a single key only")
    ylabel = common_prefix(keys).rstrip("/") if len(keys) > 1 else keys[0]
    return Comparison(*tables, key_curves(configurations, keys, cfg.panel_by),
                      ylabel or "value", line_styles=False)


# What `compare.format` prints.
RENDERERS: dict[str, Callable[[Comparison], str]] = {
    "markdown": lambda c: render_markdown(c.rows, c.failed),
    "csv": lambda c: table_csv(c.rows),
}


def write_outputs(comparison: Comparison, out_dir: Path, cfg: CompareConfig) -> list[Path]:
    """table.md, table.csv, failed.csv, (when a finished run logged curves) curves.png, and with
    compare.pareto pareto.md and pareto.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    texts = {TABLE_MD: render_markdown(comparison.rows, comparison.failed),
             TABLE_CSV: table_csv(comparison.rows), FAILED_CSV: failed_csv(comparison.failed)}
    written = []
    for name, text in texts.items():
        (out_dir / name).write_text(text)
        written.append(out_dir / name)
    if comparison.curves:
        written.append(plot_curves(
            comparison.curves, out_dir / CURVES, ylabel=comparison.ylabel, ylim=cfg.ylim,
            shade_std=cfg.shade_std, dpi=cfg.dpi, yscale=cfg.yscale,
            line_styles=comparison.line_styles))
    if cfg.pareto:
        written += write_pareto(comparison.rows, out_dir, cfg.dpi)
    return written


Extra = Callable[[Comparison, Path], tuple[str, list[Path]]]


def compare(paths: Sequence[str], cfg: CompareConfig,
            extras: Sequence[Extra] = ()) -> tuple[str, list[Path]]:
    """Load, compare and write; returns (what to print, the files written). Each
    `extra(comparison, out_dir)` adds outputs of a module built on this one (compare.versus:
    cnnlab/analysis/versus.py, compare.contrast: cnnlab/analysis/contrast.py)."""
    comparison = build(load_runs(paths), cfg)
    out_dir = output_dir(paths, cfg)
    try:
        written = write_outputs(comparison, out_dir, cfg)
    except OSError as e:  # e.g. a read-only sweep directory: compare.output=DIR elsewhere
        raise ConfigError(f"cannot write to {out_dir}: {e.strerror or e}; set "
                          "compare.output=DIR") from None
    text = RENDERERS[cfg.format](comparison)
    if cfg.pareto:
        text += "\n" + pareto_markdown(*pareto_points(comparison.rows))
    for extra in extras:
        extra_text, files = extra(comparison, out_dir)
        text += "\n" + extra_text
        written += files
    return text, written


# ------------------------------------------------------------- error against multiply-adds


@dataclasses.dataclass(frozen=True)
class ParetoPoint:
    """A configuration's mean error (%) and cost; `on_front`: no other configuration is at
    most as costly and as wrong, and better in one."""

    label: str
    macs: float
    params: float | None
    error: float
    on_front: bool


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points (cost, error) that no other point dominates, both minimized: j
    dominates i when cost_j <= cost_i and error_j <= error_i, one of them strictly. Equal points
    are all kept. Ordered by cost, then error."""
    front = [i for i, (x, y) in enumerate(points)
             if not any(x2 <= x and y2 <= y and (x2 < x or y2 < y) for x2, y2 in points)]
    return sorted(front, key=lambda i: points[i])


def pareto_points(rows: Sequence[Row]) -> tuple[str, list[ParetoPoint]]:
    """(the error column used, the points): the validation error when any configuration has
    one (what a search minimizes), else the test error; configurations without MACs (runs of
    older versions) or without that error are left out."""
    metric = ("final_val_error" if any(row.stats["final_val_error"].n for row in rows)
              else "final_test_error")
    usable = [row for row in rows
              if row.stats["macs"].mean is not None and row.stats[metric].mean is not None]
    front = set(pareto_front([(row.stats["macs"].mean, row.stats[metric].mean)
                              for row in usable]))
    return metric, [ParetoPoint(row.label, row.stats["macs"].mean, row.stats["params"].mean,
                                row.stats[metric].mean, i in front)
                    for i, row in enumerate(usable)]


def pareto_markdown(metric: str, points: Sequence[ParetoPoint]) -> str:
    """The points by cost, front first, as a markdown table."""
    header = [CONFIGURATION, "MACs", "params", next(c.header for c in COLUMNS if c.name == metric),
              "Pareto front"]
    ordered = sorted(points, key=lambda p: (not p.on_front, p.macs, p.error))
    cells = [[p.label, _count(p.macs), "" if p.params is None else _count(p.params),
              f"{p.error:.2f}", "yes" if p.on_front else ""] for p in ordered]
    table = _markdown(header, cells, [False, True, True, True, False])
    return f"## Error against multiply-adds (Pareto front first)\n\n{table}\n"


def write_pareto(rows: Sequence[Row], out_dir: Path, dpi: int = 150) -> list[Path]:
    metric, points = pareto_points(rows)
    (out_dir / PARETO_MD).write_text(pareto_markdown(metric, points))
    ylabel = next(c.header for c in COLUMNS if c.name == metric)
    return [out_dir / PARETO_MD, plot_pareto(
        [(p.label, p.macs, p.error, p.on_front) for p in points], out_dir / PARETO_PNG,
        ylabel=ylabel, dpi=dpi)]
