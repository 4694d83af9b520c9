"""TensorBoard event files in the run directory (`logger.tensorboard`), written by tensorboardX.

A dashboard without an account: `tensorboard --logdir multirun/...` shows a sweep's runs (each
run directory is one TensorBoard run) with the scalars of metrics.jsonl, the images the run
logs (curves, confusion matrices), diagnostics' histograms, per-class tables as text, and the
run's config in the HParams plugin. The config goes in as a session-start record only, with no
experiment record: TensorBoard then builds the HParams table from every run's session, puts the
keys whose values differ between runs first, and takes each scalar's last value as a metric
column (the final metrics).

The values written are already on the host (the logging steps' metrics, the files written at
the end), so no device sync is added; a logging event is a few small buffered appends.
tensorboardX's own writer (SummaryWriter) is not used: its background thread takes events
through a bounded queue, and once a write fails (a full disk) the thread is gone and the queue's
next `put` blocks the run for good. tensorboardX's synchronous `EventsWriter` lets a failure
surface here, where it ends the event file and not the run.
"""

import contextlib
import importlib.util
import io
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cnnlab.errors import require

log = logging.getLogger(__name__)

# What `pip install` needs for `logger.tensorboard=true` (cnnlab's own dependency).
PACKAGE = "tensorboardX"

# Seconds between flushes (fsyncs, milliseconds each): how late a live run's events may show.
FLUSH_SECS = 10.0

# The HParams plugin's session records (tensorboard/plugins/hparams/metadata.py).
HPARAMS_PLUGIN = "hparams"
SESSION_START_TAG = "_hparams_/session_start_info"
SESSION_END_TAG = "_hparams_/session_end_info"


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
    """One run's event file, written as the run logs: each call appends its events, flushed to
    disk at the first call FLUSH_SECS after the last flush (and at images, the session's end and
    close), so a live run shows in TensorBoard within a logging interval. A failing write (a
    full disk) is said once and ends the event file, never the run: the run's own files are what
    it must keep. `purge_step` hides what an earlier start logged from that step on (a resumed
    run logs those steps again)."""

    def __init__(self, folder: Path, purge_step: int | None = None) -> None:
        from tensorboardX.event_file_writer import EventsWriter

        self.folder = folder
        # The file is named by the second it opened in, and opening truncates: a restart within
        # that second would empty the first start's file. The nanoseconds keep both, in the
        # order TensorBoard reads them (by name).
        self._file: Any = _attempt(folder, lambda: EventsWriter(
            str(folder / "events"), f".{time.time_ns()}"))
        self._flushed_at = time.monotonic()
        if purge_step is not None:
            from tensorboardX.proto.event_pb2 import SessionLog

            self._write([_event(purge_step, session_log=SessionLog(status=SessionLog.START))])

    def scalars(self, step: int, metrics: dict[str, Any]) -> None:
        from tensorboardX.summary import scalar

        self._write([_event(step, summary=scalar(key, float(value)))
                     for key, value in metrics.items()
                     if isinstance(value, int | float) and not isinstance(value, bool)])

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
        self._write([_event(step, summary=Summary(value=[Summary.Value(tag=key,
                                                                        image=encoded)]))],
                    flush=True)

    def histograms(self, step: int, values: dict[str, Any]) -> None:
        from tensorboardX.summary import histogram

        events = []
        for key, array in values.items():
            array = np.asarray(array, dtype=np.float64).ravel()
            if array.size and np.isfinite(array).all():
                events.append(_event(step, summary=histogram(key, array, "auto")))
        self._write(events)

    def table(self, step: int, key: str, columns: Sequence[str],
              rows: Sequence[Sequence[Any]]) -> None:
        """A table as Markdown in TensorBoard's Text tab."""
        from tensorboardX.summary import text

        lines = ["| " + " | ".join(map(str, columns)) + " |",
                 "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
        self._write([_event(step, summary=text(key, "\n".join(lines)))])

    def hparams(self, config: dict[str, Any]) -> None:
        """The run's flattened config as an HParams session start."""
        from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData, SessionStartInfo

        start = SessionStartInfo()
        for key, value in config.items():
            field, converted = hparam_value(value)
            setattr(start.hparams[key], field, converted)
        self._write([_hparams_event(SESSION_START_TAG,
                                    HParamsPluginData(session_start_info=start), 0)])

    def end(self, step: int, failed: bool) -> None:
        """The HParams session's status: success, or failure (diverged)."""
        from tensorboardX.proto.api_pb2 import Status
        from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData, SessionEndInfo

        status = Status.Value("STATUS_FAILURE" if failed else "STATUS_SUCCESS")
        self._write([_hparams_event(SESSION_END_TAG, HParamsPluginData(
            session_end_info=SessionEndInfo(status=status)), step)], flush=True)

    def close(self) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            _attempt(self.folder, file.close)

    def _write(self, events: list[Any], flush: bool = False) -> None:
        if self._file is None or not events:
            return

        def write() -> bool:
            for event in events:
                self._file.write_event(event)
            if flush or time.monotonic() - self._flushed_at >= FLUSH_SECS:
                self._file.flush()  # an fsync: milliseconds, so not at every event
                self._flushed_at = time.monotonic()
            return True

        if _attempt(self.folder, write) is None:
            # Said once; the run goes on without its event file, which keeps what it could.
            file, self._file = self._file, None
            with contextlib.suppress(OSError):
                file.close()


def _attempt(folder: Path, write: Callable[[], Any]) -> Any:
    """`write()`, or None (with a warning) when the file system refuses it."""
    try:
        return write()
    except OSError as error:
        log.warning("TensorBoard event file in %s not written from here on: %s", folder, error)
        return None


def _event(step: int, **fields: Any) -> Any:
    from tensorboardX.proto.event_pb2 import Event

    return Event(wall_time=time.time(), step=int(step), **fields)


def _hparams_event(tag: str, content: Any, step: int) -> Any:
    from tensorboardX.proto.summary_pb2 import Summary, SummaryMetadata

    content.version = 0
    plugin = SummaryMetadata.PluginData(plugin_name=HPARAMS_PLUGIN,
                                        content=content.SerializeToString())
    return _event(step, summary=Summary(value=[Summary.Value(
        tag=tag, metadata=SummaryMetadata(plugin_data=plugin))]))


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)
