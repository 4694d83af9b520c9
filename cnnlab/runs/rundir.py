"""A run directory: every file a run writes, and the only code that reads or writes them.

```
<run_dir>/
  .hydra/config.yaml     the composed config of the latest start (Hydra writes it)
  .hydra/overrides.yaml  the job's command-line overrides
  config.yaml            the config of the first start, never rewritten (resume compares)
  changes.jsonl          settings changed on resume (resume.allow_changes), with their step
  .lock                  held by the process training in this directory
  summary.json           how the run ended and its final numbers (replaced atomically)
  input_stats.npz        the statistics its inputs are normalized with (of its training set, or
                         its transfer source's), so `cnnlab eval`/`viz` need not read that set
  metrics.jsonl          one JSON event per logging step (appended)
  checkpoints/<step>/    Orbax: the train state and the loop's state (`LoopState`)
  best/<step>/           the selected model (early_stopping.metric's best evaluation)
  snapshots/<step>/      the end of every cyclic_cosine cycle (snapshot ensembles)
  curves.png             train/test error against iterations
  confusion_<split>.csv  the last evaluation's confusion counts (row: true class, column:
  confusion_<split>.png  predicted), drawn row-normalised; per_class_<split>.csv: each class's
  per_class_<split>.csv  error (<split>: test, val, test_ema, ...; cnnlab/analysis/confusion.py)
  wandb/, wandb_id.txt   the W&B run (offline by default) and its id, kept across resumes
```
"""

import contextlib
import fcntl
import io
import json
import math
import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from cnnlab.config.load import SAVED_CONFIG
from cnnlab.errors import ConfigError

CONFIG = Path(SAVED_CONFIG)
OVERRIDES = Path(".hydra") / "overrides.yaml"
SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
CURVES = "curves.png"
# train.profile's JAX profiler trace (TensorBoard and Perfetto files).
PROFILE = "profile"
# Per evaluated split (`test`, `val`, `test_ema`, ...), from the run's last evaluation.
CONFUSION_CSV, CONFUSION_PNG = "confusion_{split}.csv", "confusion_{split}.png"
PER_CLASS_CSV = "per_class_{split}.csv"
WANDB_ID = "wandb_id.txt"
INPUT_STATS = "input_stats.npz"
START_CONFIG, CHANGES, LOCK = "config.yaml", "changes.jsonl", ".lock"
# Checkpoint folders and how many of each are kept (None: all; checkpoint.keep: `latest`).
CHECKPOINTS, BEST, SNAPSHOTS = "checkpoints", "best", "snapshots"

# JSON has no NaN/inf: they are written as strings and read back as floats.
_NONFINITE = {"nan", "-nan", "inf", "+inf", "-inf", "infinity", "-infinity"}


class RunDirBusy(ConfigError):
    """Another process holds the run directory's lock."""


def jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # keep the fact that a run diverged readable
    return value


def floats(record: dict[str, Any]) -> dict[str, Any]:
    return {k: float(v) if isinstance(v, str) and v.lower() in _NONFINITE else v
            for k, v in record.items()}


