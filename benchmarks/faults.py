"""`make faults`: issue 13's fault scenarios, run through the real CLI as a user would, counted.

Every scenario starts real `cnnlab` processes on a ResNet-8 (width 4, 512 fashion_mnist images,
60 steps, a checkpoint every 10), injects one fault or one bad value, and is then judged:

- **user error**: exit 2, no traceback, and the last line of stderr is `cnnlab: ...`;
- **fault**: no traceback, one last `cnnlab: ...` line (or a clean finish), and then the
  *same command* run again finishes with the parameters-free history an uninterrupted run has:
  every step logged once, in order, with the same losses, and one W&B run id.

    python benchmarks/faults.py [--only NAME ...] [--out benchmarks/results/faults.md]

Needs TFDS_DATA_DIR (fashion_mnist); the full-disk and read-only scenarios need a tmpfs mount
(root) and are reported as skipped without one. About 15 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

C = ["model.depth=8", "model.width=4", "dataset.max_examples=512", "train.batch_size=32",
     "train.eval_batch_size=256", "progress=false", "train.steps=60", "train.steps_per_call=1",
     "train.log_every=1", "train.eval_every=20", "checkpoint.every=10"]
STEPS = list(range(1, 61))


@dataclasses.dataclass
class Result:
    name: str
    kind: str  # "user error" or "fault"
    problems: list[str]
    seconds: float
    skipped: str = ""

    @property
    def verdict(self) -> str:
        if self.skipped:
            return "skipped"
        return "ok" if not self.problems else "; ".join(self.problems)


def cnnlab(args: list[str], cwd: Path, **popen: object) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_SERVICE")}
    return subprocess.Popen([sys.executable, "-m", "cnnlab.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    process = cnnlab(args, cwd)
    out, err = process.communicate(timeout=600)
    return subprocess.CompletedProcess(args, process.returncode, out, err)


def one_line_end(result: subprocess.CompletedProcess, codes: tuple[int, ...]) -> list[str]:
    """What a user sees: the expected exit code, no traceback, a last `cnnlab:` line."""
    problems = []
    if "Traceback" in result.stderr or "Traceback" in result.stdout:
        lines = result.stderr.count("\n")
        problems.append(f"traceback ({lines} lines of stderr)")
    if result.returncode not in codes:
        problems.append(f"exit {result.returncode}, expected {'/'.join(map(str, codes))}")
    last = (result.stderr.strip().splitlines() or [""])[-1]
    if result.returncode and not last.startswith("cnnlab"):
        problems.append(f"last line {last[:80]!r}")
    return problems


def history(run_dir: Path) -> list[tuple[int, float]]:
    events = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            events.append((-1, float("nan")))  # a cut line left in the log
            continue
        if "train/loss" in event:
            events.append((event["step"], event["train/loss"]))
    return events


def recovers(run_dir: Path, cwd: Path, reference: Path) -> list[str]:
    """The same command again: it must finish with the uninterrupted run's history."""
    again = run(["train", *C, f"hydra.run.dir={run_dir}"], cwd)
    problems = [f"rerun: {p}" for p in one_line_end(again, (0,))]
    summary = json.loads((run_dir / "summary.json").read_text())
    if summary.get("status") != "finished":
        problems.append(f"rerun ends {summary.get('status')}: {summary.get('failure')}")
    got, want = history(run_dir), history(reference)
    if [s for s, _ in got] != [s for s, _ in want]:
        problems.append(f"data lost or repeated: steps {[s for s, _ in got][:8]}... "
                        f"({len(got)} events, {len(want)} expected)")
    elif got != want:
        problems.append("history differs from the uninterrupted run's")
    ids = {p.name.split("-")[-1] for p in (run_dir / "wandb").glob("offline-run-*")}
    if len(ids) > 1:
        problems.append(f"{len(ids)} W&B run ids")
    return problems


def wait_for(predicate: Callable[[], bool], process: subprocess.Popen, timeout: float = 300
             ) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def logged(run_dir: Path, step: int) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return any(json.loads(line).get("step", 0) >= step for line in
                       (run_dir / "metrics.jsonl").read_text().splitlines()[-3:])
        except (OSError, json.JSONDecodeError):
            return False
    return check


def saved(run_dir: Path, step: int) -> Callable[[], bool]:
    return lambda: (run_dir / "checkpoints" / str(step)).is_dir()


# ----------------------------------------------------------------------------------- faults


