"""TensorBoard event files (`logger.tensorboard`, cnnlab/runs/tensorboard.py), read back with
TensorBoard's own reader and compared with what the run wrote to its own files."""

import json
import math
import os
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from PIL import Image

# TensorBoard's reader comes with the `dev` extra; CI has it, so only a local run without it skips.
if os.environ.get("CI") != "true":
    pytest.importorskip("tensorboard")

from tensorboard.backend.event_processing import event_accumulator as accumulator  # noqa: E402
from tensorboard.plugins.hparams import api_pb2, metadata  # noqa: E402

from cnnlab.runs import tensorboard
from cnnlab.runs.rundir import RunDir
from cnnlab.runs.tracking import RunTracker, flatten
from tests.helpers import TINY, run_cli


def read_events(folder: Path) -> object:
    events = accumulator.EventAccumulator(str(folder), size_guidance={
        accumulator.SCALARS: 0, accumulator.IMAGES: 0, accumulator.TENSORS: 0,
        accumulator.HISTOGRAMS: 0})
    events.Reload()
    return events


def hparams_records(events: object) -> dict[str, object]:
    """The HParams plugin's records, parsed as TensorBoard's HParams dashboard parses them."""
    content = events.PluginTagToContent(metadata.PLUGIN_NAME)
    records = {}
    if metadata.SESSION_START_INFO_TAG in content:
        records["start"] = metadata.parse_session_start_info_plugin_data(
            content[metadata.SESSION_START_INFO_TAG])
    if metadata.SESSION_END_INFO_TAG in content:
        records["end"] = metadata.parse_session_end_info_plugin_data(
            content[metadata.SESSION_END_INFO_TAG])
    return records


def event_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("events.out.tfevents.*"))


