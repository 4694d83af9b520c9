"""Training throughput of each transfer mode from one source run, same machine, same batch.

A linear probe differentiates only the classifier (the frozen backbone's parameters are under
`stop_gradient` and the images need no gradient), so its compiled step should be about a forward
pass; finetune_top stops the backward pass at its frozen layers; finetune_all and scratch do it
all. The runs train on random images of the source's shape and class count; compile time and
warm-up are excluded.

    python benchmarks/transfer_speed.py SOURCE_RUN_DIR [--calls 5] [--out results/transfer_speed.md]
"""

import argparse
import json
import platform
import time
from pathlib import Path

import jax

from benchmarks.bench import synthetic_dataset
from cnnlab.cli.preflight import compose
from cnnlab.config.load import load_run_config
from cnnlab.training.build import build

MODES = {
    "scratch": [],
    "linear_probe": ["transfer=linear_probe"],
    "finetune_top (frozen through stage2)": ["transfer=finetune_top",
                                             "transfer.freeze_through=stage2"],
    "finetune_all": ["transfer=finetune_all"],
}


def measure(source: Path, overrides: list[str], calls: int, per_call: int) -> dict:
    src = load_run_config(source)
    cfg = compose([f"dataset={src.dataset.name}", f"model.depth={src.model.depth}",
                   f"train.batch_size={src.train.batch_size}",
                   f"train.steps_per_call={per_call}",
                   *([f"transfer.source={source}"] if overrides else []), *overrides])
    dataset = synthetic_dataset(10_000, tuple(src.dataset.image_shape),
                                src.dataset.num_classes if not src.dataset.classes
                                else len(src.dataset.classes))
    run = build(cfg, dataset, with_source=bool(overrides))
    state, chunk = run.state, run.train_chunk
    start = time.perf_counter()
    state, sums = chunk(state, run.train_data, per_call)
    jax.block_until_ready(sums)
    compile_s = time.perf_counter() - start
    state, sums = chunk(state, run.train_data, per_call)
    jax.block_until_ready(state)
    start = time.perf_counter()
    for _ in range(calls):
        state, sums = chunk(state, run.train_data, per_call)
    jax.block_until_ready(state)
    seconds = time.perf_counter() - start
    images = calls * per_call * cfg.train.batch_size
    return {"images_per_sec": images / seconds, "compile_s": compile_s,
            "ms_per_step": 1000 * seconds / (calls * per_call)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--steps-per-call", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    results = {name: measure(args.source, overrides, args.calls, args.steps_per_call)
               for name, overrides in MODES.items()}
    base = results["finetune_all"]["images_per_sec"]
    lines = [f"Transfer modes, ResNet from {args.source}, {platform.processor() or 'CPU'}, "
             f"{jax.device_count()} {jax.default_backend()} device(s)", "",
             "| mode | images/s | ms/step | x finetune_all | compile (s) |",
             "| --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['images_per_sec']:.0f} | {r['ms_per_step']:.0f} | "
                     f"{r['images_per_sec'] / base:.2f} | {r['compile_s']:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
