"""Curves: each configuration's mean training curves over its finished seeds, for plots.py.

`compare.metric` gives train and test error or loss, one curve set per configuration;
`compare.keys` gives any logged keys, matched by glob. `compare.panel_by` splits them into panels.
"""

import dataclasses
import difflib
import fnmatch
import os
from collections.abc import Sequence
from typing import Any

from cnnlab.analysis.group import Configuration, panel_title, value_order
from cnnlab.analysis.load import Run
from cnnlab.analysis.plots import CurveSet, lr_drops, mean_curve
from cnnlab.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Metric:
    """The logged keys a curve set draws, and the y-axis label."""

    train: str
    test: str | None  # None: a logged key of its own (compare.keys), drawn as a train curve
    axis_label: str


METRICS: dict[str, Metric] = {
    "error": Metric("train/error", "test/error", "error (%)"),
    "loss": Metric("train/loss", "test/loss", "loss"),
}


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
