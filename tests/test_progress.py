"""What a run shows while it works (cnnlab/progress.py, actions.Progress): phase lines with their
durations, the compile timed apart, a steady-state rate and ETA, a bar on a terminal and plain
lines elsewhere; `cnnlab eval`'s line per run."""

import contextlib
import io
import json
import logging
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from cnnlab import progress
from cnnlab.training import actions
from tests.helpers import run_cli, train_tiny

BATCH = 32


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _progress(stream: io.StringIO, clock: FakeClock, total: int = 100, enabled: bool = True,
              excluded=lambda: 0.0, to_come=lambda step, total: 0.0) -> actions.Progress:
    cfg = OmegaConf.create({"train": {"steps": total, "batch_size": BATCH},
                            "model": {"name": "tiny"}, "progress": enabled})
    return actions.Progress(cfg, 0, excluded=excluded, stream=stream, clock=clock,
                            to_come=to_come)


def _tick(step: int, total: int = 100, loss: float | None = None) -> actions.Tick:
    event = {} if loss is None else {"train/loss": loss, "train/error": 12.5}
    return actions.Tick(step, 5, step == total, None, {}, event=event)


def _run(bar: actions.Progress, clock: FakeClock, compile_s: float, step_s: float,
         total: int = 100) -> None:
    """Chunks of 5 steps: the first after `compile_s` (compiling), then one every `step_s`."""
    clock.now += compile_s
    for step in range(5, total + 1, 5):
        bar(_tick(step, total, loss=0.5))
        clock.now += step_s


def test_duration_reads_at_a_glance():
    assert progress.duration(41.24) == "41.2 s"
    assert progress.duration(312) == "5 min 12 s"
    assert progress.duration(2 * 3600 + 5 * 60 + 10) == "2 h 05 min"


def test_the_rate_and_eta_exclude_the_compile_and_host_work():
    clock = FakeClock()
    excluded = {"seconds": 0.0}
    steps = progress.StepClock(clock, lambda: excluded["seconds"])
    clock.now = 60.0  # a minute compiling, then the first chunk of 5 steps returns
    steps.start(5)
    assert steps.seconds_per_step(5) is None and steps.eta(5, 100) is None
    clock.now += 10 * 0.5  # 10 steps at 0.5 s
    assert steps.seconds_per_step(15) == pytest.approx(0.5)
    clock.now += 30.0  # an evaluation: not training speed
    excluded["seconds"] += 30.0
    clock.now += 5 * 0.5
    assert steps.seconds_per_step(20) == pytest.approx(0.5)
    assert steps.eta(20, 100) == pytest.approx(80 * 0.5)


@pytest.mark.parametrize(("step", "total", "every", "due"), [
    (0, 100, 25, 4),    # 25, 50, 75, 100
    (25, 100, 25, 3),   # an evaluation at 25 has just run
    (24, 100, 25, 4),
    (0, 110, 25, 5),    # 25, 50, 75, 100 and the last step, 110
    (100, 110, 25, 1),
    (110, 110, 25, 0),
    (0, 100, 0, 1),     # eval_every 0: the last step only
])
def test_evaluations_still_due_counts_each_due_step_once(step, total, every, due):
    assert actions.evaluations_due(step, total, every) == due
    assert due == sum(actions.due(s, every, s == total) for s in range(step + 1, total + 1))


def test_the_eta_adds_the_evaluations_still_to_come():
    clock, stream = FakeClock(), Terminal()
    bar = _progress(stream, clock, to_come=lambda step, total: 7.0 * (total - step) / 50)
    clock.now += 120.0
    bar(_tick(50))
    clock.now += 2.0
    bar(_tick(60, loss=0.5))  # 10 steps in 2 s: 8 s of training left, 0.2 s per step
    bar.close()
    assert f"ETA {progress.duration(40 * 0.2 + 7.0 * 40 / 50)}" in stream.getvalue()


def test_off_a_terminal_plain_lines_every_tenth_and_30_s_with_images_per_s_and_eta(caplog):
    clock, stream = FakeClock(), io.StringIO()
    bar = _progress(stream, clock)
    with caplog.at_level(logging.INFO, logger="cnnlab"):
        # 100 steps, 10 s per 5-step chunk: 10% (10 steps, 20 s) is due before 30 s.
        _run(bar, clock, compile_s=120.0, step_s=10.0)
        bar.close()
    assert stream.getvalue() == ""  # nothing on stderr, no carriage returns anywhere
    lines = [r.getMessage() for r in caplog.records if r.name == "cnnlab.training.actions"]
    assert not any("\r" in line for line in lines)
    # The clock starts at step 5; a line every 30 s (3 chunks) at the earliest, and at the end.
    assert [line.split(":")[0] for line in lines] == [
        "step 20/100", "step 35/100", "step 50/100", "step 65/100", "step 80/100",
        "step 95/100", "step 100/100"]
    # 5 steps of 32 images per 10 s: the two-minute compile is not in the rate.
    assert lines[0] == "step 20/100: 16 images/s, loss 0.500, error 12.5%, ETA 2 min 40 s"
    assert "ETA" not in lines[-1] and "16 images/s" in lines[-1]


