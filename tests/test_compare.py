"""cnnlab compare and cnnlab/analysis/plots.py on hand-written run directories (no training, no
JAX)."""

import csv
import dataclasses
import io
import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from cnnlab.analysis import compare as cmp
from cnnlab.analysis import curves, group, load, tables
from cnnlab.analysis.plots import (
    LEGEND_WIDTH,
    PANEL_SIZE,
    TEST_WIDTH,
    TRAIN_WIDTH,
    Curve,
    CurveSet,
    compact_count,
    curves_figure,
    lr_drops,
    mean_curve,
    plot_run,
)
from cnnlab.errors import ConfigError
from cnnlab.runs.rundir import RunDir
from tests.helpers import REPO, run_cli

STEPS = (10, 20, 30, 40)
EVAL_STEPS = (20, 40)
MODELS = {"plain20": False, "resnet20": True}
rng = np.random.default_rng(0)
# train/test error per (model, seed) and step: the numbers the assertions recompute.
ERRORS = {(model, seed): {"train": dict(zip(STEPS, rng.uniform(5, 60, 4), strict=True)),
                          "test": dict(zip(EVAL_STEPS, rng.uniform(8, 40, 2), strict=True))}
          for model in MODELS for seed in range(3)}
# plain20 seed 1 missed its step-30 event: curves use the steps all seeds logged.
ERRORS["plain20", 1]["train"].pop(30)


def config(model: str, seed: int, lr: float = 0.1, logger_mode: str = "offline") -> dict:
    # As Hydra saves it: interpolations unresolved.
    return {
        "model": {"name": f"{model[:-2]}${{.depth}}", "depth": 20, "residual": MODELS[model]},
        "dataset": {"name": "cifar10", "data_dir": "${oc.env:TFDS_DATA_DIR,null}"},
        "optimizer": {"name": "sgd", "lr": lr},
        "train": {"steps": 40, "batch_size": 128},
        "seed": seed,
        "logger": {"mode": logger_mode, "project": "cnnlab", "group": None},
        "checkpoint": {"enabled": True, "every": 20},
        "progress": True,
    }


