"""cnnlab compare and cnnlab/plots.py on hand-written run directories (no training, no JAX)."""

import csv
import io
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from cnnlab import compare as cmp
from cnnlab.errors import ConfigError
from cnnlab.plots import TEST_WIDTH, TRAIN_WIDTH, curves_figure, mean_curve, plot_run
from cnnlab.rundir import RunDir
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
    runs = cmp.load_runs([str(sweep)])
    assert [r.name for r in runs] == [
        "0_model=plain20,seed=0", "1_model=plain20,seed=1", "2_model=plain20,seed=2",
        "3_model=resnet20,seed=0", "4_model=resnet20,seed=1", "5_model=resnet20,seed=2",
        "6_model=plain20,optimizer.lr=1.0,seed=0", "10_model=resnet20,seed=3"]
    assert runs[0].config["model.name"] == "plain20"  # interpolation resolved
    assert [r.status for r in runs[-2:]] == ["diverged", "failed"]
    assert runs[-1].reason == cmp.NO_SUMMARY and runs[-1].seed == 3
    assert np.isnan(runs[-2].metrics[1]["train/loss"])  # "nan" strings read as floats


def test_grouping_and_labels(sweep):
    configurations = cmp.group_runs(cmp.load_runs([str(sweep)]))
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
    configurations = cmp.group_runs(cmp.load_runs([str(a), str(b)]))
    assert [c.label for c in configurations] == ["model.name=plain20, model.residual=false",
                                                 "model.name=resnet20, model.residual=true"]


def test_many_differing_keys_are_cut_to_the_fewest_that_tell_apart():
    base = {"model.name": "plain20", "model.depth": 20, "optimizer.lr": 0.1, "train.steps": 40}
    other = {"model.name": "resnet110", "model.depth": 110, "optimizer.lr": 0.01,
             "train.steps": 80, "model.new_key": 1}  # a key of a newer config version
    runs = [cmp.Run(str(i), str(i), {**cfg, "seed": 0}, None, {}, (), "finished")
            for i, cfg in enumerate((base, other))]
    assert [c.label for c in cmp.group_runs(runs)] == ["model.name=plain20, …",
                                                       "model.name=resnet110, …"]


def test_the_configuration_without_distinguishing_overrides_is_the_defaults(tmp_path):
    a = finished_run(tmp_path / "a", "resnet20", 0, overrides=[])
    b = finished_run(tmp_path / "b", "plain20", 0, overrides=["model=plain20"])
    assert [c.label for c in cmp.group_runs(cmp.load_runs([str(a), str(b)]))] == [
        "defaults", "model=plain20"]


def test_single_configuration_is_labelled_by_its_overrides(tmp_path):
    runs = [cmp.load_run(finished_run(tmp_path / str(s), "resnet20", s), str(s))
            for s in range(2)]
    assert [c.label for c in cmp.group_runs(runs)] == ["model=resnet20"]


def test_read_metrics_merges_steps_and_skips_a_cut_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 10, "train/error": 5.0}\n{"step": 10, "test/error": "inf"}\n'
                    '{"step": 20, "train/err')
    assert RunDir(tmp_path).read_metrics() == [
        {"step": 10, "train/error": 5.0, "test/error": np.inf}]


def test_missing_paths_and_empty_dirs_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file or directory"):
        cmp.load_runs([str(tmp_path / "nope")])
    with pytest.raises(ConfigError, match="no runs in"):
        cmp.load_runs([str(tmp_path)])
    with pytest.raises(ConfigError, match="at least one"):
        cmp.load_runs([])


# ----------------------------------------------------------------------------- aggregation


def test_table_is_mean_and_sample_std_over_finished_seeds(sweep):
    rows = cmp.table_rows(cmp.group_runs(cmp.load_runs([str(sweep)])))
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
    assert rows[2].stats["final_test_error"] == cmp.Stat(None, None, 0)


def test_failed_table_lists_diverged_and_crashed_runs(sweep):
    runs = cmp.load_runs([str(sweep)])
    failed = cmp.failed_runs(runs, cmp.group_runs(runs))
    assert [(f.run, f.label, f.seed, f.status, f.step, f.reason) for f in failed] == [
        ("6_model=plain20,optimizer.lr=1.0,seed=0", "model=plain20, optimizer.lr=1.0", 0,
         "diverged", 20, "train/loss is nan at step 20"),
        ("10_model=resnet20,seed=3", "model=resnet20", 3, "failed", None, cmp.NO_SUMMARY),
    ]


def test_status_reasons():
    assert cmp.run_status({"status": "diverged", "failure": "diverged: x"}) == (
        "diverged", "diverged: x")
    assert cmp.run_status({"status": "running"}) == ("running", cmp._RUNNING)
    assert cmp.run_status(None) == ("failed", cmp.NO_SUMMARY)


def test_curves_are_seed_means_at_common_steps(sweep):
    curve_sets = cmp.configuration_curves(cmp.group_runs(cmp.load_runs([str(sweep)])))
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
    rows = cmp.table_rows(cmp.group_runs(cmp.load_runs([str(sweep)])))
    text = cmp.render_markdown(rows, [])
    values = [ERRORS["plain20", s]["test"][40] for s in range(3)]
    assert f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}" in text
    assert "| model=plain20 | 3/3 |" in text and "0.27M" in text and "40.81M" in text
    assert "val error" not in text  # no validation split: no val columns
    assert text.rstrip().endswith("## Failed or incomplete runs\n\nnone")


