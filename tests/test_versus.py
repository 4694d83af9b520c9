"""`compare.versus`: the final test error against a config key (cnnlab/analysis/versus.py)."""

import pytest

from cnnlab.analysis.tables import Row, Stat, mean_std
from cnnlab.analysis.versus import versus_figure, versus_markdown, versus_series, write_versus
from cnnlab.errors import ConfigError


def _row(mode, k, per_class, errors, source="A"):
    config = {"transfer.mode": mode, "transfer.load_through": k, "transfer.source": source,
              "dataset.per_class": per_class, "model.name": "resnet20"}
    stats = {"final_test_error": mean_std(errors)}
    return Row(f"{mode} {k}", len(errors), len(errors), stats, config)


ROWS = [
    _row("finetune_top", "stage2", 100, [20.0, 22.0]),
    _row("finetune_top", "stem", 100, [10.0, 12.0]),
    _row("finetune_all", "stem", 100, [9.0, 9.0]),
    _row("finetune_all", "stage2", 100, [8.0]),
    _row("scratch", None, 100, [15.0, 17.0], source=None),
    _row("finetune_top", "stem", 10, [30.0]),
    _row("scratch", None, 10, [40.0], source=None),
    Row("never finished", 0, 2, {"final_test_error": Stat(None, None, 0)},
        {"transfer.mode": "finetune_all", "transfer.load_through": "stage9",
         "dataset.per_class": 100}),
]


def test_series_are_lines_per_other_setting_and_references_without_the_key():
    series = versus_series(ROWS, "transfer.load_through", "dataset.per_class")
    by = {(s.panel, s.label): s for s in series}
    top = by[(100, "mode=finetune_top")]
    # x in order of first appearance among the lines (stage2 came first), means and stds.
    assert [(p.x, p.mean) for p in top.points] == [("stage2", 21.0), ("stem", 11.0)]
    assert [p.std for p in top.points] == [pytest.approx(2 ** 0.5)] * 2
    assert [p.x for p in by[(100, "mode=finetune_all")].points] == ["stage2", "stem"]
    reference = by[(100, "mode=scratch")]
    assert reference.reference and reference.points[0].mean == 16.0
    assert by[(10, "mode=scratch")].points[0].mean == 40.0
    # The unfinished configuration (no mean) is no point at all.
    assert all(p.x != "stage9" for s in series for p in s.points)


def test_markdown_and_figure(tmp_path):
    text, files = write_versus(ROWS, "transfer.load_through", "dataset.per_class", tmp_path)
    assert "| 100 | mode=finetune_top | 21.00 ± 1.41 | 11.00 ± 1.41 |  |" in text
    assert "| 10 | mode=scratch |  |  | 40.00 |" in text
    assert [f.name for f in files] == ["versus.md", "versus.png"]
    assert files[1].stat().st_size > 10_000
    fig = versus_figure(versus_series(ROWS, "transfer.load_through", "dataset.per_class"),
                        "transfer.load_through", "dataset.per_class")
    assert [ax.get_title() for ax in fig.axes] == ["per class: 10", "per class: 100"]
    assert [t.get_text() for t in fig.axes[1].get_xticklabels()] == ["stage2", "stem"]
    assert versus_markdown(versus_series(ROWS, "transfer.load_through"), "transfer.load_through",
                           None).count("\n|") >= 4


def test_an_unknown_key_is_a_one_line_error():
    with pytest.raises(ConfigError, match=r"compare.versus=optimizer.lr: no compared run sets "
                                          r"it; keys that differ here: transfer.mode"):
        versus_series(ROWS, "optimizer.lr")