def write_run(run_dir: Path, cfg: dict, overrides: list[str] | None,
              events: list[dict] | None = None, summary: dict | None = None) -> Path:
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    if overrides is not None:
        (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if events is not None:
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    if summary is not None:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return run_dir


def finished_run(run_dir: Path, model: str, seed: int, overrides: list[str] | None = None,
                 logger_mode: str = "offline") -> Path:
    errors = ERRORS[model, seed]
    events = []
    for step in STEPS:
        event = {"step": step, "lr": 0.1, "wall_time": step / 10}
        if step in errors["train"]:
            event.update({"train/error": errors["train"][step], "train/loss": 1.0})
        if step in errors["test"]:
            event.update({"test/error": errors["test"][step], "test/loss": 1.2})
        events.append(event)
    summary = {
        "status": "finished", "model": model, "dataset": "cifar10", "params": 272_474,
        "macs": 40_813_184, "steps": 40, "seed": seed, "final_step": 40,
        "wall_time": 30.0 + seed + 10 * MODELS[model], "images_per_sec": 900.0 - 7 * seed,
        "final/train/error": errors["train"][40], "final/train/loss": 1.0,
        "final/test/error": errors["test"][40], "final/test/loss": 1.2,
        "best/test/error": min(errors["test"].values()),
    }
    if overrides is None:
        overrides = [f"model={model}", f"seed={seed}"]
    return write_run(run_dir, config(model, seed, logger_mode=logger_mode), overrides, events,
                     summary)


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """A multirun: 2 models x 3 seeds, a diverged lr=1.0 job, a job that never trained."""
    root = tmp_path / "multirun" / "2026-01-01" / "12-00-00"
    root.mkdir(parents=True)
    (root / "multirun.yaml").write_text("hydra: {}\n")
    num = 0
    for model in MODELS:
        for seed in range(3):
            # Bookkeeping differs (logger.mode): still a seed of the same configuration.
            mode = "disabled" if seed == 2 else "offline"
            overrides = [f"model={model}", f"seed={seed}"] + (["logger.mode=disabled"]
                                                               if seed == 2 else [])
            finished_run(root / f"{num}_model={model},seed={seed}", model, seed, overrides, mode)
            num += 1
    write_run(root / "6_model=plain20,optimizer.lr=1.0,seed=0", config("plain20", 0, lr=1.0),
              ["model=plain20", "optimizer.lr=1.0", "seed=0"],
              [{"step": 10, "train/loss": 2.3, "train/error": 90.0},
               {"step": 20, "train/loss": "nan", "train/error": 90.0}],
              {"status": "diverged", "failure": "train/loss is nan at step 20",
               "model": "plain20", "seed": 0, "final_step": 20, "final/train/loss": "nan"})
    # Numbered 10 so that sorting by name alone would put it before 6.
    write_run(root / "10_model=resnet20,seed=3", config("resnet20", 3), ["model=resnet20",
                                                                        "seed=3"])
    (root / "compare").mkdir()  # output of an earlier compare: not a run
    return root


# ------------------------------------------------------------------------- loading, grouping


def test_load_finds_jobs_in_job_order(sweep):
    runs = load.load_runs([str(sweep)])
    assert [r.name for r in runs] == [
        "0_model=plain20,seed=0", "1_model=plain20,seed=1", "2_model=plain20,seed=2",
        "3_model=resnet20,seed=0", "4_model=resnet20,seed=1", "5_model=resnet20,seed=2",
        "6_model=plain20,optimizer.lr=1.0,seed=0", "10_model=resnet20,seed=3"]
    assert runs[0].config["model.name"] == "plain20"  # interpolation resolved
    assert [r.status for r in runs[-2:]] == ["diverged", "failed"]
    assert runs[-1].reason == load.NO_SUMMARY and runs[-1].seed == 3
    assert np.isnan(runs[-2].metrics[1]["train/loss"])  # "nan" strings read as floats


def test_grouping_and_labels(sweep):
    configurations = group.group_runs(load.load_runs([str(sweep)]))
    assert [c.label for c in configurations] == [
        "model=plain20", "model=resnet20", "model=plain20, optimizer.lr=1.0"]
    assert [[r.seed for r in c.runs] for c in configurations] == [[0, 1, 2], [0, 1, 2, 3], [0]]
    assert [len(c.finished) for c in configurations] == [3, 3, 0]
    assert "seed" not in configurations[0].config
    assert "logger.mode" not in configurations[0].config


def test_labels_fall_back_to_differing_config_keys(tmp_path):
    a = finished_run(tmp_path / "a", "plain20", 0)
    b = finished_run(tmp_path / "b", "resnet20", 0)
    for run_dir in (a, b):
        (run_dir / ".hydra" / "overrides.yaml").unlink()
    configurations = group.group_runs(load.load_runs([str(a), str(b)]))
    assert [c.label for c in configurations] == ["model.name=plain20, model.residual=false",
                                                 "model.name=resnet20, model.residual=true"]


def test_many_differing_keys_are_cut_to_the_fewest_that_tell_apart():
    base = {"model.name": "plain20", "model.depth": 20, "optimizer.lr": 0.1, "train.steps": 40}
    other = {"model.name": "resnet110", "model.depth": 110, "optimizer.lr": 0.01,
             "train.steps": 80, "model.new_key": 1}  # a key of a newer config version
    runs = [load.Run(str(i), str(i), {**cfg, "seed": 0}, None, {}, (), "finished")
            for i, cfg in enumerate((base, other))]
    assert [c.label for c in group.group_runs(runs)] == ["model.name=plain20, …",
                                                       "model.name=resnet110, …"]


def test_the_configuration_without_distinguishing_overrides_is_the_defaults(tmp_path):
    a = finished_run(tmp_path / "a", "resnet20", 0, overrides=[])
    b = finished_run(tmp_path / "b", "plain20", 0, overrides=["model=plain20"])
    assert [c.label for c in group.group_runs(load.load_runs([str(a), str(b)]))] == [
        "defaults", "model=plain20"]


def test_single_configuration_is_labelled_by_its_overrides(tmp_path):
    runs = [load.load_run(finished_run(tmp_path / str(s), "resnet20", s), str(s))
            for s in range(2)]
    assert [c.label for c in group.group_runs(runs)] == ["model=resnet20"]


def test_read_metrics_merges_steps_and_skips_a_cut_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 10, "train/error": 5.0}\n{"step": 10, "test/error": "inf"}\n'
                    '{"step": 20, "train/err')
    assert RunDir(tmp_path).read_metrics() == [
        {"step": 10, "train/error": 5.0, "test/error": np.inf}]


def test_missing_paths_and_empty_dirs_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file or directory"):
        load.load_runs([str(tmp_path / "nope")])
    with pytest.raises(ConfigError, match="no runs in"):
        load.load_runs([str(tmp_path)])
    with pytest.raises(ConfigError, match="at least one"):
        load.load_runs([])


# ----------------------------------------------------------------------------- aggregation


def test_table_is_mean_and_sample_std_over_finished_seeds(sweep):
    rows = tables.table_rows(group.group_runs(load.load_runs([str(sweep)])))
    assert [(r.finished, r.runs) for r in rows] == [(3, 3), (3, 4), (0, 1)]
    for row, model in zip(rows, MODELS, strict=False):
        for column, field in (("final_test_error", "test"), ("final_train_error", "train")):
            values = [ERRORS[model, s][field][40] for s in range(3)]
            stat = row.stats[column]
            assert stat.n == 3
            assert stat.mean == pytest.approx(np.mean(values), rel=1e-12)
            assert stat.std == pytest.approx(np.std(values, ddof=1), rel=1e-12)
        best = [min(ERRORS[model, s]["test"].values()) for s in range(3)]
        assert row.stats["best_test_error"].mean == pytest.approx(np.mean(best))
        assert row.stats["params"].mean == 272_474
    assert rows[2].stats["final_test_error"] == tables.Stat(None, None, 0)


