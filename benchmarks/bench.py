"""`make bench`: training throughput of cnnlab vs an equivalent PyTorch script, same machine.

Both sides train a CIFAR ResNet (option A, batch 128 by default) on 10,000 random 32x32x3 uint8
images held in memory, with pad-4 random crop + flip, per-channel normalization, cross-entropy
and SGD(momentum 0.9, weight decay 1e-4). cnnlab runs its real compiled chunk of
`train.steps_per_call` steps (cnnlab.steps); PyTorch runs benchmarks/torch_resnet.py in eager
mode. Compilation and warm-up are excluded from both timings.

    python benchmarks/bench.py --depths 20 56 --batch-size 128
"""

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

from cnnlab import data
from cnnlab.configure import compose
from cnnlab.models import count_params
from cnnlab.preprocess import PreprocessStats
from cnnlab.run import build

HERE = Path(__file__).resolve().parent


def synthetic_dataset(n: int, shape: tuple[int, int, int], num_classes: int,
                      seed: int = 0) -> data.Dataset:
    """Random uint8 images in memory, with fixed per-channel statistics."""
    rng = np.random.default_rng(seed)
    train = data.ArraySplit(rng.integers(0, 256, (n, *shape), dtype=np.uint8),
                            rng.integers(0, num_classes, (n,), dtype=np.int32))
    mean, std = np.full((shape[-1],), 0.5, np.float32), np.full((shape[-1],), 0.25, np.float32)
    return data.Dataset("synthetic", train, train, None, num_classes, shape, mean, std,
                        preprocess=PreprocessStats(mean=mean, std=std))


def bench_cnnlab(depth: int, batch_size: int, steps_per_call: int, calls: int,
                 warmup_calls: int) -> dict:
    cfg = compose([f"model=resnet{depth}", "dataset=cifar10", f"train.batch_size={batch_size}"])
    run = build(cfg, synthetic_dataset(10_000, (32, 32, 3), 10))
    state, data_on_device, chunk = run.state, run.train_data, run.train_chunk
    t0 = time.perf_counter()
    state, sums = chunk(state, data_on_device, steps_per_call)
    jax.block_until_ready(sums)
    compile_s = time.perf_counter() - t0
    for _ in range(warmup_calls - 1):
        state, sums = chunk(state, data_on_device, steps_per_call)
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for _ in range(calls):
        state, sums = chunk(state, data_on_device, steps_per_call)
    jax.block_until_ready(state)
    elapsed = time.perf_counter() - t0
    return {
        "framework": "cnnlab (jax)", "model": f"resnet{depth}", "batch_size": batch_size,
        "images_per_sec": calls * steps_per_call * batch_size / elapsed,
        "step_ms": 1000 * elapsed / (calls * steps_per_call), "compile_s": compile_s,
        "params": count_params(state.params), "jax": jax.__version__,
        "device": str(jax.devices()[0].device_kind),
    }


def bench_torch(depth: int, batch_size: int, steps: int, warmup: int,
                extra: list[str]) -> dict | None:
    cmd = [sys.executable, str(HERE / "torch_resnet.py"), "--depth", str(depth),
           "--batch-size", str(batch_size), "--steps", str(steps), "--warmup", str(warmup),
           "--json", *extra]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        print(f"pytorch benchmark failed: {getattr(e, 'stderr', e)}", file=sys.stderr)
        return None
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[20, 56])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps-per-call", type=int, default=10)
    parser.add_argument("--calls", type=int, default=4, help="timed calls of steps-per-call")
    parser.add_argument("--warmup-calls", type=int, default=2)
    parser.add_argument("--torch-args", default="", help="extra args for torch_resnet.py")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "bench.json")
    args = parser.parse_args(argv)

    rows = []
    for depth in args.depths:
        ours = bench_cnnlab(depth, args.batch_size, args.steps_per_call, args.calls,
                            args.warmup_calls)
        theirs = None if args.no_torch else bench_torch(
            depth, args.batch_size, args.calls * args.steps_per_call,
            args.warmup_calls * args.steps_per_call // 2, args.torch_args.split())
        rows.append({"cnnlab": ours, "pytorch": theirs})

    print(f"\nmachine: {platform.machine()}, {jax.devices()[0].device_kind}, "
          f"jax {jax.__version__}, batch {args.batch_size}")
    print("| model | cnnlab img/s | PyTorch img/s | cnnlab / PyTorch | cnnlab compile s |")
    print("|---|---|---|---|---|")
    for row in rows:
        ours, theirs = row["cnnlab"], row["pytorch"]
        t = f"{theirs['images_per_sec']:.0f}" if theirs else "n/a"
        ratio = f"{ours['images_per_sec'] / theirs['images_per_sec']:.2f}x" if theirs else "n/a"
        print(f"| {ours['model']} | {ours['images_per_sec']:.0f} | {t} | {ratio} | "
              f"{ours['compile_s']:.0f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\nraw results: {args.out}")


if __name__ == "__main__":
    main()