def signal_when(signum: int, when: Callable[[Path], Callable[[], bool]], codes: tuple[int, ...]
                ) -> Callable[[Path, Path], list[str]]:
    def scenario(work: Path, reference: Path) -> list[str]:
        run_dir = work / "run"
        process = cnnlab(["train", *C, f"hydra.run.dir={run_dir}"], work)
        if not wait_for(when(run_dir), process):
            return ["the fault point was never reached"]
        process.send_signal(signum)
        out, err = process.communicate(timeout=300)
        result = subprocess.CompletedProcess([], process.returncode, out, err)
        problems = [] if signum == signal.SIGKILL else one_line_end(result, codes)
        return problems + recovers(run_dir, work, reference)
    return scenario


def interrupted_run(run_dir: Path, cwd: Path) -> None:
    """A run stopped by SIGTERM once it has logged step 25 (it checkpoints at the boundary)."""
    process = cnnlab(["train", *C, f"hydra.run.dir={run_dir}"], cwd)
    wait_for(logged(run_dir, 25), process)
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=300)


def after_straight(damage: Callable[[Path], None]) -> Callable[[Path, Path], list[str]]:
    """Stop a run after step 25 (SIGTERM), damage its files, then resume it."""
    def scenario(work: Path, reference: Path) -> list[str]:
        run_dir = work / "run"
        interrupted_run(run_dir, work)
        damage(run_dir)
        return recovers(run_dir, work, reference)
    return scenario


def latest_checkpoint(run_dir: Path) -> Path:
    steps = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    return run_dir / "checkpoints" / str(steps[-1])


def largest_file(folder: Path) -> Path:
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def truncate_data(run_dir: Path) -> None:
    path = largest_file(latest_checkpoint(run_dir) / "state")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_bytes(run_dir: Path) -> None:
    path = largest_file(latest_checkpoint(run_dir) / "state")
    raw = bytearray(path.read_bytes())
    for i in range(len(raw) // 2, len(raw) // 2 + 64):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


def remove_named(name: str) -> Callable[[Path], None]:
    def damage(run_dir: Path) -> None:
        for path in latest_checkpoint(run_dir).rglob(name):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return damage


def junk_meta(run_dir: Path) -> None:
    for path in (latest_checkpoint(run_dir) / "meta").rglob("*"):
        if path.is_file():
            path.write_text("{not json")


def empty_file(run_dir: Path) -> None:
    largest_file(latest_checkpoint(run_dir) / "state").write_bytes(b"")


def cut_metrics_line(run_dir: Path) -> None:
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 31, "train/lo')


def cut_summary(run_dir: Path) -> None:
    (run_dir / "summary.json").write_text('{"status": "runn')


def no_summary(run_dir: Path) -> None:
    (run_dir / "summary.json").unlink()


def second_process(work: Path, reference: Path) -> list[str]:
    run_dir = work / "run"
    first = cnnlab(["train", *C, f"hydra.run.dir={run_dir}"], work)
    wait_for(logged(run_dir, 5), first)
    second = run(["train", *C, f"hydra.run.dir={run_dir}"], work)
    first.communicate(timeout=600)
    problems = [f"second: {p}" for p in one_line_end(second, (2,))]
    if first.returncode != 0:
        problems.append(f"first exit {first.returncode}")
    return problems + recovers(run_dir, work, reference)


def changed_value(override: str) -> Callable[[Path, Path], list[str]]:
    """Resume with one value changed and no resume.allow_changes: refused, nothing written."""
    def scenario(work: Path, reference: Path) -> list[str]:
        run_dir = work / "run"
        interrupted_run(run_dir, work)
        changed = run(["train", *C, override, f"hydra.run.dir={run_dir}"], work)
        problems = one_line_end(changed, (2,))
        if (run_dir / "changes.jsonl").exists():
            problems.append("changes.jsonl written by a refused change")
        return problems + recovers(run_dir, work, reference)  # the same command still resumes
    return scenario


def finished_changed(override: str) -> Callable[[Path, Path], list[str]]:
    """Rerun a finished run with one value changed: refused, its summary and history untouched
    (before the fix, the old run's summary came back as the new config's result, exit 0)."""
    def scenario(work: Path, reference: Path) -> list[str]:
        run_dir = work / "run"
        first = run(["train", *C, f"hydra.run.dir={run_dir}"], work)
        if first.returncode != 0:
            return [f"the first run failed: exit {first.returncode}"]
        summary = (run_dir / "summary.json").read_text()
        changed = run(["train", *C, override, f"hydra.run.dir={run_dir}"], work)
        problems = one_line_end(changed, (2,))
        if (run_dir / "summary.json").read_text() != summary:
            problems.append("summary.json rewritten by a refused change")
        return problems + recovers(run_dir, work, reference)
    return scenario


def with_tmpfs(fill: bool) -> Callable[[Path, Path], list[str]]:
    """A run on a tmpfs that is full, or read-only, from the start of a resume."""
    def scenario(work: Path, reference: Path) -> list[str]:
        disk = work / "disk"
        disk.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)],
                          capture_output=True).returncode:
            raise Skip("cannot mount a tmpfs (needs root)")
        try:
            run_dir = disk / "run"
            interrupted_run(run_dir, work)
            if fill:
                with (disk / "filler").open("wb") as f:
                    try:
                        while True:
                            f.write(b"\0" * (1 << 20))
                            f.flush()
                    except OSError:
                        pass
            else:
                subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
            blocked = run(["train", *C, f"hydra.run.dir={run_dir}"], work)
            problems = one_line_end(blocked, (1, 2))
            if fill:
                (disk / "filler").unlink()
            else:
                subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)
            return problems + recovers(run_dir, work, reference)
        finally:
            subprocess.run(["umount", "-l", str(disk)], check=False)
    return scenario


