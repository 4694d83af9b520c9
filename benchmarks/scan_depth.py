"""Compile time and throughput of CIFAR ResNets by depth, scanned (`model.scan_blocks=true`) and
unrolled, with the runner's real compiled chunk on random 32x32x3 images (batch 128 unless told).

    python benchmarks/scan_depth.py                       # depths 20, 56, 110, 1202
    python benchmarks/scan_depth.py --depths 20 56 --steps-per-call 1 10
    python benchmarks/scan_depth.py --depths 20 1202 --batch 32 --scanned-only

Each setting runs in its own process (one JSON line each); `compile s` is the first call's time
beyond a steady call's, `init s` builds the run (data on the device, variables initialized).
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Timed calls per setting: enough for a steady figure, few for the slow deep nets.
CALLS = {20: 20, 56: 6, 110: 3, 1202: 1}


def measure(depth: int, scan: bool, steps_per_call: int, calls: int, batch: int) -> dict:
    """One setting, in this process: what `main` runs in a child."""
    import jax

    from benchmarks.bench_cnnlab import synthetic_dataset
    from cnnlab.cli.preflight import compose
    from cnnlab.training.build import build

    cfg = compose(["model=resnet110", f"model.depth={depth}", f"model.scan_blocks={scan}",
                   "dataset=cifar10", f"train.batch_size={batch}",
                   f"train.steps_per_call={steps_per_call}"])
    start = time.perf_counter()
    run = build(cfg, synthetic_dataset(2_000, (32, 32, 3), 10))
    state, data, chunk = run.state, run.train_data, run.train_chunk
    jax.block_until_ready(state)
    init_s = time.perf_counter() - start
    times = []
    for _ in range(2 + calls):
        start = time.perf_counter()
        state, sums = chunk(state, data, steps_per_call)
        jax.block_until_ready((state, sums))
        times.append(time.perf_counter() - start)
    steady = sorted(times[1:])[len(times[1:]) // 2]
    return {"depth": depth, "scan": scan, "steps_per_call": steps_per_call, "init_s": init_s,
            "compile_s": times[0] - steady, "images_per_sec": batch * steps_per_call / steady,
            "batch": batch}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[20, 56, 110, 1202])
    parser.add_argument("--steps-per-call", type=int, nargs="+", default=[1])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--scanned-only", action="store_true")
    parser.add_argument("--child", nargs=5, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/scan_depth.json")
    args = parser.parse_args(argv)
    if args.child:
        depth, scan, steps, calls, batch = args.child
        print(json.dumps(measure(depth, bool(scan), steps, calls, batch)), flush=True)
        return
    rows = []
    for depth in args.depths:
        for steps in args.steps_per_call:
            # 1202 layers unrolled would compile 600 blocks: the point of the scan.
            for scan in (False, True) if depth < 1000 and not args.scanned_only else (True,):
                child = [sys.executable, "-m", "benchmarks.scan_depth", "--child", str(depth),
                         str(int(scan)), str(steps), str(CALLS.get(depth, 3)),
                         str(args.batch)]
                out = subprocess.run(child, cwd=ROOT, capture_output=True, text=True, check=True)
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(json.dumps(rows[-1]), flush=True)
    print("\n| depth | batch | steps/call | blocks | init s | compile s | img/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        blocks = "scan" if r["scan"] else "unrolled"
        print(f"| {r['depth']} | {r['batch']} | {r['steps_per_call']} | {blocks} | "
              f"{r['init_s']:.1f} | {r['compile_s']:.1f} | {r['images_per_sec']:.1f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
