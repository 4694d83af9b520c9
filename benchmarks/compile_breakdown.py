"""Where a training chunk's compile time goes: trace and lowering against XLA's compile, the
program's size before and after XLA's optimizations, and the state's array counts.

    python benchmarks/compile_breakdown.py                          # ResNet-20, -56, -110
    python benchmarks/compile_breakdown.py --models resnet110 --per-block

Each model is measured in a fresh process (no compile cache, no warmed caches): `build.build`'s
real `train_chunk` on random 32x32x3 images, `.lower()` then `.compile()`, each timed in wall
and CPU seconds (the CPU figure is the one to compare on a shared machine). `--per-block` keeps
a scanned model's blocks unstacked in the steps (the layout before issue 38's fix,
cnnlab/models/scan.py). Results in docs/speed.md.
"""

import argparse
import collections
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _ops(text: str, pattern: str) -> list:
    return collections.Counter(re.findall(pattern, text)).most_common(8)


def measure(model: str, steps_per_call: int, batch: int, per_block: bool) -> dict:
    """One model, in this process: what `main` runs in a child."""
    import jax

    from benchmarks.bench_cnnlab import synthetic_dataset
    from cnnlab.cli.preflight import compose
    from cnnlab.training import build, steps

    if per_block:
        plain = steps.make_train_chunk
        steps.make_train_chunk = lambda *a, **k: plain(*a, **{**k, "stack_blocks": False})
    cfg = compose([f"model={model}", "dataset=cifar10", f"train.batch_size={batch}",
                   f"train.steps_per_call={steps_per_call}", "compile_cache_dir=null"])
    run = build.build(cfg, synthetic_dataset(2_000, (32, 32, 3), 10))
    state, data = run.state, run.chunk_data(0, steps_per_call)
    times = {}
    start, cpu = time.perf_counter(), time.process_time()
    lowered = run.train_chunk.lower(state, data, steps_per_call)
    times["lower"] = (time.perf_counter() - start, time.process_time() - cpu)
    start, cpu = time.perf_counter(), time.process_time()
    compiled = lowered.compile()
    times["compile"] = (time.perf_counter() - start, time.process_time() - cpu)
    before, after = lowered.as_text(), compiled.as_text()
    return {"model": model, "steps_per_call": steps_per_call, "batch": batch,
            "layout": "per block" if per_block else "stacked",
            "arrays": {"params": len(jax.tree.leaves(state.params)),
                       "batch_stats": len(jax.tree.leaves(state.batch_stats)),
                       "opt_state": len(jax.tree.leaves(state.opt_state))},
            **{f"{k}_s": round(v[0], 1) for k, v in times.items()},
            **{f"{k}_cpu_s": round(v[1], 1) for k, v in times.items()},
            "stablehlo_lines": before.count("\n"), "hlo_lines": after.count("\n"),
            "stablehlo_ops": _ops(before, r"= \"?([a-z_]+\.[a-z_]+)"),
            "hlo_ops": _ops(after, r"= [a-z0-9\[\],{}: ]*? ([a-z\-]+)\(")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet20", "resnet56", "resnet110"])
    parser.add_argument("--steps-per-call", type=int, default=10)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--per-block", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.steps_per_call, args.batch, args.per_block)))
        return
    print("| model | layout | lower s (CPU) | compile s (CPU) | StableHLO lines | HLO lines |")
    print("|---|---|---|---|---|---|")
    for model in args.models:
        child = [sys.executable, "-m", "benchmarks.compile_breakdown", "--child", model,
                 "--steps-per-call", str(args.steps_per_call), "--batch", str(args.batch),
                 *(["--per-block"] if args.per_block else [])]
        out = subprocess.run(child, cwd=ROOT, capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps(r), file=sys.stderr)
        print(f"| {model} | {r['layout']} | {r['lower_s']} ({r['lower_cpu_s']}) | "
              f"{r['compile_s']} ({r['compile_cpu_s']}) | {r['stablehlo_lines']:,} | "
              f"{r['hlo_lines']:,} |", flush=True)


if __name__ == "__main__":
    main()