class Skip(Exception):
    pass


# ----------------------------------------------------------------------------- user errors


def refused(*args: str, setup: Callable[[Path], None] | None = None
            ) -> Callable[[Path, Path], list[str]]:
    def scenario(work: Path, reference: Path) -> list[str]:
        if setup is not None:
            setup(work)
        words = [a.replace("{work}", str(work)) for a in args]
        if words and words[0] in ("compare", "eval"):
            result = run(words, work)
        else:
            result = run(["train", *C, *words, f"hydra.run.dir={work / 'run'}"], work)
        return one_line_end(result, (2,))
    return scenario


def file_as_run_dir(work: Path) -> None:
    (work / "run").write_text("not a folder")


def bad_saved_config(work: Path) -> None:
    (work / "old" / ".hydra").mkdir(parents=True)
    (work / "old" / ".hydra" / "config.yaml").write_text("model: [unclosed\n")


def damaged_shard(size: int) -> Callable[[Path], None]:
    def setup(work: Path) -> None:
        copy = work / "tfds"
        shutil.copytree(os.environ["TFDS_DATA_DIR"], copy)
        for shard in copy.rglob("fashion_mnist-test.array_record-*"):
            shard.chmod(0o644)
            with open(shard, "r+b") as f:
                f.truncate(size)
    return setup


def empty_data_dir(work: Path) -> None:
    (work / "empty").mkdir()