def test_failed_table_lists_diverged_and_crashed_runs(sweep):
    runs = load.load_runs([str(sweep)])
    failed = tables.failed_runs(runs, group.group_runs(runs))
    assert [(f.run, f.label, f.seed, f.status, f.step, f.reason) for f in failed] == [
        ("6_model=plain20,optimizer.lr=1.0,seed=0", "model=plain20, optimizer.lr=1.0", 0,
         "diverged", 20, "train/loss is nan at step 20"),
        ("10_model=resnet20,seed=3", "model=resnet20", 3, "failed", None, load.NO_SUMMARY),
    ]


def test_a_running_or_killed_run_is_listed_at_its_last_logged_step(tmp_path):
    finished_run(tmp_path / "0_seed=0", "plain20", 0)
    write_run(tmp_path / "1_seed=1", config("plain20", 1), ["seed=1"],
              [{"step": 10, "train/error": 80.0}, {"step": 20, "train/error": 70.0}],
              {"status": "running", "model": "plain20", "seed": 1})
    runs = load.load_runs([str(tmp_path)])
    [failed] = tables.failed_runs(runs, group.group_runs(runs))
    assert (failed.run, failed.status, failed.step) == ("1_seed=1", "running", 20)


def test_status_reasons():
    assert load.run_status({"status": "diverged", "failure": "diverged: x"}) == (
        "diverged", "diverged: x")
    assert load.run_status({"status": "running"}) == ("running", load._RUNNING)
    assert load.run_status(None) == ("failed", load.NO_SUMMARY)


def test_curves_are_seed_means_at_common_steps(sweep):
    curve_sets = curves.configuration_curves(group.group_runs(load.load_runs([str(sweep)])))
    assert [cs.label for cs in curve_sets] == ["model=plain20", "model=resnet20"]  # no diverged
    plain, resnet = curve_sets
    assert plain.train.steps.tolist() == [10, 20, 40]  # seed 1 has no step 30
    assert resnet.train.steps.tolist() == [10, 20, 30, 40]
    assert plain.test.steps.tolist() == [20, 40]
    for cs, model in ((plain, "plain20"), (resnet, "resnet20")):
        for field, curve in (("train", cs.train), ("test", cs.test)):
            table = np.array([[ERRORS[model, s][field][t] for t in curve.steps.tolist()]
                              for s in range(3)])
            np.testing.assert_allclose(curve.mean, table.mean(axis=0))
            np.testing.assert_allclose(curve.std, table.std(axis=0, ddof=1))
            assert curve.n == 3


def test_mean_curve_leaves_out_runs_without_the_key():
    curve = mean_curve([[{"step": 1, "a": 2.0}, {"step": 2, "a": 4.0}], [{"step": 1}]], "a")
    assert curve.steps.tolist() == [1, 2] and curve.mean.tolist() == [2.0, 4.0]
    assert curve.n == 1 and curve.std.tolist() == [0.0, 0.0]
    assert mean_curve([[{"step": 1}]], "a") is None


# ------------------------------------------------------------------------------- rendering


def test_markdown_formats_mean_pm_std(sweep):
    rows = tables.table_rows(group.group_runs(load.load_runs([str(sweep)])))
    text = tables.render_markdown(rows, [])
    values = [ERRORS["plain20", s]["test"][40] for s in range(3)]
    assert f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}" in text
    # One column per differing config key, in config order, values as pandas prints them.
    assert text.splitlines()[2].startswith(
        "| model.name | model.residual | optimizer.lr | seeds | final test error (%) |")
    assert "| plain20 | False | 0.1 | 3/3 |" in text and "0.27M" in text and "40.81M" in text
    assert "| plain20 | False | 1.0 | 0/1 | - |" in text  # the diverged configuration
    assert "val error" not in text  # no validation split: no val columns
    assert text.rstrip().endswith("## Failed or incomplete runs\n\nnone")


def significant_digits(text: str) -> int:
    return len(text.lower().split("e")[0].lstrip("+-").replace(".", "").strip("0"))


def test_csv_parses_back_to_the_numbers(sweep):
    rows = tables.table_rows(group.group_runs(load.load_runs([str(sweep)])))
    text = tables.table_csv(rows)
    parsed = list(csv.DictReader(io.StringIO(text)))
    assert list(parsed[0])[:5] == ["model.name", "model.residual", "optimizer.lr", "n", "runs"]
    assert [(p["model.name"], p["model.residual"], p["optimizer.lr"]) for p in parsed] == [
        ("plain20", "False", "0.1"), ("resnet20", "True", "0.1"), ("plain20", "False", "1.0")]
    for p, row in zip(parsed, rows, strict=True):
        assert (int(p["n"]), int(p["runs"])) == (row.finished, row.runs)
        for name, stat in row.stats.items():
            for part in ("mean", "std"):
                if f"{name}_{part}" not in p:
                    continue
                value = getattr(stat, part)
                cell = p[f"{name}_{part}"]
                if value is None:
                    assert cell == ""
                else:
                    assert float(cell) == pytest.approx(value, rel=1e-5)
    assert parsed[0]["macs_mean"] == "40813184" and parsed[0]["params_std"] == "0"  # exact


