"""Architecture search over the notes' pattern: model=pattern's layer list, the Pareto front
of error against multiply-adds, `cnnlab compare compare.pareto=true`, and the smoke search
(3 Optuna trials) end to end on the offline data."""

import json

import pytest
import yaml
from omegaconf import OmegaConf

from cnnlab.analysis.pareto import pareto_front, pareto_markdown, pareto_points
from cnnlab.analysis.tables import Row, Stat
from cnnlab.cli.preflight import validate
from cnnlab.errors import ConfigError
from cnnlab.models import build_model, model_options
from cnnlab.models.summary import summarize
from tests.helpers import compose_config, run_cli

# ------------------------------------------------------------------------- model=pattern


def test_pattern_generates_the_notes_layer_list():
    options = model_options(compose_config(["model=pattern", "model.n=2", "model.m=3",
                                            "model.k=2", "model.width=8", "model.fc_width=32"]
                                           ).model)
    pool = {"maxpool": 2, "padding": "same"}
    assert options.layers() == ["conv3-8", "conv3-8", pool, "conv3-16", "conv3-16", pool,
                                "conv3-32", "conv3-32", pool]
    assert options.head() == ["fc-32", "fc-32"]


def test_pattern_without_pooling_and_with_gap():
    options = model_options(compose_config(["model=pattern", "model.n=1", "model.m=2",
                                            "model.k=0", "model.pool=none", "model.gap=true",
                                            "model.growth=1"]).model)
    assert options.layers() == ["conv3-16", "conv3-16", "global_avgpool"]
    assert options.head() == []


def test_pattern_params_and_macs_by_hand():
    # N=1, M=2, K=1, width 4 (then 8), fc 16, on 28x28x1, norm none: conv 3x3.
    cfg = compose_config(["model=pattern", "model.n=1", "model.m=2", "model.k=1",
                          "model.width=4", "model.fc_width=16", "norm=none"])
    summary = summarize(build_model(cfg, 10), (28, 28, 1))
    params = (9 * 1 * 4 + 4) + (9 * 4 * 8 + 8) + (7 * 7 * 8 * 16 + 16) + (16 * 10 + 10)
    macs = 28 * 28 * 9 * 4 + 14 * 14 * 9 * 4 * 8 + 7 * 7 * 8 * 16 + 16 * 10
    assert (summary.params, summary.macs) == (params, macs)


@pytest.mark.parametrize("override,message", [
    ("model.n=0", "model.n=0 must be an integer >= 1"),
    ("model.k=-1", "model.k=-1 must be an integer >= 0"),
    ("model.pool=stride", "model.pool='stride'; valid choices: max, avg, none"),
])
def test_bad_pattern_values_are_one_line_errors(override, message):
    with pytest.raises(ConfigError) as error:
        validate(compose_config(["model=pattern", override]))
    assert message in str(error.value) and "\n" not in str(error.value)


# ------------------------------------------------------------------------------ Pareto front


def test_pareto_front_of_hand_made_points():
    points = [(10, 5.0), (20, 4.0), (15, 6.0), (30, 4.0), (5, 9.0), (40, 1.0), (20, 4.0),
              (50, 1.0), (12, 5.0)]
    # (15, 6) is beaten by (10, 5); (30, 4) by (20, 4); (50, 1) by (40, 1); (12, 5) by (10, 5);
    # the two (20, 4) tie and both stay.
    assert pareto_front(points) == [4, 0, 1, 6, 5]
    assert pareto_front([]) == []
    assert pareto_front([(1, 1)]) == [0]
    # One point better in both: a front of one.
    assert pareto_front([(3, 3), (2, 2), (1, 1)]) == [2]


def _row(label: str, macs: float | None, val: float | None, test: float) -> Row:
    stat = lambda v: Stat(v, None, 0 if v is None else 1)  # noqa: E731
    stats = {"macs": stat(macs), "params": stat(1000.0), "final_val_error": stat(val),
             "final_test_error": stat(test)}
    return Row(label, 1, 1, stats)


def test_pareto_points_use_the_validation_error_and_skip_rows_without_macs():
    rows = [_row("a", 1e6, 10.0, 50.0), _row("b", 2e6, 8.0, 1.0), _row("c", 3e6, 9.0, 0.5),
            _row("d", None, 1.0, 1.0)]
    metric, points = pareto_points(rows)
    assert metric == "final_val_error"
    assert [(p.label, p.on_front) for p in points] == [("a", True), ("b", True), ("c", False)]
    table = pareto_markdown(metric, points)
    assert "| a | 1.00M | 1,000 | 10.00 | yes |" in table
    assert "| c | 3.00M | 1,000 | 9.00 | - |" in table
    # Without validation errors: the test error.
    metric, points = pareto_points([_row("a", 1e6, None, 5.0), _row("b", 2e6, None, 6.0)])
    assert metric == "final_test_error" and [p.on_front for p in points] == [True, False]


# -------------------------------------------------------------------------- the smoke search


def test_smoke_search_of_3_trials_records_cost_and_draws_the_front(fashion_dir, tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = run_cli(["train", "-m", "experiment=smoke/pattern_search", "logger.mode=disabled",
                      f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path, data_dir=fashion_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sweep of 3 jobs: 3 finished" in result.stderr
    jobs = sorted(p.parent for p in sweep_dir.glob("*/summary.json"))
    summaries = [json.loads((job / "summary.json").read_text()) for job in jobs]
    assert len(summaries) == 3
    for job, summary in zip(jobs, summaries, strict=True):
        # The cost recorded is that trial's own model's, as `cnnlab summary` counts it.
        cfg = OmegaConf.load(job / ".hydra" / "config.yaml")
        counted = summarize(build_model(cfg, 10), (28, 28, 1))
        assert (summary["params"], summary["macs"]) == (counted.params, counted.macs), job
    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert set(best["best_params"]) == {"model.n", "model.m", "model.k", "model.width",
                                        "model.fc_width"}
    assert best["best_value"] == min(s["final/val/error"] for s in summaries)

    compared = run_cli(["compare", str(sweep_dir), "compare.pareto=true"], cwd=tmp_path)
    assert compared.returncode == 0, compared.stderr[-3000:]
    assert "## Error against multiply-adds" in compared.stdout
    pareto = (sweep_dir / "compare" / "pareto.md").read_text()
    front = [(s["macs"], s["final/val/error"]) for s in summaries]
    assert pareto.count("| yes |") == len(pareto_front(front))
    assert (sweep_dir / "compare" / "pareto.png").read_bytes()[:4] == b"\x89PNG"
