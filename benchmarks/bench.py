"""`make bench`: the benchmark suite, cnnlab's training throughput beside PyTorch's, same machine.

Entries (benchmarks/suite.py): ResNet-20/56/110 and VGG-11 on 32x32x3 (batch 128), ResNet-18
and ResNet-50 on 224x224x3 (batch 16, 1000 classes). Each entry trains with cnnlab's real
compiled chunk (benchmarks/bench_cnnlab.py), with PyTorch eager and with torch.compile
(benchmarks/torch_suite.py), every (entry, framework) in its own process so that its peak
memory is its own. Reported: images/s and median step time (after warm-up), compile time,
peak memory and the parameter counts (which must agree), as markdown and JSON, after a
description of the machine.

    python benchmarks/bench.py                                  # the whole suite
    python benchmarks/bench.py --models resnet20 vgg11 --frameworks cnnlab eager
    python benchmarks/bench.py --models resnet56 --variant spc1=train.steps_per_call=1
    python benchmarks/bench.py --quick --models resnet20         # seconds, for smoke tests
    python benchmarks/bench.py --models resnet56 --frameworks cnnlab eager --rounds 3

`--rounds N` runs every (entry, framework) N times, the frameworks' order reversed each round,
and reports each framework's median run: on a machine whose speed drifts (a shared VM's slow
spells cost one run 20% and spare the next), one run per framework compares whichever spell
each happened to meet.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:  # run as a script: `benchmarks` must be importable
    sys.path.insert(0, str(REPO))

from benchmarks.suite import (  # noqa: E402
    ENTRIES,
    FRAMEWORKS,
    alternating_orders,
    positive_int,
    usable_cores,
)
from cnnlab import host_memory  # noqa: E402

CHILD = {"cnnlab": ["benchmarks.bench_cnnlab"], "eager": ["benchmarks.torch_suite"],
         "compiled": ["benchmarks.torch_suite", "--compile"]}
PACKAGES = ("jax", "jaxlib", "flax", "optax", "torch", "torchvision", "numpy")


@dataclasses.dataclass(frozen=True)
class Variant:
    """A row's cnnlab config: the suite's overrides plus its own (empty for the base row)."""
    label: str
    overrides: tuple[str, ...]


def parse_variant(text: str) -> Variant:
    """`label=override [override ...]`, e.g. `scan=model.scan_blocks=true`."""
    label, sep, overrides = text.partition("=")
    if not sep or not label or not overrides.strip():
        raise argparse.ArgumentTypeError(f"--variant wants LABEL=OVERRIDE..., got {text!r}")
    return Variant(label, tuple(shlex.split(overrides)))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=list(ENTRIES), default=list(ENTRIES))
    p.add_argument("--frameworks", nargs="+", choices=FRAMEWORKS, default=list(FRAMEWORKS))
    p.add_argument("--steps", type=int, help="timed steps of every run (default: per entry)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default: per entry)")
    p.add_argument("--quick", action="store_true", help="batch 8 and 2 steps: a smoke test")
    p.add_argument("--overrides", nargs="+", default=[],
                   help="cnnlab config overrides for every cnnlab run (train.steps_per_call=1)")
    p.add_argument("--variant", type=parse_variant, action="append", default=[],
                   help="LABEL=OVERRIDE...: one more cnnlab row per entry with these overrides")
    p.add_argument("--rounds", type=positive_int, default=1,
                   help="runs of every (entry, framework), alternating; the median is reported")
    p.add_argument("--threads", type=int, help="PyTorch threads (default: usable cores)")
    p.add_argument("--torch-huge-pages", action="store_true",
                   help="run PyTorch with the glibc.malloc.hugetlb=1 that the cnnlab command "
                        "sets for itself (default: as a PyTorch script starts)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "bench.json",
                   help="the JSON; the markdown goes beside it (.md)")
    return p.parse_args(argv)


def child_command(framework: str, model: str, args: argparse.Namespace,
                  overrides: tuple[str, ...]) -> list[str]:
    cmd = [sys.executable, "-m", *CHILD[framework], "--model", model]
    cmd += ["--quick"] if args.quick else []
    cmd += [] if args.steps is None else ["--steps", str(args.steps)]
    cmd += [] if args.warmup is None else ["--warmup", str(args.warmup)]
    if framework == "cnnlab" and overrides:
        cmd += ["--overrides", *overrides]
    if framework != "cnnlab" and args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    return cmd


def child_env(framework: str, args: argparse.Namespace) -> dict[str, str]:
    """The child's environment: cnnlab's runs get the huge pages the `cnnlab` command restarts
    itself with (cnnlab/host_memory.py), PyTorch's only with --torch-huge-pages."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    if framework == "cnnlab" or args.torch_huge_pages:
        tunables = host_memory.command_tunables(env)
        env |= {"GLIBC_TUNABLES": tunables} if tunables else {}
    return env