SCENARIOS: dict[str, tuple[str, Callable[[Path, Path], list[str]]]] = {
    **{f"SIGKILL after step {k}": ("fault", signal_when(signal.SIGKILL,
                                                        lambda d, k=k: logged(d, k), ()))
       for k in (1, 9, 10, 11, 25, 40, 59)},
    **{f"SIGKILL once checkpoint {k} exists": (
        "fault", signal_when(signal.SIGKILL, lambda d, k=k: saved(d, k), ()))
       for k in (10, 30, 60)},
    **{f"{signal.Signals(s).name} after step {k}": (
        "fault", signal_when(s, lambda d, k=k: logged(d, k), (128 + s,)))
       for s in (signal.SIGINT, signal.SIGTERM) for k in (5, 30)},
    "SIGINT once checkpoint 60 exists": (
        "fault", signal_when(signal.SIGINT, lambda d: saved(d, 60), (0, 130))),
    "latest checkpoint: data file cut in half": ("fault", after_straight(truncate_data)),
    "latest checkpoint: 64 bytes flipped": ("fault", after_straight(flip_bytes)),
    "latest checkpoint: data file emptied": ("fault", after_straight(empty_file)),
    "latest checkpoint: manifest removed": ("fault", after_straight(remove_named("manifest*"))),
    "latest checkpoint: _METADATA removed": ("fault", after_straight(remove_named("_METADATA"))),
    "latest checkpoint: junk in meta": ("fault", after_straight(junk_meta)),
    "metrics.jsonl: cut last line": ("fault", after_straight(cut_metrics_line)),
    "summary.json: cut": ("fault", after_straight(cut_summary)),
    "summary.json: removed": ("fault", after_straight(no_summary)),
    "two processes on one run directory": ("fault", second_process),
    "resume with optimizer.lr=0.5": ("fault", changed_value("optimizer.lr=0.5")),
    "resume with model.width=8": ("fault", changed_value("model.width=8")),
    "finished run rerun with model.width=8": ("fault", finished_changed("model.width=8")),
    "disk full at resume": ("fault", with_tmpfs(fill=True)),
    "read-only run directory": ("fault", with_tmpfs(fill=False)),
    "augment.cutout=100": ("user error", refused("augment.cutout=100")),
    "augment.crop_pad=100": ("user error", refused("augment.crop_pad=100")),
    "norm.momentum=2": ("user error", refused("norm.momentum=2")),
    "seed=2**40": ("user error", refused(f"seed={2**40}")),
    "+train.stepz=100": ("user error", refused("+train.stepz=100")),
    "++train.stepz=5": ("user error", refused("++train.stepz=5")),
    "optimizer.lr=inf": ("user error", refused("optimizer.lr=inf")),
    "train.divergence_threshold=nan": ("user error", refused("train.divergence_threshold=nan")),
    "model=resnet21 (unknown)": ("user error", refused("model=resnet21")),
    "model.depth=9 (no such ResNet)": ("user error", refused("model.depth=9")),
    "model.depth=8,20 without -m": ("user error", refused("model.depth=8,20")),
    "optimizer=adamx": ("user error", refused("optimizer=adamx")),
    "train.steps=-1": ("user error", refused("train.steps=-1")),
    "train.batch_size=0": ("user error", refused("train.batch_size=0")),
    "train.steps=ten": ("user error", refused("train.steps=ten")),
    "dataset.name=no_such_dataset": ("user error", refused("dataset.name=no_such_dataset")),
    "run directory is a file": ("user error", refused(setup=file_as_run_dir)),
    "offline dataset, empty data dir": (
        "user error", refused("dataset=cifar10", "dataset.data_dir={work}/empty",
                              setup=empty_data_dir)),
    "TFDS shard truncated": ("user error", refused("dataset.data_dir={work}/tfds",
                                                   setup=damaged_shard(1_000_000))),
    "TFDS shard empty": ("user error", refused("dataset.data_dir={work}/tfds",
                                               setup=damaged_shard(0))),
    "compare: malformed .hydra/config.yaml": (
        "user error", refused("compare", "{work}/old", setup=bad_saved_config)),
    "eval: malformed .hydra/config.yaml": (
        "user error", refused("eval", "{work}/old", setup=bad_saved_config)),
    "eval: not a run directory": ("user error", refused("eval", "{work}")),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="scenario names (substrings)")
    parser.add_argument("--out", type=Path, help="write the table (Markdown) here too")
    args = parser.parse_args()
    chosen = {n: s for n, s in SCENARIOS.items()
              if not args.only or any(o in n for o in args.only)}
    with tempfile.TemporaryDirectory(prefix="cnnlab-faults-") as root:
        reference = Path(root) / "reference"
        straight = run(["train", *C, f"hydra.run.dir={reference}"], Path(root))
        assert straight.returncode == 0, straight.stderr[-2000:]
        assert [s for s, _ in history(reference)] == STEPS
        results = []
        for name, (kind, scenario) in chosen.items():
            work = Path(root) / f"s{len(results)}"
            work.mkdir()
            start = time.perf_counter()
            try:
                problems, skipped = scenario(work, reference), ""
            except Skip as why:
                problems, skipped = [], str(why)
            except Exception as error:  # the harness itself must report, not stop
                problems, skipped = [f"harness: {type(error).__name__}: {error}"], ""
            results.append(Result(name, kind, problems, time.perf_counter() - start, skipped))
            print(f"{results[-1].seconds:6.1f}s  {kind:10}  {name}: {results[-1].verdict}",
                  flush=True)
    table = ["| scenario | kind | outcome | s |", "|---|---|---|---|"]
    table += [f"| {r.name} | {r.kind} | {r.verdict} | {r.seconds:.0f} |" for r in results]
    ran = [r for r in results if not r.skipped]
    failed = [r for r in ran if r.problems]
    tracebacks = sum(any("traceback" in p for p in r.problems) for r in ran)
    lost = sum(any("lost" in p or "differs" in p for p in r.problems) for r in ran)
    counts = (f"{len(ran)} scenarios run ({len(results) - len(ran)} skipped): "
              f"{len(ran) - len(failed)} as expected, {tracebacks} with a traceback, "
              f"{lost} with data lost or changed, {len(failed)} not as expected in all")
    print(counts)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join([f"# Fault scenarios\n\n{counts}\n", *table]) + "\n")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
