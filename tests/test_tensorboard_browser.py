"""The smoke study in a real TensorBoard, loaded in headless Chromium: every run and its curves
are on the rendered page, and the HParams table has every run with its swept values.

Chromium is Debian's `chromium` package (CI installs it; see docs/compare.md). The page is the
Time Series dashboard with its charts drawn as SVG (`forceSVG`), so the curves are elements of
the DOM that `chromium --dump-dom` prints once the page's requests and frames have run.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from omegaconf import OmegaConf

# The server comes with the `dev` extra; CI has it, so only a local run without it skips.
if os.environ.get("CI") != "true":
    pytest.importorskip("tensorboard")

from cnnlab.runs.tracking import flatten
from tests.helpers import run_cli

# The scalars every job of the smoke study logs, and what the page must draw for each run.
TAGS = ("train/loss", "train/error", "test/loss", "test/error")
# The flags headless Chromium needs here: no sandbox (root in a container), no GPU, and nothing
# that reaches the network or a profile beyond this test's own empty one.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--run-all-compositor-stages-before-draw", "--window-size=1400,3000")


def chromium() -> str:
    """Debian's chromium; only a local run without it skips (CI must run this test)."""
    for name in ("chromium", "chromium-browser"):
        if path := shutil.which(name):
            return path
    if os.environ.get("CI") == "true":
        pytest.fail("chromium not found: CI installs Debian's chromium package")
    pytest.skip("chromium not installed (apt-get install chromium)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, body: dict | None = None) -> object:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def wait_for_scalars(url: str, runs: set[str], server: subprocess.Popen,
                     timeout: float = 120) -> None:
    """Until TensorBoard has every run's scalars (it reads the event files after it starts)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.poll() is None, server.stdout.read()
        try:
            tags = get_json(f"{url}/data/plugin/scalars/tags")
            if all(set(TAGS) <= set(tags.get(run, {})) for run in runs):
                return
        except OSError:
            pass
        time.sleep(1)
    raise AssertionError(f"TensorBoard did not load the scalars of {sorted(runs)} in {timeout} s")


def without_angular_attributes(dom: str) -> str:
    """The page's DOM without Angular's per-component marker attributes (`_ngcontent-ng-c1=""`),
    which sit between the attributes the checks read."""
    return re.sub(r'\s_ng(content|host)-[\w-]*=""', "", dom)


def run_colors(dom: str) -> dict[str, str]:
    """The runs table: each run's name and the colour its curves are drawn in."""
    colors = {}
    for row in dom.split("<tb-data-table-content-row ")[1:]:
        row = row[:row.find("</tb-data-table-content-row>")]
        name = re.search(r'data-id="[^"/]*/([^"]*)"', row)
        swatch = re.search(r'class="run-color-swatch"[^>]*style="background: ([^;"]*)', row)
        if name and swatch:
            colors[name.group(1)] = swatch.group(1)
    return colors


def drawn_series(dom: str) -> dict[str, dict[str, list[int]]]:
    """{tag: {colour: [points of each line drawn in it]}} over the scalar cards the page drew (a
    single point is a circle)."""
    charts: dict[str, dict[str, list[int]]] = {}
    for card in dom.split("<scalar-card ")[1:]:
        card = card[:card.find("</scalar-card>")]
        title = re.search(r'class="tag" title="([^"]*)"', card)
        series = re.search(r'<svg[^>]*class="ng-star-inserted"[^>]*>(.*?)</svg>', card, re.S)
        if not title or not series or not series.group(1):
            continue
        lines = charts.setdefault(title.group(1), {})
        for path, color in re.findall(r'<path d="([^"]*)" style="[^"]*stroke: (rgb\([^)]*\))',
                                      series.group(1)):
            lines.setdefault(color, []).append(path.count("L") + 1)
        for color in re.findall(r'<circle [^>]*style="[^"]*stroke: (rgb\([^)]*\))',
                                series.group(1)):
            lines.setdefault(color, []).append(1)
    return charts


def logged_points(job_dir: Path, tag: str) -> int:
    lines = (job_dir / "metrics.jsonl").read_text().splitlines()
    return sum(tag in json.loads(line) for line in lines)


@pytest.fixture(scope="module")
def browser() -> str:
    """Module-scoped and first in the page test's arguments: a missing Chromium skips before
    the sweep trains."""
    return chromium()


