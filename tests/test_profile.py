"""train.profile=START:STOP: a JAX profiler trace of those steps in the run directory."""

import gzip
import json
from pathlib import Path

import pytest

from cnnlab.cli.preflight import validate
from cnnlab.errors import ConfigError
from tests.helpers import compose_config, train_tiny


def test_the_trace_holds_the_training_calls(tmp_path: Path, fashion_dir: Path) -> None:
    summary = train_tiny(tmp_path, fashion_dir, ["train.profile=5:15"])
    assert summary["status"] == "finished"
    perfetto = list((tmp_path / "profile").rglob("perfetto_trace.json.gz"))
    assert len(perfetto) == 1 and list((tmp_path / "profile").rglob("*.xplane.pb"))
    events = json.loads(gzip.decompress(perfetto[0].read_bytes()))
    names = [e.get("name", "") for e in (events["traceEvents"] if isinstance(events, dict)
                                         else events)]
    # The two calls of the 5-step chunk in the window (steps 5-10 and 10-15); the Python
    # tracer records the host side too.
    assert names.count("PjitFunction(train_chunk)") >= 2
    assert any(name.startswith("$") and "loop.py" in name for name in names)


@pytest.mark.parametrize("value, message", [
    ("5", "train.profile='5' must be START:STOP"),
    ("10:5", "must satisfy 0 <= START < STOP <= train.steps=20"),
    ("5:40", "must satisfy 0 <= START < STOP <= train.steps=20"),
    ("3:10", "START and STOP must be multiples of train.steps_per_call=5"),
])
def test_bad_windows_are_one_line(value: str, message: str) -> None:
    from tests.helpers import TINY

    with pytest.raises(ConfigError, match=message):
        validate(compose_config([*TINY, f"train.profile={value}"]))
