"""TensorBoard event files in the run directory (`logger.tensorboard`), written by tensorboardX.

A dashboard without an account: `tensorboard --logdir multirun/...` shows a sweep's runs (each
run directory is one TensorBoard run) with the scalars of metrics.jsonl, the images the run
logs (curves, confusion matrices), diagnostics' histograms, per-class tables as text, and the
run's config in the HParams plugin. The config goes in as a session-start record only, with no
experiment record: TensorBoard then builds the HParams table from every run's session, puts the
keys whose values differ between runs first, and takes each scalar's last value as a metric
column (the final metrics).

tensorboardX writes from a background thread: a call here only queues an event, and the values
it gets are already on the host (the logging steps' metrics), so no device sync is added.
"""

import importlib.util
import io
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cnnlab.errors import require

# What `pip install` needs for `logger.tensorboard=true` (cnnlab's own dependency).
PACKAGE = "tensorboardX"

# The HParams plugin's session records (tensorboard/plugins/hparams/metadata.py).
HPARAMS_PLUGIN = "hparams"
SESSION_START_TAG = "_hparams_/session_start_info"
SESSION_END_TAG = "_hparams_/session_end_info"

# Seconds between flushes of queued events: a live run shows up in TensorBoard within this.
FLUSH_SECS = 10


def available() -> bool:
    """Whether tensorboardX can be imported (without importing it: it imports torch if present)."""
    return importlib.util.find_spec(PACKAGE) is not None


def require_available(asked: bool, fix: str) -> None:
    """One line and exit 2 (ConfigError) when event files are asked for and tensorboardX is
    missing; `fix` says how else to turn them off."""
    require(not asked or available(),
            f"logger.tensorboard=true needs the {PACKAGE} package, which is not installed: "
            f"pip install {PACKAGE}, or {fix}")


def hparam_value(value: Any) -> tuple[str, Any]:
    """A config leaf as a google.protobuf.Value field: numbers, booleans and strings as
    themselves, None as "null" and lists as JSON, so a key has one type across a sweep's runs."""
    if isinstance(value, bool):
        return "bool_value", value
    if isinstance(value, int | float):
        return "number_value", float(value)
    if isinstance(value, str):
        return "string_value", value
    return "string_value", json.dumps(value)


class EventWriter:
    """One run's event file; `purge_step` hides what an earlier start logged from that step on
    (a resumed run logs those steps again)."""

    def __init__(self, folder: Path, purge_step: int | None = None) -> None:
        from tensorboardX import FileWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog

        # The file is named by the second it opened in, and opening truncates: a restart within
        # that second would empty the first start's file. The nanoseconds keep both, in the
        # order TensorBoard reads them (by name).
        self._writer = FileWriter(str(folder), flush_secs=FLUSH_SECS,
                                  filename_suffix=f".{time.time_ns()}")
        if purge_step is not None:  # as tensorboardX's SummaryWriter(purge_step=) writes it
            self._writer.add_event(Event(step=purge_step, file_version="brain.Event:2"))
            self._writer.add_event(Event(step=purge_step,
                                         session_log=SessionLog(status=SessionLog.START)))

    def scalars(self, step: int, metrics: dict[str, Any]) -> None:
        from tensorboardX.summary import scalar

        for key, value in metrics.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                self._writer.add_summary(scalar(key, float(value)), step)

    def image(self, step: int, key: str, path: Path) -> None:
        """A PNG file as it is (no decode and re-encode)."""
        from PIL import Image
        from tensorboardX.proto.summary_pb2 import Summary

        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            channels = len(image.getbands())
        encoded = Summary.Image(height=height, width=width, colorspace=channels,
                                encoded_image_string=data)
        self._add(Summary(value=[Summary.Value(tag=key, image=encoded)]), step)

    def histograms(self, step: int, values: dict[str, Any]) -> None:
        from tensorboardX.summary import histogram

        for key, array in values.items():
            array = np.asarray(array, dtype=np.float64).ravel()
            if array.size and np.isfinite(array).all():
                self._writer.add_summary(histogram(key, array, "tensorflow"), step)

    def table(self, step: int, key: str, columns: Sequence[str],
              rows: Sequence[Sequence[Any]]) -> None:
        """A table as Markdown in TensorBoard's Text tab."""
        from tensorboardX.summary import text

        lines = ["| " + " | ".join(map(str, columns)) + " |",
                 "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
        self._writer.add_summary(text(key, "\n".join(lines)), step)

    def hparams(self, config: dict[str, Any]) -> None:
        """The run's flattened config as an HParams session start."""
        from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData, SessionStartInfo

        start = SessionStartInfo()
        for key, value in config.items():
            field, converted = hparam_value(value)
            setattr(start.hparams[key], field, converted)
        self._add_hparams(SESSION_START_TAG, HParamsPluginData(session_start_info=start), 0)

    def end(self, step: int, failed: bool) -> None:
        """The HParams session's status: success, or failure (diverged, failed, interrupted)."""
        from tensorboardX.proto.api_pb2 import Status
        from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData, SessionEndInfo

        status = Status.Value("STATUS_FAILURE" if failed else "STATUS_SUCCESS")
        self._add_hparams(SESSION_END_TAG,
                          HParamsPluginData(session_end_info=SessionEndInfo(status=status)), step)

    def close(self) -> None:
        self._writer.close()

    def _add_hparams(self, tag: str, content: Any, step: int) -> None:
        from tensorboardX.proto.summary_pb2 import Summary, SummaryMetadata

        content.version = 0
        plugin = SummaryMetadata.PluginData(plugin_name=HPARAMS_PLUGIN,
                                            content=content.SerializeToString())
        self._add(Summary(value=[Summary.Value(tag=tag,
                                               metadata=SummaryMetadata(plugin_data=plugin))]),
                  step)

    def _add(self, summary: Any, step: int) -> None:
        self._writer.add_summary(summary, step)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)