def test_csv_cells_have_no_float_noise(sweep):
    rows = tables.table_rows(group.group_runs(load.load_runs([str(sweep)])))
    _, *records = csv.reader(io.StringIO(tables.table_csv(rows)))
    cells = [cell for record in records for cell in record[3:]]  # after the config keys
    floats_ = [c for c in cells if "." in c or "e" in c.lower()]
    assert floats_ and all(significant_digits(c) <= tables.CSV_DIGITS for c in floats_), floats_
    stats = {col.name: tables.mean_std([]) for col in tables.COLUMNS}
    stats["final_test_error"] = tables.mean_std([89.99, 89.98, 90.0])
    assert repr(stats["final_test_error"].mean) == "89.99000000000001"  # numpy's mean
    row = tables.Row("a", 3, 3, stats, {})
    assert tables.table_csv([row]).splitlines()[1].startswith("a,3,3,89.99,0.01,")


def test_tables_of_one_configuration_name_it_by_its_label(tmp_path):
    runs = [load.load_run(finished_run(tmp_path / str(s), "resnet20", s), str(s))
            for s in range(2)]
    rows = tables.table_rows(group.group_runs(runs))
    assert tables.table_csv(rows).startswith("configuration,n,runs,final_test_error_mean,")
    assert "| model=resnet20 | 2/2 |" in tables.markdown_table(rows)


def test_markdown_shows_the_fewest_distinguishing_keys_and_csv_all():
    configs = [{"model.name": f"m{i}", "model.depth": i, "optimizer.lr": 0.1 * i,
                "train.steps": 40 * i, "model.width": i} for i in (1, 2)]
    rows = [tables.Row(c["model.name"], 1, 1, {col.name: tables.mean_std([12.3456])
                                            for col in tables.COLUMNS}, c) for c in configs]
    header = tables.markdown_table(rows).splitlines()[0]
    assert header.startswith("| model.name | seeds | final test error (%) |")
    assert "| m1 | 1/1 | 12.35 |" in tables.markdown_table(rows)  # errors to 2 decimals
    assert list(tables.table_frame(rows).columns[:5]) == list(configs[0])


def test_figure_has_thin_train_bold_test_one_colour_per_configuration(sweep):
    curve_sets = curves.configuration_curves(group.group_runs(load.load_runs([str(sweep)])))
    fig = curves_figure(curve_sets)
    (ax,) = fig.axes
    lines = {line.get_gid(): line for line in ax.get_lines() if line.get_gid()}
    assert set(lines) == {f"{kind}:{label}" for kind in ("train", "test")
                          for label in ("model=plain20", "model=resnet20")}
    colors = {}
    for gid, line in lines.items():
        kind, label = gid.split(":", 1)
        assert line.get_linewidth() == (TRAIN_WIDTH if kind == "train" else TEST_WIDTH)
        colors.setdefault(label, set()).add(line.get_color())
    assert TEST_WIDTH > TRAIN_WIDTH
    assert all(len(c) == 1 for c in colors.values())  # train and test share the colour
    assert len({c.pop() for c in colors.values()}) == 2  # one colour per configuration
    np.testing.assert_allclose(lines["test:model=plain20"].get_ydata(), curve_sets[0].test.mean)
    assert ax.get_legend() is None  # one legend for the figure, outside the panels
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["model=plain20", "model=resnet20", "train", "test"]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("iterations", "error (%)")


def test_panel_by_makes_one_axis_per_value(sweep):
    cfg = cmp.CompareConfig(panel_by="model.residual", ylim=[0.0, 50.0])
    comparison = cmp.build(load.load_runs([str(sweep)]), cfg)
    fig = curves_figure(comparison.curves, ylim=cfg.ylim)
    assert [ax.get_title() for ax in fig.axes] == ["residual: False", "residual: True"]
    assert all(ax.get_ylim() == (0.0, 50.0) for ax in fig.axes)
    with pytest.raises(ConfigError, match="did you mean model.residual"):
        cmp.build(load.load_runs([str(sweep)]), cmp.CompareConfig(panel_by="model.residul"))


