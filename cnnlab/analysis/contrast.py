"""`cnnlab compare ... compare.contrast=KEY`: does KEY change the final error beyond seed noise?

A study's reading ("shortcuts lower the 56-layer net's error") is a claim about a difference of
means over seeds. For each group of configurations that differ in KEY and nothing else that
matters, each value of KEY is set against the first (in value order: False before True, numbers
ascending) with Welch's t-test from the seeds' means, sample stds and counts, for the final test
and train error (and val error where there is one). Keys that the others determine are not
grouped by: `model.name` (plain56, resnet56) follows from `model.depth` and `model.residual`, so
`compare.contrast=model.residual` pairs plain56 with resnet56 at each depth. Writes contrast.md.

p < 0.05 reads "yes"; "no" means the seeds do not show a difference, not that there is none:
with 3 seeds a t-test sees only large effects. Fewer than 2 finished seeds on a side: no test.
"""

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cnnlab.analysis.group import differing_keys, display_value, readable_key, value_order
from cnnlab.analysis.tables import COLUMNS, Row, Stat
from cnnlab.errors import ConfigError

CONTRAST_MD = "contrast.md"
ALPHA = 0.05
# The columns tested, in table order: (Row.stats name, the table's header for it).
METRICS = tuple((col.name, col.header) for col in COLUMNS
                if col.name in ("final_test_error", "final_train_error", "final_val_error"))


@dataclasses.dataclass(frozen=True)
class Contrast:
    """One metric of one value of KEY against the reference value, within one group."""

    group: tuple[tuple[str, Any], ...]  # (key, value) of the keys the group is defined by
    metric: str  # a METRICS table name
    reference: Any
    value: Any
    reference_stat: Stat
    stat: Stat
    p: float | None  # Welch's two-sided p; None: not testable (too few seeds)

    @property
    def delta(self) -> float | None:
        if self.stat.mean is None or self.reference_stat.mean is None:
            return None
        return self.stat.mean - self.reference_stat.mean

    @property
    def verdict(self) -> str:
        if self.p is None:
            return "untested (fewer than 2 seeds)"
        return "yes" if self.p < ALPHA else "no"


def welch_p(a: Stat, b: Stat) -> float | None:
    """Welch's two-sided t-test p from two samples' means, sample stds and counts."""
    if a.n < 2 or b.n < 2 or a.mean is None or b.mean is None:
        return None
    if not (a.std or b.std):  # both spreads zero: equal means, no difference; else a certain one
        return 1.0 if a.mean == b.mean else 0.0
    from scipy import stats

    return float(stats.ttest_ind_from_stats(a.mean, a.std, a.n, b.mean, b.std, b.n,
                                            equal_var=False).pvalue)


def _determined(key: str, by: Sequence[str], configs: Sequence[dict[str, Any]]) -> bool:
    """Whether `key`'s value follows from the values of `by` in every config."""
    seen: dict[tuple, str] = {}
    for config in configs:
        given = tuple(display_value(config.get(k)) for k in by)
        if seen.setdefault(given, display_value(config.get(key))) != display_value(
                config.get(key)):
            return False
    return True


def group_keys(rows: Sequence[Row], key: str) -> list[str]:
    """The differing keys other than `key` that define the groups: every one the others do not
    determine. Names (`*.name`) are dropped first, then later keys before earlier ones, so of
    `model.name`, `model.depth` and `model.scan_blocks` (which follows depth) only depth stays."""
    configs = [row.config for row in rows]
    keys = [k for k in differing_keys(configs) if k != key]
    for candidate in sorted(reversed(keys), key=lambda k: not k.endswith(".name")):
        rest = [k for k in keys if k != candidate]
        if _determined(candidate, [key, *rest], configs):
            keys = rest
    return keys


def check_key(rows: Sequence[Row], key: str) -> None:
    if len({display_value(row.config.get(key)) for row in rows}) < 2:
        known = ", ".join(differing_keys([row.config for row in rows])[:8])
        raise ConfigError(f"compare.contrast={key}: the compared runs do not differ in it; "
                          f"keys that differ here: {known or 'none'}")


def contrasts(rows: Sequence[Row], key: str) -> list[Contrast]:
    """Every value of `key` against the group's first, per group and metric (module doc)."""
    check_key(rows, key)
    keys = group_keys(rows, key)
    groups: dict[tuple, list[Row]] = {}
    for row in rows:
        group = tuple((k, row.config.get(k)) for k in keys)
        groups.setdefault(tuple((k, display_value(v)) for k, v in group), []).append(row)
    found = []
    for members in groups.values():
        members.sort(key=lambda row: value_order(row.config.get(key)))
        reference, others = members[0], members[1:]
        group = tuple((k, reference.config.get(k)) for k in keys)
        for name, metric in METRICS:
            if not any(row.stats.get(name, Stat(None, None, 0)).n for row in members):
                continue
            for row in others:
                a, b = reference.stats[name], row.stats[name]
                found.append(Contrast(group, metric, reference.config.get(key),
                                      row.config.get(key), a, b, welch_p(a, b)))
    return sorted(found, key=lambda c: [value_order(v) for _, v in c.group])


def _cell(stat: Stat) -> str:
    if stat.mean is None:
        return "-"
    spread = "" if stat.std is None else f" ± {stat.std:.2f}"
    return f"{stat.mean:.2f}{spread} (n={stat.n})"


def _p(p: float | None) -> str:
    if p is None or math.isnan(p):
        return "-"
    return f"{p:.3g}"  # three digits: 0.0497 must not read as 0.050 beside a "yes"


def contrast_markdown(found: Sequence[Contrast], key: str) -> str:
    name = readable_key(key)
    group_names = [readable_key(k) for k, _ in found[0].group] if found else []
    header = [*group_names, "metric", f"{name} (reference)", name, "Δ (mean)", "Welch p",
              f"beyond seed noise (p < {ALPHA})"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for c in found:
        delta = "-" if c.delta is None else f"{c.delta:+.2f}"
        cells = [*(display_value(v) for _, v in c.group), c.metric,
                 f"{display_value(c.reference)}: {_cell(c.reference_stat)}",
                 f"{display_value(c.value)}: {_cell(c.stat)}", delta, _p(c.p), c.verdict]
        lines.append("| " + " | ".join(cells) + " |")
    return (f"## Does {name} change the final error? Welch's t-test over seeds\n\n"
            + "\n".join(lines) + "\n")


def write_contrast(rows: Sequence[Row], key: str, out_dir: Path) -> tuple[str, list[Path]]:
    """contrast.md in `out_dir`; returns (the markdown, the files)."""
    text = contrast_markdown(contrasts(rows, key), key)
    (out_dir / CONTRAST_MD).write_text(text)
    return text, [out_dir / CONTRAST_MD]