def write_atomic(path: Path, text: str | bytes) -> None:
    """Replace `path` by `text` (or bytes: a PNG) so that a reader, or a kill, never sees half
    a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb" if isinstance(text, bytes) else "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


class RunDir:
    """The files of one run (module docstring); `path` need not exist yet."""

    # False for a multi-host job's processes other than 0 (FollowerRunDir).
    writes = True

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def __truediv__(self, name: str | Path) -> Path:
        return self.path / name

    def __str__(self) -> str:
        return str(self.path)

    # ---------------------------------------------------------------------------- summary

    def read_summary(self) -> dict[str, Any] | None:
        """summary.json, or None when there is none; an unreadable one is a failed run."""
        path = self.path / SUMMARY
        if not path.is_file():
            return None
        try:
            summary = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            return {"status": "failed", "failure": f"unreadable {SUMMARY}: {e}"}
        return floats(summary) if isinstance(summary, dict) else {"status": "failed"}

    def write_summary(self, summary: dict[str, Any]) -> dict[str, Any]:
        """Replace summary.json atomically; returns what was written (NaN/inf as strings)."""
        clean = {k: jsonable(v) for k, v in summary.items()}
        self.path.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path / SUMMARY, json.dumps(clean, indent=2) + "\n")
        return clean

    # ---------------------------------------------------------------------------- metrics

    def append_metrics(self, step: int, metrics: dict[str, float]) -> None:
        event = {"step": step, **{k: jsonable(v) for k, v in metrics.items()}}
        with (self.path / METRICS).open("a") as f:
            f.write(json.dumps(event) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        """The events sorted by step, events of one step merged; [] if none. A line cut short
        (the last line of a killed run) is skipped."""
        path = self.path / METRICS
        if not path.is_file():
            return []
        by_step: dict[int, dict[str, Any]] = {}
        for line in path.read_text().splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(event, dict) and isinstance(event.get("step"), int | float):
                by_step.setdefault(int(event["step"]), {}).update(floats(event))
        return [{**event, "step": step} for step, event in sorted(by_step.items())]

    def drop_metrics_after(self, step: int) -> None:
        """On resume, forget events past the checkpoint (they are recomputed identically); the
        file is replaced atomically, so a kill here loses nothing."""
        path = self.path / METRICS
        if not path.is_file():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line cut short by a kill
        write_atomic(path, "".join(f"{line}\n" for line in kept))

    # ----------------------------------------------------------------------------- config

    def overrides(self) -> tuple[str, ...] | None:
        try:
            overrides = yaml.safe_load((self.path / OVERRIDES).read_text())
        except (OSError, yaml.YAMLError):
            return None
        return tuple(map(str, overrides)) if isinstance(overrides, list) else None

    def wandb_id(self, new_id: str) -> str:
        """The run's W&B id: the one stored on the first start, so a resume continues it."""
        path = self.path / WANDB_ID
        if not path.exists():
            write_atomic(path, new_id)
        return path.read_text().strip()

    # ------------------------------------------------------------------- input statistics

    def save_input_stats(self, arrays: dict[str, Any]) -> None:
        """The arrays the run normalizes its inputs with (name -> array), as they are used."""
        buffer = io.BytesIO()
        np.savez(buffer, **{name: np.asarray(value) for name, value in arrays.items()})
        self.path.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path / INPUT_STATS, buffer.getvalue())

    def input_stats(self) -> dict[str, np.ndarray] | None:
        """`save_input_stats`'s arrays; None for a run trained before they were saved."""
        path = self.path / INPUT_STATS
        if not path.is_file():
            return None
        with np.load(path, allow_pickle=False) as saved:
            return {name: saved[name] for name in saved.files}

    # ------------------------------------------------------------------------- resuming

    def start_config(self) -> dict[str, Any] | None:
        """The resolved config of the run's first start, or None before it."""
        path = self.path / START_CONFIG
        if not path.is_file():
            return None
        loaded = yaml.safe_load(path.read_text())
        return loaded if isinstance(loaded, dict) else None

    def save_start_config(self, config: dict[str, Any], replace: bool = False) -> None:
        """Keep the first start's config; a later start replaces it only when nothing was
        trained yet (`replace`)."""
        self.path.mkdir(parents=True, exist_ok=True)
        if replace or not (self.path / START_CONFIG).exists():
            write_atomic(self.path / START_CONFIG, yaml.safe_dump(config, sort_keys=False))

    def record_changes(self, step: int, changes: dict[str, list[Any]]) -> None:
        with (self.path / CHANGES).open("a") as f:
            f.write(json.dumps({"step": step, "changes": changes}) + "\n")

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """One process per run directory: an advisory lock the OS releases when its holder
        dies, so a killed run leaves no stale lock. Raises RunDirBusy naming the holder."""
        self.path.mkdir(parents=True, exist_ok=True)
        # A raw descriptor: nothing in the process (logging set-up, captured streams) closes it.
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
                raise RunDirBusy(f"{self.path} is in use by {holder or 'another process'}; "
                                 "wait for it to end, or train in another hydra.run.dir") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}".encode(), 0)
            try:
                yield
            finally:
                os.ftruncate(fd, 0)
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    # ------------------------------------------------------------------------ checkpoints

    def checkpointer(self, kind: str = CHECKPOINTS, keep: int | None = None) -> Any:
        """An Orbax-backed Checkpointer of `checkpoints/`, `best/` or `snapshots/`."""
        from cnnlab.runs.checkpoint import Checkpointer

        return Checkpointer(self.path / kind, keep)

    def checkpoint_steps(self, kind: str = CHECKPOINTS) -> list[int]:
        """Steps saved under `kind/`, without opening Orbax (finished folders only: Orbax
        writes into a temporary name and renames it when complete)."""
        folder = self.path / kind
        if not folder.is_dir():
            return []
        return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


class FollowerRunDir(RunDir):
    """The run directory as a multi-host job's other processes see it: they read it and take
    part in its (collective) Orbax checkpoints, but only process 0 writes its files and holds
    its lock, so the files are written once."""

    writes = False

    def write_summary(self, summary: dict[str, Any]) -> dict[str, Any]:
        return {k: jsonable(v) for k, v in summary.items()}

    def append_metrics(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def drop_metrics_after(self, step: int) -> None:
        pass

    def save_start_config(self, config: dict[str, Any], replace: bool = False) -> None:
        pass

    def record_changes(self, step: int, changes: dict[str, list[Any]]) -> None:
        pass

    def save_input_stats(self, arrays: dict[str, Any]) -> None:
        pass

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        yield


def is_run_dir(path: Path) -> bool:
    return (Path(path) / CONFIG).is_file()


def _natural_key(path: Path) -> tuple:
    # Job dirs are `<num>_<overrides>`: order 2_... before 10_..., as Hydra numbered them.
    parts = []
    for part in path.parts:
        number = re.match(r"\d+", part)
        parts.append((int(number.group()) if number else math.inf, part))
    return tuple(parts)


def find_run_dirs(root: Path) -> list[Path]:
    """`root` if it is a run dir, else the run dirs below it in job-number order."""
    root = Path(root)
    if is_run_dir(root):
        return [root]
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        here = Path(dirpath)
        if here != root and is_run_dir(here):
            found.append(here)
            dirnames.clear()  # checkpoints and wandb/ inside a run hold no runs
        else:
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    return sorted(found, key=lambda p: _natural_key(p.relative_to(root)))