def drawn(fig):
    """Draw `fig` on an Agg canvas (layout, ticks and legend placed) and return its renderer."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def data_lines(ax):
    return [line for line in ax.get_lines() if str(line.get_gid()).startswith(("train:", "test:"))]


def curve(steps, values) -> Curve:
    return Curve(np.asarray(steps), np.asarray(values, dtype=float), np.zeros(len(steps)), 1)


# Data in every corner, the upper right (where the legend used to be pinned) included.
CORNERS = CurveSet("model=resnet20, optimizer.lr=0.1, with a long label to wrap",
                   curve(range(0, 1001, 50), np.linspace(90, 0, 21) % 91),
                   curve([0, 500, 1000], [5.0, 50.0, 95.0]))


@pytest.mark.parametrize("panels", [1, 3])
def test_legend_is_outside_every_panel_and_covers_no_data(panels):
    curve_sets = [dataclasses.replace(CORNERS, label=f"{CORNERS.label} {i}",
                                      panel=f"depth: {i}" if panels > 1 else None)
                  for i in range(panels)]
    fig = curves_figure(curve_sets)
    renderer = drawn(fig)
    (legend,) = fig.legends
    box = legend.get_window_extent(renderer)
    assert fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1 and box.y0 >= fig.bbox.y0  # all seen
    for ax in fig.axes:
        assert not box.overlaps(ax.get_window_extent(renderer))
        points = [point for line in data_lines(ax)
                  for point in ax.transData.transform(line.get_xydata())]
        assert points and not any(box.contains(x, y) for x, y in points)
    assert len(fig.axes) == panels


def test_few_points_get_markers_many_do_not():
    many = curve(range(0, 1000, 10), np.linspace(50, 5, 100))
    fig = curves_figure([CurveSet("a", many, curve([150, 300], [30.0, 20.0]))])
    lines = {line.get_gid(): line for line in data_lines(fig.axes[0])}
    assert lines["test:a"].get_marker() not in (None, "None", "", " ")
    assert lines["train:a"].get_marker() in (None, "None", "", " ")
    assert lines["test:a"].get_linewidth() <= 2


def test_iteration_ticks_are_integers_and_large_ones_compact():
    fig = curves_figure([CurveSet("a", curve([1, 2, 3, 4], [9.0, 8.0, 7.0, 6.0]), None)])
    drawn(fig)
    ax = fig.axes[0]
    lo, hi = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
    assert len(ticks) >= 3 and all(float(t).is_integer() for t in ticks), ticks
    fig = curves_figure([CurveSet("a", curve([0, 16000, 32000], [9.0, 8.0, 7.0]), None)])
    drawn(fig)
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert "32k" in labels and "0" in labels, labels
    assert [compact_count(v) for v in (500, 2500, 32000, 1.5e6)] == ["500", "2.5k", "32k",
                                                                      "1.5M"]


def test_values_spanning_decades_get_a_log_axis():
    loss = CurveSet("a", curve([10, 20, 30], [2.0, 1.0, 0.5]), curve([15, 30], [4000.0, 1.0]))
    assert curves_figure([loss], ylabel="loss").axes[0].get_yscale() == "log"
    error = CurveSet("a", curve([10, 20, 30], [60.0, 30.0, 5.0]), curve([15, 30], [40.0, 8.0]))
    assert curves_figure([error]).axes[0].get_yscale() == "linear"
    assert curves_figure([loss], yscale="linear").axes[0].get_yscale() == "linear"
    assert curves_figure([loss], ylim=[0, 10]).axes[0].get_yscale() == "linear"  # 0 shown


def test_compare_draws_losses_on_a_log_axis(sweep):
    finished_run(sweep / "7_model=plain20,train.steps=80", "plain20", 0, ["model=plain20",
                                                                           "train.steps=80"])
    metrics = sweep / "7_model=plain20,train.steps=80" / "metrics.jsonl"
    events = [json.loads(line) for line in metrics.read_text().splitlines()]
    events[1]["test/loss"] = 4000.0  # a blow-up it recovered from
    metrics.write_text("".join(json.dumps(e) + "\n" for e in events))
    cfg = cmp.CompareConfig(metric="loss")
    fig = curves_figure(cmp.build(load.load_runs([str(sweep)]), cfg).curves, ylabel="loss")
    assert fig.axes[0].get_yscale() == "log"


def sweep_of(tmp_path: Path, jobs: list[tuple[str, dict]]) -> Path:
    """A multirun of finished resnet20 runs, one per (override, config changes), in job order."""
    root = tmp_path / "sweep"
    for num, (override, changes) in enumerate(jobs):
        run_dir = finished_run(root / f"{num}_{override}", "resnet20", 0, [override])
        cfg = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
        for key, value in changes.items():
            section, name = key.split(".")
            cfg[section][name] = value
        (run_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    return root


def panel_titles(root: Path, key: str) -> list[str]:
    comparison = cmp.build(load.load_runs([str(root)]), cmp.CompareConfig(panel_by=key))
    return [ax.get_title() for ax in curves_figure(comparison.curves).axes]


def test_panels_sort_by_value_not_job_order(tmp_path):
    # ResNets ran first; the plain net's panel still comes first (False before True).
    root = sweep_of(tmp_path, [("model=resnet20", {}),
                               ("model=plain20", {"model.residual": False})])
    assert panel_titles(root, "model.residual") == ["residual: False", "residual: True"]
    # Numbers ascending (110 after 56, not before as text), strings alphabetically.
    root = sweep_of(tmp_path / "depth", [(f"model.depth={d}", {"model.depth": d})
                                         for d in (56, 110, 20)])
    assert panel_titles(root, "model.depth") == ["depth: 20", "depth: 56", "depth: 110"]
    root = sweep_of(tmp_path / "opt", [(f"optimizer.name={n}", {"optimizer.name": n})
                                       for n in ("sgd", "adam", "nesterov")])
    assert panel_titles(root, "optimizer.name") == [
        "optimizer: adam", "optimizer: nesterov", "optimizer: sgd"]


def test_readable_titles():
    assert [group.panel_title(k, v) for k, v in (
        ("model.residual", True), ("optimizer.lr", 0.01), ("norm.name", "batch"),
        ("activation.name", "relu"), ("train.batch_size", 256), ("model.widths", [16, 32]))
    ] == ["residual: True", "learning rate: 0.01", "normalization: batch", "activation: relu",
          "batch size: 256", "widths: [16,32]"]
    assert sorted([True, False], key=group.value_order) == [False, True]
    assert sorted(["b", 3, None, True, "a", 1.5], key=group.value_order) == [
        True, 1.5, 3, "a", "b", None]


def lr_history(lrs: dict[int, float]) -> list[dict]:
    return [{"step": step, "lr": lr} for step, lr in lrs.items()]


def test_lr_drops_are_falls_after_a_plateau():
    # Step schedule: 0.1 until step 50, 0.01 until 80, then 0.001 (logged every 10 steps).
    step = {s: 0.1 if s <= 50 else 0.01 if s <= 80 else 0.001 for s in range(10, 101, 10)}
    assert lr_drops(lr_history(step)) == (50, 80)
    # A cosine decay to 0 falls by large factors at its end, with no plateau: no drop.
    cosine = {s: 0.05 * (1 + np.cos(np.pi * s / 100)) for s in range(10, 101, 10)}
    assert lr_drops(lr_history(cosine)) == ()
    # Warm-up rises; reduce-on-plateau halves: one drop.
    assert lr_drops(lr_history({10: 0.01, 20: 0.1, 30: 0.1, 40: 0.05, 50: 0.05})) == (30,)
    assert lr_drops([{"step": 10}, {"step": 20, "lr": "nan"}]) == ()


def lr_drop_lines(ax) -> list[float]:
    return [line.get_xdata()[0] for line in ax.get_lines()
            if str(line.get_gid()).startswith("lr-drop:")]


def test_lr_drop_lines_at_the_configurations_drop_steps(tmp_path):
    root = sweep_of(tmp_path, [("optimizer.lr=0.1", {}), ("optimizer.lr=0.2",
                                                         {"optimizer.lr": 0.2})])
    for name, base, drop in (("0_optimizer.lr=0.1", 0.1, 20), ("1_optimizer.lr=0.2", 0.2, 30)):
        metrics = root / name / "metrics.jsonl"
        events = [json.loads(line) for line in metrics.read_text().splitlines()]
        events = [{**e, "lr": base if e["step"] <= drop else base / 10} for e in events]
        metrics.write_text("".join(json.dumps(e) + "\n" for e in events))
    comparison = cmp.build(load.load_runs([str(root)]), cmp.CompareConfig())
    assert [cs.lr_drops for cs in comparison.curves] == [(20,), (30,)]
    (ax,) = curves_figure(comparison.curves).axes
    assert lr_drop_lines(ax) == [20, 30]
    line = next(line for line in ax.get_lines() if line.get_gid() == "lr-drop:20")
    assert line.get_linewidth() <= TRAIN_WIDTH and line.get_zorder() == 0  # faint, behind
    # With panels, each panel shows the drops of its own configurations.
    comparison = cmp.build(load.load_runs([str(root)]),
                           cmp.CompareConfig(panel_by="optimizer.lr"))
    assert [lr_drop_lines(ax) for ax in curves_figure(comparison.curves).axes] == [[20], [30]]


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_compare_writes_tables_and_png(sweep):
    text, written = cmp.compare([str(sweep)], cmp.CompareConfig(metric="loss", shade_std=True))
    out = sweep / "compare"
    assert sorted(p.name for p in written) == ["curves.png", "failed.csv", "table.csv",
                                               "table.md"]
    assert all(p.parent == out for p in written)
    assert text == (out / "table.md").read_text()
    width, height = png_size(out / "curves.png")
    assert (width, height) == ((PANEL_SIZE[0] + LEGEND_WIDTH) * 150, 675)  # at 150 dpi
    assert (out / "curves.png").stat().st_size > 10_000
    failed = list(csv.DictReader((out / "failed.csv").open()))
    assert [(f["status"], f["step"]) for f in failed] == [("diverged", "20"), ("failed", "")]
    # One column per key that varies across the configurations, as in table.csv: no label.
    header = next(csv.reader((out / "table.csv").open()))
    table_keys = header[:header.index("n")]
    assert {"model.name", "optimizer.lr"} <= set(table_keys)
    assert list(failed[0])[:len(table_keys) + 2] == ["run", *table_keys, "seed"]
    assert [(f["model.name"], f["optimizer.lr"], f["seed"]) for f in failed] == [
        ("plain20", "1.0", "0"), ("resnet20", "0.1", "3")]
    assert re.search(r"\| run +\| model\.name +\|", text)


def test_plot_run(tmp_path):
    run_dir = finished_run(tmp_path / "run", "resnet20", 0)
    assert plot_run(run_dir, tmp_path / "curves.png") == tmp_path / "curves.png"
    assert png_size(tmp_path / "curves.png") == ((PANEL_SIZE[0] + LEGEND_WIDTH) * 150, 675)
    empty = write_run(tmp_path / "empty", config("resnet20", 0), None, [{"step": 10}])
    assert plot_run(empty, tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_plot_run_does_not_import_jax(tmp_path):
    run_dir = finished_run(tmp_path / "run", "resnet20", 0)
    code = (
        "import sys\nfrom pathlib import Path\nfrom cnnlab.analysis.plots import plot_run\n"
        f"plot_run(Path({str(run_dir)!r}), Path({str(tmp_path)!r}) / 'c.png')\n"
        "assert 'jax' not in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "c.png").exists()


# --------------------------------------------------------------------------------- options


@pytest.mark.parametrize(("overrides", "message"), [
    (["compare.colour=red"], "compare.colour: Key 'colour' not in 'CompareConfig'"),
    (["compare.shade_std=maybe"], "compare.shade_std:"),
    (["compare.format=html"], "compare.format: unknown 'html'; valid choices: markdown, csv"),
    (["compare.metric=accuracy"], "compare.metric: unknown 'accuracy'"),
    (["compare.ylim=[5,1]"], "compare.ylim: expected [lo,hi]"),
    (["compare.yscale=symlog"], "compare.yscale: unknown 'symlog'; valid choices: auto, linear"),
    (["compare.yscale=log", "compare.ylim=[0,20]"], "compare.ylim: a log y-axis"),
])
def test_parse_config_errors(overrides, message):
    with pytest.raises(ConfigError) as info:
        cmp.parse_config(overrides)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_parse_config():
    cfg = cmp.parse_config(["compare.ylim=[0,20]", "compare.panel_by=model.residual"])
    assert (cfg.ylim, cfg.panel_by, cfg.format) == ([0.0, 20.0], "model.residual", "markdown")


def test_output_dir():
    cfg = cmp.CompareConfig()
    assert cmp.output_dir([str(REPO / "cnnlab")], cfg) == REPO / "cnnlab" / "compare"
    assert cmp.output_dir(["a", "b"], cfg) == Path("compare")
    assert cmp.output_dir(["x"], cmp.CompareConfig(output="o")) == Path("o")


# ------------------------------------------------------------------------------------ W&B


class FakeWandbRun:
    id, name, state = "abc123", "plain20-s0", "crashed"
    config = config("plain20", 0)
    summary_metrics = {"_runtime": 3, "model": "plain20", "final_step": 20}

    def scan_history(self):
        return [{"_step": 10, "_runtime": 1, "train/error": 50.0, "test/error": None},
                {"_step": 20, "train/loss": "NaN"}]


def test_wandb_runs_map_onto_run_records():
    run = load._wandb_run(FakeWandbRun(), "me/cnnlab")
    assert (run.name, run.source, run.status) == ("plain20-s0", "wandb:me/cnnlab/abc123",
                                                  "failed")
    assert run.metrics[0] == {"step": 10, "train/error": 50.0}
    assert np.isnan(run.metrics[1]["train/loss"])
    assert run.config["optimizer.lr"] == 0.1 and run.overrides is None


def test_wandb_without_api_key_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path))
    with pytest.raises(ConfigError, match="^cannot read W&B group me/cnnlab/g1: ") as info:
        load.load_runs(["wandb:me/cnnlab/g1"])
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="expected wandb:ENTITY/PROJECT/GROUP"):
        load.load_runs(["wandb:me/cnnlab"])


# ------------------------------------------------------------------------------------ CLI


def test_cli_compare_writes_files_and_prints_tables(sweep):
    result = run_cli(["compare", str(sweep), "compare.panel_by=model.residual"],
                     cwd=sweep.parent, fresh_process=True)
    assert result.returncode == 0, result.stderr
    out = sweep / "compare"
    assert result.stdout == (out / "table.md").read_text()
    assert "## Failed or incomplete runs" in result.stdout
    assert "| 6_model=plain20,optimizer.lr=1.0,seed=0 |" in result.stdout
    assert png_size(out / "curves.png") == ((2 * PANEL_SIZE[0] + LEGEND_WIDTH) * 150, 675)
    assert (out / "table.csv").exists() and (out / "failed.csv").exists()


def test_cli_compare_csv_of_run_dirs(sweep, tmp_path):
    # Job folders hold '=': existing directories are paths, not overrides.
    jobs = [str(sweep / "0_model=plain20,seed=0"), str(sweep / "3_model=resnet20,seed=0")]
    result = run_cli(["compare", *jobs, "compare.format=csv"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == (tmp_path / "compare" / "table.csv").read_text()
    assert [(r["model.name"], r["model.residual"])
            for r in csv.DictReader(io.StringIO(result.stdout))] == [
        ("plain20", "False"), ("resnet20", "True")]


@pytest.mark.parametrize(("args", "expected"), [
    (["missing_dir"], "missing_dir: no such file or directory"),
    (["{sweep}", "compare.colour=red"], "compare.colour: Key 'colour' not in"),
    (["{sweep}", "compare.dpi=high"], "compare.dpi: Value 'high' of type 'str' could not be"),
    (["{sweep}", "seed=1"], "compare takes compare.* overrides only"),
    ([], "compare needs at least one"),
    (["{sweep}", "compare.output={sweep}/multirun.yaml/out"], "cannot write to"),
])
def test_cli_compare_bad_input(sweep, args, expected):
    result = run_cli(["compare", *(a.format(sweep=sweep) for a in args)], cwd=sweep.parent)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"cnnlab: error: {expected}"), result.stderr
    assert not (sweep / "compare" / "table.md").exists()


# ------------------------------------------------------------------------------ compare.keys

LAYERS = ("stem", "stage1_block1.conv1", "head")


def diag_run(run_dir: Path, model: str, seed: int, every: int | None) -> Path:
    """A finished run that logged per-layer gradient norms: layer i of seed s at step t is
    (i + 1) * t * (1 + s) (plain) or that over 10 (ResNet)."""
    scale = 0.1 if MODELS[model] else 1.0
    events = [{"step": t, "train/error": 50.0, **{
        f"diag/grad_norm/{layer}": (i + 1) * t * (1 + seed) * scale
        for i, layer in enumerate(LAYERS)}} for t in STEPS]
    cfg = {**config(model, seed), "diagnostics": {"every": every}}
    return write_run(run_dir, cfg, [f"model={model}", f"seed={seed}"], events,
                     {"status": "finished", "seed": seed, "final_step": 40})


@pytest.fixture
def diag_runs(tmp_path: Path) -> Path:
    root = tmp_path / "diag"
    for num, (model, seed) in enumerate([("plain20", 0), ("plain20", 1), ("resnet20", 0)]):
        # diagnostics.every is bookkeeping: the two plain seeds are one configuration.
        diag_run(root / f"{num}_{model}_{seed}", model, seed, every=10 if seed else 5)
    return root


def test_keys_draw_each_layer_in_one_panel_per_configuration(diag_runs):
    cfg = cmp.parse_config(["compare.keys=[diag/grad_norm/*]"])
    assert cfg.keys == ["diag/grad_norm/*"]
    comparison = cmp.build(load.load_runs([str(diag_runs)]), cfg)
    assert comparison.ylabel == "diag/grad_norm" and not comparison.line_styles
    fig = curves_figure(comparison.curves, ylabel=comparison.ylabel,
                        line_styles=comparison.line_styles)
    assert [ax.get_title() for ax in fig.axes] == ["model=plain20", "model=resnet20"]
    for ax, scale in zip(fig.axes, (1.0, 0.1), strict=True):
        lines = {line.get_gid(): line for line in ax.get_lines() if line.get_gid()}
        assert set(lines) == {f"train:{layer}" for layer in LAYERS}
        for i, layer in enumerate(LAYERS):
            # plain20: the mean over seeds 0 and 1 of (i + 1) * t * (1 + s).
            seeds = 1.5 if scale == 1.0 else 1.0
            np.testing.assert_allclose(lines[f"train:{layer}"].get_ydata(),
                                       [(i + 1) * t * seeds * scale for t in STEPS])
    colours = [{line.get_gid(): line.get_color() for line in ax.get_lines()} for ax in fig.axes]
    assert colours[0] == colours[1]  # a layer has one colour in every panel
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == list(LAYERS)  # no train/test entries
    assert fig.axes[0].get_ylabel() == "diag/grad_norm"


def test_one_key_is_one_line_per_configuration_and_bad_keys_are_refused(diag_runs):
    runs = load.load_runs([str(diag_runs)])
    comparison = cmp.build(runs, cmp.CompareConfig(keys=["diag/grad_norm/head"],
                                                   panel_by="model.residual"))
    assert [(cs.label, cs.panel) for cs in comparison.curves] == [
        ("model=plain20", "residual: False"), ("model=resnet20", "residual: True")]
    assert comparison.curves[0].test is None and comparison.ylabel == "diag/grad_norm/head"
    with pytest.raises(ConfigError, match="no finished run logged a key matching diag/grad"):
        cmp.build(runs, cmp.CompareConfig(keys=["diag/grad/*"]))
    with pytest.raises(ConfigError, match="panel_by applies to a single key"):
        cmp.build(runs, cmp.CompareConfig(keys=["diag/*"], panel_by="model.residual"))
    # Without compare.keys, the error curves as always.
    assert cmp.build(runs, cmp.CompareConfig()).ylabel == "error (%)"


def test_the_kept_study_runs_are_finished_and_compare_draws_from_them(tmp_path):
    # experiments/results/resnet_vs_plain_2000/ holds the logs docs/studies.md's table comes
    # from: only finished runs of 2,000 steps, whose summaries agree with their own logs.
    kept = REPO / "experiments" / "results" / "resnet_vs_plain_2000"
    runs = load.load_runs([str(kept)])
    assert runs and all(run.finished for run in runs)
    for run in runs:
        assert run.summary["final_step"] == run.config["train.steps"] == 2000
        last_test = [e["test/error"] for e in run.metrics if "test/error" in e][-1]
        assert run.summary["final/test/error"] == pytest.approx(last_test)
        assert run.name == f"{run.config['model.name']}_seed{run.seed}"
    cfg = cmp.parse_config([f"output={tmp_path}"])
    text, _ = cmp.compare([str(kept)], cfg)
    assert text.count("| 1/1 |") + text.count("| 2/2 |") + text.count("| 3/3 |") == len(
        {run.config["model.name"] for run in runs})
