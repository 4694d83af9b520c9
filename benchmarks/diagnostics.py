"""What `diagnostics.every` costs per training step: off, every 10 steps, every step.

ResNet-20 on fashion_mnist (batch 128) as `cnnlab train` runs it: the compiled chunk of
`train.steps_per_call` steps, then at diagnostics steps the separate jitted diagnostics function
and its transfer to the host (what actions.Diagnostics does, W&B left out). Compiles and a
warm-up are excluded; the compile times are reported apart. `every=1` lowers the chunk to one
step (config.fit_steps_per_call), so "off, 1 step per call" separates that from the diagnostics.

    python benchmarks/diagnostics.py --steps 60 --out benchmarks/results/diagnostics.md
"""

import argparse
import platform
import time
from pathlib import Path

import jax

from cnnlab.cli.preflight import compose
from cnnlab.training import diagnostics
from cnnlab.training.build import Run, build, use_compile_cache


def train(run: Run, state: object, steps: int, per_call: int, every: int) -> tuple[object, float]:
    """`steps` steps from `state` as the loop runs them; returns (state, seconds)."""
    start = time.perf_counter()
    for step in range(per_call, steps + 1, per_call):
        state, sums = run.train_chunk(state, run.train_data, per_call)
        if every and step % every == 0:
            values = jax.device_get(run.diagnose(state))
            diagnostics.scalars(values), diagnostics.histograms(values)
    jax.block_until_ready(state)
    return state, time.perf_counter() - start


MODES = (("off", 10, 0), ("every=10", 10, 10), ("off, 1 step per call", 1, 0), ("every=1", 1, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--max-examples", type=int, default=10_000)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    cfg = compose(["model=resnet20", "dataset=fashion_mnist", f"train.batch_size={args.batch_size}",
                   f"dataset.max_examples={args.max_examples}", "progress=false"])
    use_compile_cache(cfg.compile_cache_dir)  # a rerun loads the programs instead
    run = build(cfg)
    state, compile_s = run.state, {}
    for n in (10, 1):
        start = time.perf_counter()
        # The chunks donate their input: carry on from what they return.
        state, sums = run.train_chunk(state, run.train_data, n)
        jax.block_until_ready(sums)
        compile_s[f"chunk of {n}"] = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(run.diagnose(state))
    compile_s["diagnostics"] = time.perf_counter() - start
    for _, per_call, every in MODES:  # warm-up
        state, _ = train(run, state, 10, per_call, every)
    # Rounds of 10 steps of each mode in turn: a machine whose load drifts (shared cores) slows
    # every mode alike instead of whichever ran last.
    seconds = dict.fromkeys(MODES, 0.0)
    for done in range(10, args.steps + 1, 10):
        for mode in MODES:
            state, took = train(run, state, 10, mode[1], mode[2])
            seconds[mode] += took
        print(f"{done} steps: " + ", ".join(f"{m[0]} {1000 * t / done:.0f} ms/step"
                                            for m, t in seconds.items()), flush=True)
    rows = [(name, per_call, seconds[name, per_call, every] / args.steps)
            for name, per_call, every in MODES]
    base = rows[0][2]
    lines = [
        f"# diagnostics cost: ResNet-20, fashion_mnist, batch {args.batch_size}",
        "",
        f"{args.steps} timed steps per mode (rounds of 10 steps of each mode in turn) after a "
        f"warm-up; {platform.processor() or 'cpu'} "
        f"({jax.default_backend()}, {jax.device_count()} device), `python "
        f"benchmarks/diagnostics.py --steps {args.steps}`. Excluded, the first calls (compiles, "
        "or loads from the compile cache): "
        + ", ".join(f"{k} {v:.1f} s" for k, v in compile_s.items()) + ".",
        "",
        "| mode | steps per call | ms/step | vs off |",
        "|---|---:|---:|---:|",
        *(f"| {name} | {per_call} | {1000 * t:.1f} | {t / base:.2f}x |"
          for name, per_call, t in rows),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