def run_child(cmd: list[str], env: dict[str, str]) -> dict:
    """The child's JSON line, or {"error": ...} with the end of its stderr."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    wall = time.perf_counter() - t0
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"error": "\n".join(proc.stderr.strip().splitlines()[-15:]), "wall_s": wall}
    return {**json.loads(lines[-1]), "wall_s": wall}


def log_result(what: str, result: dict) -> None:
    if "error" in result:
        print(f"{what}: FAILED\n{result['error']}", file=sys.stderr, flush=True)
    else:
        print(f"{what}: {result['images_per_sec']:.1f} img/s, {result['wall_s']:.0f} s in all",
              file=sys.stderr, flush=True)


def run_entry(model: str, args: argparse.Namespace) -> list[dict]:
    """The rows of one entry: the base row and one per variant, the PyTorch runs shared. With
    `args.rounds` > 1 every run is repeated, the order of the runs reversed each round so that
    no framework always runs first, and each keeps its median run (`median_run`)."""
    variants = [Variant("", ()), *args.variant]
    jobs = [(f, None) for f in args.frameworks if f != "cnnlab"]
    jobs += [("cnnlab", v) for v in variants] if "cnnlab" in args.frameworks else []
    runs: dict[tuple, list[dict]] = {job: [] for job in jobs}
    for round_index, order in enumerate(alternating_orders(jobs, args.rounds)):
        for framework, variant in order:
            overrides = (*args.overrides, *variant.overrides) if variant else ()
            result = run_child(child_command(framework, model, args, overrides),
                               child_env(framework, args))
            runs[framework, variant].append(result)
            label = f" {variant.label}" if variant and variant.label else ""
            of = f" (round {round_index + 1}/{args.rounds})" if args.rounds > 1 else ""
            log_result(f"{model}{label} {framework}{of}", result)
    torch_runs = {f: median_run(runs[f, None]) for f, v in jobs if v is None}
    rows = []
    for variant in variants:
        row = {"model": model, "variant": variant.label,
               "overrides": [*args.overrides, *variant.overrides], **torch_runs}
        if "cnnlab" in args.frameworks:
            row["cnnlab"] = median_run(runs["cnnlab", variant])
        rows.append(finish_row(row))
    return rows


def median_run(results: list[dict]) -> dict:
    """The run of median images/s (of an even number, the slower of the middle two), with
    every round's images/s and step time beside it (`rounds`, in the order they ran); the
    first failed run if any failed. One run is returned as it is."""
    if len(results) == 1:
        return results[0]
    failed = [r for r in results if "error" in r]
    if failed:
        return failed[0]
    ranked = sorted(results, key=lambda r: r["images_per_sec"])
    rounds = [{"images_per_sec": r["images_per_sec"], "step_ms_median": r["step_ms_median"]}
              for r in results]
    return {**ranked[(len(ranked) - 1) // 2], "rounds": rounds}


def finish_row(row: dict) -> dict:
    """The row's shared fields, and whether its frameworks' parameter counts agree."""
    runs = [row[f] for f in FRAMEWORKS if f in row and "error" not in row[f]]
    counts = sorted({r["params"] for r in runs})
    first = runs[0] if runs else {}
    return {**row, "input": first.get("input"), "batch_size": first.get("batch_size"),
            "params": counts[0] if len(counts) == 1 else counts or None,
            "params_match": len(counts) <= 1}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_generation(cpuinfo: str) -> str | None:
    """The first CPU's family and model numbers and its widest vector instructions, from
    /proc/cpuinfo's text: "AMD EPYC" alone names Zen 4 and Zen 5 machines alike, whose
    timings differ by 2x (2026-12-06)."""
    fields = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            if fields:
                break  # the first processor's block has ended
            continue
        fields.setdefault(key.strip(), value.strip())
    if "cpu family" not in fields or "model" not in fields:
        return None
    flags = set(fields.get("flags", "").split())
    vector = next((name for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"))
                   if flag in flags), None)
    return ", ".join([f"family {fields['cpu family']} model {fields['model']}",
                      *([vector] if vector else [])])


def _cpu_generation() -> str | None:
    try:
        return cpu_generation(Path("/proc/cpuinfo").read_text())
    except OSError:
        return None


def _ram_gib() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _gpus() -> list[str]:
    """The NVIDIA GPUs nvidia-smi lists (none where it is missing): asked without importing
    jax or torch here, whose first use of a GPU would hold memory the children then lack."""
    if shutil.which("nvidia-smi") is None:
        return []
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout
    return [line.strip() for line in out.splitlines() if line.startswith("GPU")]


def _git_commit() -> str | None:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True, cwd=REPO)
    return out.stdout.strip() or None


def describe_machine(rows: list[dict]) -> dict:
    devices = sorted({f"{f}: {row[f]['device']}" for row in rows for f in FRAMEWORKS
                      if f in row and "device" in row[f]})
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(), "os": platform.platform(), "python": platform.python_version(),
        "cpu": _cpu_model(), "cpu_generation": _cpu_generation(),
        "cpu_count": os.cpu_count(), "usable_cores": usable_cores(),
        "ram_gib": _ram_gib(), "load_average": os.getloadavg(), "gpus": _gpus(),
        "devices": devices, "versions": {p: _version(p) for p in PACKAGES},
        "commit": _git_commit(), "thp_mode": host_memory.thp_mode(),
    }


def _gpu_line(machine: dict, rows: list[dict]) -> str:
    used = any(row[f].get("platform") == "gpu" for row in rows for f in FRAMEWORKS if f in row)
    if used:
        return f"GPU: measured ({', '.join(machine['gpus']) or 'see devices'})"
    if machine["gpus"]:
        return f"GPU: not measured (present but unused: {', '.join(machine['gpus'])})"
    return "GPU: not measured (no GPU on this machine)"


def _huge_pages_line(machine: dict, rows: list[dict]) -> str:
    runs = {f: {row[f].get("host_huge_pages") for row in rows if f in row and "error" not in row[f]}
            for f in FRAMEWORKS}
    said = [f"{f} {'on' if seen == {True} else 'off' if seen == {False} else 'mixed'}"
            for f, seen in runs.items() if seen and None not in seen]
    return (f"Host huge pages (the kernel's THP mode: {machine.get('thp_mode') or 'none'}): "
            f"{', '.join(said) or 'not reported'} (cnnlab/host_memory.py; "
            "PyTorch as a script starts unless --torch-huge-pages)")


def machine_markdown(machine: dict, rows: list[dict]) -> list[str]:
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v)
    ram = f"{machine['ram_gib']:.1f} GiB" if machine["ram_gib"] else "unknown"
    load = ", ".join(f"{x:.2f}" for x in machine["load_average"])
    generation = f" ({machine['cpu_generation']})" if machine.get("cpu_generation") else ""
    return [
        f"Machine: {machine['cpu']}{generation}, {machine['cpu_count']} CPUs "
        f"({machine['usable_cores']} usable by this process), {ram} RAM; {machine['os']}, "
        f"Python {machine['python']}",
        f"Versions: {versions}; cnnlab commit {machine['commit']}",
        f"Devices: {'; '.join(machine['devices']) or 'none ran'}",
        _gpu_line(machine, rows),
        _huge_pages_line(machine, rows),
        f"Date: {machine['date']}; load average (1, 5, 15 min) at the start "
        f"{machine['load_at_start']:.2f}, at the end: {load}",
        *([BUSY] if machine["load_at_start"] >= 0.5 else []),
    ]


# Measured on a 2-core machine with one core busy elsewhere: PyTorch eager ResNet-20 took 3 s a
# step with 2 threads against 40 ms with 1, its threads waiting on each other op after op.
BUSY = ("**Warning: the machine was not idle at the start; every figure may be slowed down by "
        "other processes, PyTorch's multi-threaded ones most (`--threads 1` avoids that).**")


def _num(run: dict | None, key: str, fmt: str = "{:.0f}") -> str:
    if run is None:
        return "-"
    if "error" in run:
        return "failed"
    return "-" if run.get(key) is None else fmt.format(run[key])


def _ratio(row: dict, a: str, b: str) -> str:
    ra, rb = row.get(a), row.get(b)
    if not ra or not rb or "error" in ra or "error" in rb:
        return "-"
    return f"{ra['images_per_sec'] / rb['images_per_sec']:.2f}x"


def _label(row: dict) -> str:
    return f"{row['model']} [{row['variant']}]" if row["variant"] else row["model"]


def _params(row: dict) -> str:
    if row["params_match"]:
        return f"{row['params']:,}" if row["params"] is not None else "-"
    return "MISMATCH " + " / ".join(f"{p:,}" for p in row["params"])


def results_markdown(rows: list[dict]) -> list[str]:
    lines = [
        "| model | input | batch | params | cnnlab img/s | eager img/s | compiled img/s "
        "| cnnlab/eager | cnnlab/compiled | cnnlab compile s | torch.compile s "
        "| cnnlab peak MiB | eager peak MiB | compiled peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        c, e, t = (row.get(f) for f in FRAMEWORKS)
        lines.append(
            f"| {_label(row)} | {row['input']} | {row['batch_size']} | {_params(row)} "
            f"| {_num(c, 'images_per_sec', '{:.1f}')} | {_num(e, 'images_per_sec', '{:.1f}')} "
            f"| {_num(t, 'images_per_sec', '{:.1f}')} | {_ratio(row, 'cnnlab', 'eager')} "
            f"| {_ratio(row, 'cnnlab', 'compiled')} | {_num(c, 'compile_s')} "
            f"| {_num(t, 'compile_s')} | {_num(c, 'peak_mib')} | {_num(e, 'peak_mib')} "
            f"| {_num(t, 'peak_mib')} |")
    lines += ["", "| model | cnnlab steps/call | cnnlab step ms | eager step ms | compiled step ms "
              "| cnnlab overrides |", "|---|---|---|---|---|---|"]
    for row in rows:
        c, e, t = (row.get(f) for f in FRAMEWORKS)
        lines.append(f"| {_label(row)} | {_num(c, 'steps_per_call')} "
                     f"| {_num(c, 'step_ms_median')} | {_num(e, 'step_ms_median')} "
                     f"| {_num(t, 'step_ms_median')} | {' '.join(row['overrides']) or '-'} |")
    return lines


def _per_round(run: dict | None) -> str:
    """Every round's images/s of one framework's run, marked as `_num` marks a missing or
    failed run."""
    if run is None:
        return "-"
    if "error" in run:
        return "failed"
    return ", ".join(f"{r['images_per_sec']:.1f}" for r in run.get("rounds", [run]))


def _round_ratios(row: dict) -> str:
    """cnnlab's images/s over eager's, round by round (the two ran minutes apart)."""
    c, e = row.get("cnnlab"), row.get("eager")
    if not c or not e or "error" in c or "error" in e:
        return "-"
    return ", ".join(f"{a['images_per_sec'] / b['images_per_sec']:.2f}x"
                     for a, b in zip(c.get("rounds", [c]), e.get("rounds", [e]), strict=True))


def rounds_markdown(rows: list[dict]) -> list[str]:
    """Every round's images/s, where the suite ran more than one (--rounds)."""
    if not any("rounds" in row[f] for row in rows for f in FRAMEWORKS if f in row):
        return []
    lines = ["", "Rounds (images/s in the order they ran; the tables above give each "
             "framework's median run):", "",
             "| model | cnnlab img/s | eager img/s | compiled img/s | cnnlab/eager by round |",
             "|---|---|---|---|---|"]
    for row in rows:
        c, e, t = (row.get(f) for f in FRAMEWORKS)
        lines.append(f"| {_label(row)} | {_per_round(c)} | {_per_round(e)} | {_per_round(t)} "
                     f"| {_round_ratios(row)} |")
    return lines