def test_csv_parses_back_to_the_numbers(sweep):
    rows = cmp.table_rows(cmp.group_runs(cmp.load_runs([str(sweep)])))
    parsed = list(csv.DictReader(io.StringIO(cmp.table_csv(rows))))
    assert [p["configuration"] for p in parsed] == [r.label for r in rows]
    for p, row in zip(parsed, rows, strict=True):
        assert (int(p["n"]), int(p["runs"])) == (row.finished, row.runs)
        for name, stat in row.stats.items():
            if f"{name}_mean" in p:
                assert p[f"{name}_mean"] == ("" if stat.mean is None else repr(stat.mean))
                assert (float(p[f"{name}_std"]) if p[f"{name}_std"] else None) == stat.std


def test_figure_has_thin_train_bold_test_one_colour_per_configuration(sweep):
    curve_sets = cmp.configuration_curves(cmp.group_runs(cmp.load_runs([str(sweep)])))
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
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["model=plain20", "model=resnet20", "train", "test"]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("iterations", "error (%)")


def test_panel_by_makes_one_axis_per_value(sweep):
    cfg = cmp.CompareConfig(panel_by="model.residual", ylim=[0.0, 50.0])
    comparison = cmp.build(cmp.load_runs([str(sweep)]), cfg)
    fig = curves_figure(comparison.curves, ylim=cfg.ylim)
    assert [ax.get_title() for ax in fig.axes] == ["model.residual=false",
                                                   "model.residual=true"]
    assert all(ax.get_ylim() == (0.0, 50.0) for ax in fig.axes)
    with pytest.raises(ConfigError, match="did you mean model.residual"):
        cmp.build(cmp.load_runs([str(sweep)]), cmp.CompareConfig(panel_by="model.residul"))


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
    assert (width, height) == (900, 675)  # 6 x 4.5 inches at 150 dpi
    assert (out / "curves.png").stat().st_size > 10_000
    failed = list(csv.DictReader((out / "failed.csv").open()))
    assert [(f["status"], f["step"]) for f in failed] == [("diverged", "20"), ("failed", "")]


def test_plot_run(tmp_path):
    run_dir = finished_run(tmp_path / "run", "resnet20", 0)
    assert plot_run(run_dir, tmp_path / "curves.png") == tmp_path / "curves.png"
    assert png_size(tmp_path / "curves.png") == (900, 675)
    empty = write_run(tmp_path / "empty", config("resnet20", 0), None, [{"step": 10}])
    assert plot_run(empty, tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_plot_run_does_not_import_jax(tmp_path):
    run_dir = finished_run(tmp_path / "run", "resnet20", 0)
    code = (
        "import sys, time\nfrom pathlib import Path\nfrom cnnlab.plots import plot_run\n"
        f"t = time.perf_counter(); plot_run(Path({str(run_dir)!r}), Path({str(tmp_path)!r}) / "
        "'c.png'); print(time.perf_counter() - t)\nassert 'jax' not in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout) < 5  # well under 1 s on an idle core; shared CI is slower


# --------------------------------------------------------------------------------- options


@pytest.mark.parametrize(("overrides", "message"), [
    (["compare.colour=red"], "compare.colour: Key 'colour' not in 'CompareConfig'"),
    (["compare.shade_std=maybe"], "compare.shade_std:"),
    (["compare.format=html"], "compare.format: unknown 'html'; valid choices: markdown, csv"),
    (["compare.metric=accuracy"], "compare.metric: unknown 'accuracy'"),
    (["compare.ylim=[5,1]"], "compare.ylim: expected [lo,hi]"),
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
    run = cmp._wandb_run(FakeWandbRun(), "me/cnnlab")
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
        cmp.load_runs(["wandb:me/cnnlab/g1"])
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="expected wandb:ENTITY/PROJECT/GROUP"):
        cmp.load_runs(["wandb:me/cnnlab"])


# ------------------------------------------------------------------------------------ CLI


def test_cli_compare_writes_files_and_prints_tables(sweep):
    result = run_cli(["compare", str(sweep), "compare.panel_by=model.residual"],
                     cwd=sweep.parent, fresh_process=True)
    assert result.returncode == 0, result.stderr
    out = sweep / "compare"
    assert result.stdout == (out / "table.md").read_text()
    assert "## Failed or incomplete runs" in result.stdout
    assert "| 6_model=plain20,optimizer.lr=1.0,seed=0 |" in result.stdout
    assert png_size(out / "curves.png") == (1800, 675)  # two panels
    assert (out / "table.csv").exists() and (out / "failed.csv").exists()


def test_cli_compare_csv_of_run_dirs(sweep, tmp_path):
    # Job folders hold '=': existing directories are paths, not overrides.
    jobs = [str(sweep / "0_model=plain20,seed=0"), str(sweep / "3_model=resnet20,seed=0")]
    result = run_cli(["compare", *jobs, "compare.format=csv"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == (tmp_path / "compare" / "table.csv").read_text()
    assert [r["configuration"] for r in csv.DictReader(io.StringIO(result.stdout))] == [
        "model=plain20", "model=resnet20"]


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