@pytest.fixture(scope="module")
def smoke_sweep(fashion_dir, tmp_path_factory) -> Path:
    sweep_dir = tmp_path_factory.mktemp("tensorboard_browser") / "sweep"
    result = run_cli(["train", "-m", "experiment=smoke/resnet_vs_plain", "logger.mode=disabled",
                      f"hydra.sweep.dir={sweep_dir}"], cwd=sweep_dir.parent, data_dir=fashion_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return sweep_dir


@pytest.fixture(scope="module")
def board(smoke_sweep):
    """`tensorboard --logdir` on the sweep, on a free port; its URL."""
    url = f"http://127.0.0.1:{free_port()}"
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(smoke_sweep),
         "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1]],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        runs = {p.parent.parent.name for p in smoke_sweep.rglob(".hydra/config.yaml")}
        wait_for_scalars(url, runs, server)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_every_run_and_its_curves_are_on_the_page(browser, smoke_sweep, board, tmp_path):
    # The cards of the train/ and test/ tags (their groups would start collapsed).
    page = f"{board}/?forceSVG=true&tagFilter=train%7Ctest"
    job_dirs = sorted(p.parent.parent for p in smoke_sweep.rglob(".hydra/config.yaml"))
    # The page's requests take real time under virtual time: on a busy machine its budget can
    # run out before the charts are drawn, so a page without them is loaded again, with a
    # longer budget (CI once drew no chart in 3 tries of 60 s, with 3 test processes on 2 cores).
    for attempt in range(5):
        dom = without_angular_attributes(subprocess.run(
            [browser, *FLAGS, f"--user-data-dir={tmp_path / f'profile{attempt}'}",
             f"--virtual-time-budget={60000 * (attempt + 1)}", "--dump-dom",
             f"{page}#timeseries"],
            capture_output=True, text=True, timeout=300, check=True).stdout)
        if set(TAGS) <= set(drawn_series(dom)):
            break
    colors = run_colors(dom)
    # Every run of the sweep is listed, each in a colour of its own.
    assert set(colors) == {d.name for d in job_dirs} and len(job_dirs) == 4, colors
    assert len(set(colors.values())) == len(colors), colors
    charts = drawn_series(dom)
    for tag in TAGS:
        assert tag in charts, (tag, sorted(charts))
        for job_dir in job_dirs:
            lines = charts[tag].get(colors[job_dir.name])
            # The run's curve (raw and smoothed), with as many points as it logged.
            assert lines and set(lines) == {logged_points(job_dir, tag)}, (tag, job_dir.name)
    # And a screenshot of that page renders (the one in docs/images is of a longer sweep).
    shot = tmp_path / "tensorboard.png"
    subprocess.run([browser, *FLAGS, f"--user-data-dir={tmp_path / 'profile_shot'}",
                    "--virtual-time-budget=60000", f"--screenshot={shot}", f"{page}#timeseries"],
                   capture_output=True, timeout=300, check=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_hparams_table_compares_the_runs(smoke_sweep, board):
    """What the HParams dashboard loads (its own requests): one session per run with its
    config, the keys the runs differ in first, and each run's final metrics."""
    job_dirs = sorted(p.parent.parent for p in smoke_sweep.rglob(".hydra/config.yaml"))
    configs = {d.name: flatten(OmegaConf.to_container(OmegaConf.load(d / "config.yaml")))
               for d in job_dirs}
    keys = set.union(*(set(c) for c in configs.values()))
    differing = {k for k in keys if len({json.dumps(c.get(k)) for c in configs.values()}) > 1}
    assert {"model.name", "seed"} <= differing
    experiment = get_json(f"{board}/data/plugin/hparams/experiment", {"experimentName": ""})
    infos = experiment["hparamInfos"]
    assert {i["name"] for i in infos} == keys
    assert {i["name"] for i in infos[:len(differing)]} == differing
    assert all(i.get("differs") for i in infos[:len(differing)])
    groups = get_json(f"{board}/data/plugin/hparams/session_groups", {
        "experimentName": "", "startIndex": 0, "sliceSize": 100,
        "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE",
                            "STATUS_RUNNING"],
        "colParams": [{"hparam": "model.name", "includeInResult": True},
                      {"hparam": "seed", "includeInResult": True},
                      {"metric": {"tag": "test/error", "group": ""}, "includeInResult": True}],
    })["sessionGroups"]
    assert {g["name"] for g in groups} == set(configs)
    for group in groups:
        (session,) = group["sessions"]
        summary = json.loads((smoke_sweep / group["name"] / "summary.json").read_text())
        assert session["status"] == "STATUS_SUCCESS"
        assert group["hparams"]["model.name"] == configs[group["name"]]["model.name"]
        assert group["hparams"]["seed"] == configs[group["name"]]["seed"]
        final = {m["name"]["tag"]: m for m in group["metricValues"]}["test/error"]
        assert final["trainingStep"] == summary["final_step"]
        assert final["value"] == pytest.approx(summary["final/test/error"], rel=1e-6)