def failures_markdown(rows: list[dict]) -> list[str]:
    """The last line of each failed run's stderr (the JSON holds 15)."""
    failed = [f"- {_label(row)} {f}: {row[f]['error'].splitlines()[-1] if row[f]['error'] else '?'}"
              for row in rows for f in FRAMEWORKS if f in row and "error" in row[f]]
    return ["", "Failed runs:", *failed] if failed else []


def markdown(machine: dict, rows: list[dict]) -> str:
    peak = ("Peak memory: on the CPU the peak RSS of the run's own process (model, data, "
            "compiler and runtime included); on a GPU the device's peak bytes in use (jax) or "
            "torch.cuda.max_memory_allocated. Compile s: the warm-up's time beyond that of as "
            "many steady-state steps. Step ms: the median timed step.")
    return "\n".join(["# cnnlab benchmark suite", "", *machine_markdown(machine, rows), "",
                      *results_markdown(rows), *rounds_markdown(rows), *failures_markdown(rows),
                      "", peak, ""])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_at_start = os.getloadavg()[0]
    rows = [row for model in args.models for row in run_entry(model, args)]
    machine = {**describe_machine(rows), "load_at_start": load_at_start}
    text = markdown(machine, rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "variant")}
    settings["variants"] = [dataclasses.asdict(v) for v in args.variant]
    args.out.write_text(json.dumps({"machine": machine, "settings": settings, "rows": rows},
                                   indent=2) + "\n")
    args.out.with_suffix(".md").write_text(text)
    print(text)
    print(f"results: {args.out} and {args.out.with_suffix('.md')}", file=sys.stderr)
    failed = [r for r in rows if not r["params_match"]
              or any("error" in r[f] for f in FRAMEWORKS if f in r)]
    if failed:
        print(f"{len(failed)} row(s) failed or disagree on the parameter count",
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