def logged_series(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every number metrics.jsonl holds, as (step, value) series per key."""
    series: dict[str, list[tuple[int, float]]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        event = json.loads(line)
        for key, value in event.items():
            if key != "step" and isinstance(value, int | float):
                series.setdefault(key, []).append((event["step"], float(value)))
    return series


@pytest.fixture(scope="module")
def tiny_run(fashion_dir, tmp_path_factory) -> Path:
    """A TINY run with evaluations and diagnostics: scalars, images, a table, histograms."""
    run_dir = tmp_path_factory.mktemp("tensorboard") / "run"
    result = run_cli(["train", *TINY, "train.log_every=5", "train.eval_every=10",
                      "diagnostics.every=20", "logger.mode=disabled", f"hydra.run.dir={run_dir}"],
                     cwd=run_dir.parent, data_dir=fashion_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_scalars_are_the_runs_metrics(tiny_run):
    events = read_events(tiny_run)
    logged = logged_series(tiny_run)
    assert {"train/loss", "test/error", "lr", "epoch"} <= set(logged)
    assert any(key.startswith("diag/") for key in logged), sorted(logged)
    # Every series of metrics.jsonl, point for point, and nothing else.
    assert sorted(events.Tags()["scalars"]) == sorted(logged)
    for key, points in logged.items():
        read = [(e.step, e.value) for e in events.Scalars(key)]
        assert [s for s, _ in read] == [s for s, _ in points], key
        for (_, value), (_, expected) in zip(read, points, strict=True):
            # Event files hold float32.
            assert value == pytest.approx(expected, rel=1e-6, abs=1e-30), (key, value, expected)


def test_images_table_and_histograms_are_the_runs_files(tiny_run):
    events = read_events(tiny_run)
    final = json.loads((tiny_run / "summary.json").read_text())["final_step"]
    for tag, file in (("curves", "curves.png"), ("confusion/test", "confusion_test.png")):
        (image,) = events.Images(tag)
        assert image.step == final
        # The PNG as the run wrote it, with its size.
        assert image.encoded_image_string == (tiny_run / file).read_bytes()
        with Image.open(tiny_run / file) as png:
            assert (image.width, image.height) == png.size
    (table,) = events.Tensors("per_class/test/text_summary")
    text = table.tensor_proto.string_val[0].decode()
    rows = (tiny_run / "per_class_test.csv").read_text().strip().splitlines()
    # A header, the Markdown rule, then one row per class, as per_class_test.csv has them.
    assert len(text.splitlines()) == len(rows) + 1
    assert [c.strip() for c in text.splitlines()[0].strip("|").split("|")] == rows[0].split(",")
    histograms = events.Tags()["histograms"]
    assert histograms and all(events.Histograms(tag)[0].step == final for tag in histograms)


def test_viz_images_join_the_runs_event_files(tiny_run, fashion_dir):
    result = run_cli(["viz", "filters", str(tiny_run), "wandb=disabled"], cwd=tiny_run.parent,
                     data_dir=fashion_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    events = read_events(tiny_run)
    final = json.loads((tiny_run / "summary.json").read_text())["final_step"]
    for name in ("filters", "weight_histograms"):
        (image,) = events.Images(f"viz/filters/{name}")
        assert image.step == final
        assert image.encoded_image_string == (tiny_run / "viz" / f"{name}.png").read_bytes()


def test_hparams_are_the_runs_config(tiny_run):
    records = hparams_records(read_events(tiny_run))

    config = flatten(OmegaConf.to_container(OmegaConf.load(tiny_run / "config.yaml")))
    hparams = records["start"].hparams
    assert set(hparams) == set(config)
    assert hparams["model.name"].string_value == "resnet8"
    assert hparams["model.depth"].number_value == 8
    assert hparams["train.steps"].number_value == 20
    assert hparams["logger.tensorboard"].bool_value is True
    for key, value in config.items():
        kind = hparams[key].WhichOneof("kind")
        if isinstance(value, bool):
            assert (kind, hparams[key].bool_value) == ("bool_value", value), key
        elif isinstance(value, int | float):
            expected = float(value)
            assert kind == "number_value" and (hparams[key].number_value == expected or (
                math.isnan(expected) and math.isnan(hparams[key].number_value))), key
        elif isinstance(value, str):
            assert hparams[key].string_value == value, key
        else:  # None and lists: one type across a sweep's runs
            assert hparams[key].string_value == json.dumps(value), key
    assert records["end"].status == api_pb2.STATUS_SUCCESS


def test_off_writes_no_event_file(fashion_dir, tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(["train", *TINY, "train.steps=5", "logger.mode=disabled",
                      "logger.tensorboard=false", f"hydra.run.dir={run_dir}"],
                     cwd=tmp_path, data_dir=fashion_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / "metrics.jsonl").read_text() and (run_dir / "curves.png").is_file()
    assert event_files(run_dir) == []


def test_asked_for_without_the_package_is_one_line(fashion_dir, tmp_path, monkeypatch):
    # As if tensorboardX were not installed: find_spec and import both fail.
    monkeypatch.setitem(sys.modules, tensorboard.PACKAGE, None)
    run_dir = tmp_path / "run"
    result = run_cli(["train", *TINY, "logger.mode=disabled", f"hydra.run.dir={run_dir}"],
                     cwd=tmp_path, data_dir=fashion_dir)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert "logger.tensorboard=true" in line and "pip install tensorboardX" in line, line
    assert "logger.tensorboard=false" in line and not (run_dir / "metrics.jsonl").exists()


def test_a_resumed_run_hides_what_it_logs_again(tmp_path):
    """A run resumed from its step-2 checkpoint logs steps 3 and 4 again: TensorBoard shows the
    second start's values there, the first start's before."""

    logger = OmegaConf.create({"mode": "disabled", "tags": [], "name": None,
                               "tensorboard": True})
    run_dir = RunDir(tmp_path)
    first = RunTracker(run_dir, {"seed": 0}, logger, None, None)
    for step in (1, 2, 3, 4):
        first.log(step, {"train/loss": float(step)})
    first.finish("interrupted", step=4)
    resumed = RunTracker(run_dir, {"seed": 0}, logger, None, resume_step=2)
    for step in (3, 4, 5):
        resumed.log(step, {"train/loss": 10.0 * step})
    assert "end" not in hparams_records(read_events(tmp_path))  # it may be resumed
    resumed.finish("finished", step=5)
    assert len(event_files(tmp_path)) == 2
    events = read_events(tmp_path)
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [
        (1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0), (5, 50.0)]
    assert hparams_records(events)["end"].status == api_pb2.STATUS_SUCCESS


@pytest.mark.parametrize("value, expected", [
    (True, ("bool_value", True)), (3, ("number_value", 3.0)), (0.5, ("number_value", 0.5)),
    ("relu", ("string_value", "relu")), (None, ("string_value", "null")),
    ([28, 36], ("string_value", "[28, 36]"))])
def test_hparam_values_keep_one_type_per_key(value, expected):
    assert tensorboard.hparam_value(value) == expected


@pytest.mark.parametrize("status, ends", [
    ("finished", "STATUS_SUCCESS"), ("diverged", "STATUS_FAILURE"), ("failed", None),
    ("interrupted", None)])
def test_the_session_ends_only_when_the_run_has(tmp_path, status, ends):
    """TensorBoard keeps a run's first session end: a run that may be resumed leaves it open."""

    logger = OmegaConf.create({"mode": "disabled", "tags": [], "name": None,
                               "tensorboard": True})
    tracker = RunTracker(RunDir(tmp_path), {"seed": 0}, logger, None, None)
    tracker.log(1, {"train/loss": 1.0})
    tracker.finish(status, step=1)
    end = hparams_records(read_events(tmp_path)).get("end")
    assert (api_pb2.Status.Name(end.status) if end else None) == ends, end


def test_a_full_disk_ends_the_event_file_not_the_run(tmp_path, monkeypatch, caplog):
    """A write that fails (ENOSPC) is said once; metrics.jsonl and the run go on."""
    import errno

    from tensorboardX.event_file_writer import EventsWriter

    logger = OmegaConf.create({"mode": "disabled", "tags": [], "name": None,
                               "tensorboard": True})
    tracker = RunTracker(RunDir(tmp_path), {"seed": 0}, logger, None, None)
    tracker.log(1, {"train/loss": 1.0})

    def full(self, event):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(EventsWriter, "write_event", full)
    for step in (2, 3):
        tracker.log(step, {"train/loss": float(step)})
    tracker.finish("finished", step=3)
    monkeypatch.undo()
    assert [json.loads(line)["step"] for line in
            (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    warnings = [r.getMessage() for r in caplog.records if "TensorBoard" in r.getMessage()]
    assert len(warnings) == 1 and "No space left on device" in warnings[0], warnings
    events = read_events(tmp_path)
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 1.0)]