def test_log_lines_wait_for_a_tenth_of_the_steps_even_when_30_s_have_passed():
    clock, lines = FakeClock(), []
    out = progress.LogLines(1000, lines.append, clock)
    for step in range(10, 1001, 10):
        clock.now += 60.0  # slow steps: 30 s pass every chunk, a tenth of the steps does not
        out.update(step, "x")
    assert [line.split(":")[0] for line in lines] == [
        f"step {s:,}/1,000" for s in range(110, 1001, 100)] + ["step 1,000/1,000"]


def test_on_a_terminal_a_bar_that_starts_after_the_compile(caplog):
    clock, stream = FakeClock(), Terminal()
    bar = _progress(stream, clock)
    with caplog.at_level(logging.INFO, logger="cnnlab"):
        clock.now += 120.0
        bar(_tick(5))
        assert stream.getvalue() != ""  # the bar appears once the first chunk is back
        clock.now += 2.0
        bar(_tick(10, loss=0.5))
        bar.close()
    screen = stream.getvalue()
    assert "\r" in screen and "10/100" in screen
    # 5 steps of 32 images in 2 s, not 10 steps in 122 s.
    assert "80 images/s, loss 0.500, error 12.5%, ETA 36.0 s" in screen
    assert not [r for r in caplog.records if r.name == "cnnlab.training.actions"]


def test_progress_false_shows_nothing(caplog):
    clock, stream = FakeClock(), Terminal()
    bar = _progress(stream, clock, enabled=False)
    with caplog.at_level(logging.INFO, logger="cnnlab"):
        _run(bar, clock, compile_s=1.0, step_s=100.0)
        bar.close()
    assert stream.getvalue() == ""
    assert not [r for r in caplog.records if r.name == "cnnlab.training.actions"]
    assert bar.step == 100 and bar.loss == 0.5  # still followed for the summary


SECONDS = r"([\d.]+) s"  # a short tiny run: every phase takes less than a minute


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, fashion_dir):
    """One TINY run with an evaluation half-way, its log lines and its summary."""
    run_dir = tmp_path_factory.mktemp("run")
    handler = _ListHandler()
    logger = logging.getLogger("cnnlab")
    logger.addHandler(handler)
    previous = logger.level
    logger.setLevel(logging.INFO)
    stderr = io.StringIO()  # not a terminal, even under pytest -s
    try:
        with contextlib.redirect_stderr(stderr):
            summary = train_tiny(run_dir, fashion_dir, ["train.eval_every=10", "progress=true"])
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)
    assert "\r" not in stderr.getvalue()
    return run_dir, handler.lines, summary


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _index(lines: list[str], pattern: str) -> tuple[int, re.Match]:
    found = [(i, m) for i, line in enumerate(lines) if (m := re.fullmatch(pattern, line))]
    assert len(found) == 1, (pattern, lines)
    return found[0]


def test_a_run_says_each_phase_in_order_with_its_duration(tiny_run):
    _, lines, summary = tiny_run
    order = [
        r"loading fashion_mnist",
        r"loaded fashion_mnist in " + SECONDS + r".*: train=1024 val=0 test=1024 images of 28x28x1"
        r" \(max_examples=1024 cuts every split, test too\)",
        r"compiling the training step \(resnet8, 5 steps per call\)",
        r"compiled the training step in " + SECONDS,
        r"step 10: compiling the evaluation, then evaluating test \(1,024 images\)",
        r"compiled the evaluation in " + SECONDS,
        r"step 10: evaluated test in " + SECONDS,
        r"step 20: evaluating test \(1,024 images\)",
        r"step 20: evaluated test in " + SECONDS,
        # Not on a terminal: the closing progress line.
        r"step 20/20: [\d,]+ images/s, loss [\d.]+, error [\d.]+%",
    ]
    found = [_index(lines, pattern) for pattern in order]
    assert [i for i, _ in found] == sorted(i for i, _ in found)
    compiled = float(found[3][1].group(1))
    # The compile is recorded apart from the steady-state steps, and said as recorded.
    assert summary["compile_time"] == pytest.approx(compiled, abs=0.05)
    assert 0 < summary["compile_time"] < summary["wall_time"]
    assert summary["images_per_sec"] > 0


def test_cnnlab_eval_says_which_run_and_split_and_how_long(tiny_run, fashion_dir, tmp_path):
    run_dir, _, _ = tiny_run
    result = run_cli(["eval", str(run_dir), str(run_dir), "eval.tta=flip", "eval.format=json"],
                     cwd=tmp_path, data_dir=fashion_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(json.loads(result.stdout)["members"]) == 2
    lines = [re.sub(r"^\[[\d:]+\] ", "", line) for line in result.stderr.splitlines()]
    start = (r"run {}/2: evaluating " + re.escape(str(Path(run_dir))) +
             r", final weights of step 20, on test \(1,024 images, tta=flip\)")
    end = r"run {}/2: evaluated in " + SECONDS + r": error [\d.]+%"
    found = [_index(lines, pattern) for pattern in (
        r"loading fashion_mnist", start.format(1), end.format(1), start.format(2), end.format(2))]
    assert [i for i, _ in found] == sorted(i for i, _ in found)
