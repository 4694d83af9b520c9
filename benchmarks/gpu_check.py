"""What a lent accelerator runs first (benchmarks/gpu_check.sh): one markdown table of versions,
devices, training speed and compile times, checkpoint cost and run-to-run determinism.

Every figure comes from cnnlab's own pieces (`build`, the compiled chunk, the `Checkpoint`
action) on random images, so no dataset is needed:

- ResNet-20 (CIFAR, 32x32x3, batch 128) and ResNet-50 (224x224x3, batch 64): compile seconds
  (the first call beyond a steady one) and images/s at 1 and 10 steps per call in fp32, and at
  10 in bf16;
- checkpoint cost: benchmarks/checkpoint_cost.py's step times with and without a checkpoint
  every 10 steps;
- determinism: two identical 20-step ResNet-20 runs (4 with --quick) compared bit for bit, with
  `train.deterministic=true` and `false`.

    python benchmarks/gpu_check.py --out gpu_check.md      # on the accelerator, < 8 min
    python benchmarks/gpu_check.py --quick                 # tiny sizes, any CPU (a minute or two)
"""

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# (label, overrides, image shape, batch); --quick shrinks them.
MODELS = {
    "ResNet-20": (["model=resnet20", "dataset=cifar10"], (32, 32, 3), 128),
    "ResNet-50": (["model=resnet50", "dataset=imagenet"], (224, 224, 3), 64),
}
QUICK = {
    "ResNet-20": (["model=resnet20", "model.depth=8", "model.width=4", "dataset=cifar10"],
                  (32, 32, 3), 16),
    "ResNet-50": (["model=resnet50", "model.input_size=64", "dataset=imagenet"], (64, 64, 3), 2),
}
SETTINGS = [(1, "fp32"), (10, "fp32"), (10, "bf16")]
# --quick: 2 steps per call instead of 10, XLA's optimizations off (CPU compiles in seconds).
QUICK_SETTINGS = [(1, "fp32"), (2, "fp32"), (2, "bf16")]


def versions() -> list[tuple[str, str]]:
    import flax
    import jax
    import jaxlib
    import optax
    import orbax.checkpoint as ocp

    rows = [("python", platform.python_version()), ("jax", jax.__version__),
            ("jaxlib", jaxlib.__version__), ("flax", flax.__version__),
            ("optax", optax.__version__), ("orbax-checkpoint", ocp.__version__)]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True)
    rows.append(("cnnlab commit", commit.stdout.strip() or "?"))
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                          "--format=csv,noheader"], capture_output=True, text=True) \
        if _has("nvidia-smi") else None
    if smi is not None and smi.returncode == 0:
        rows.append(("nvidia-smi", "; ".join(smi.stdout.strip().splitlines())))
    devices = jax.devices()
    rows.append(("devices", f"{len(devices)} x {devices[0].device_kind} "
                            f"({devices[0].platform})"))
    return rows


def _has(command: str) -> bool:
    import shutil

    return shutil.which(command) is not None


def speed(label: str, quick: bool, per_call: int, precision: str, calls: int) -> dict:
    """Compile seconds and images/s of the model's compiled chunk (the run's own)."""
    import jax

    from benchmarks.bench_cnnlab import synthetic_dataset
    from cnnlab.cli.preflight import compose
    from cnnlab.training.build import build

    overrides, shape, batch = (QUICK if quick else MODELS)[label]
    cfg = compose([*overrides, f"train.batch_size={batch}", f"train.steps_per_call={per_call}",
                   f"train.precision={precision}", "logger.mode=disabled"])
    classes = 10 if "cifar10" in overrides else 1000
    run = build(cfg, synthetic_dataset(max(4 * batch, 64), shape, classes))
    state, chunk = run.state, run.train_chunk
    times = []
    for i in range(2 + calls):
        data = run.chunk_data(i * per_call, per_call)
        start = time.perf_counter()
        state, sums = chunk(state, data, per_call)
        jax.block_until_ready((state, sums))
        times.append(time.perf_counter() - start)
    steady = sorted(times[1:])[len(times[1:]) // 2]
    return {"model": label, "steps_per_call": per_call, "precision": precision,
            "batch": batch, "compile_s": round(times[0] - steady, 1),
            "images_per_sec": round(batch * per_call / steady, 1)}


def identical_runs(quick: bool, deterministic: bool) -> str:
    """Whether two identical short ResNet-20 runs end with bitwise the same parameters."""
    import jax
    import numpy as np

    from benchmarks.bench_cnnlab import synthetic_dataset
    from cnnlab.cli.preflight import compose
    from cnnlab.training.build import build

    overrides, shape, batch = (QUICK if quick else MODELS)["ResNet-20"]
    per_call = 2 if quick else 10
    cfg = compose([*overrides, f"train.batch_size={batch}", f"train.steps_per_call={per_call}",
                   f"train.deterministic={str(deterministic).lower()}", "logger.mode=disabled"])
    finals = []
    for _ in range(2):
        run = build(cfg, synthetic_dataset(4 * batch, shape, 10))
        state = run.state
        for step in (0, per_call):
            state, _ = run.train_chunk(state, run.chunk_data(step, per_call), per_call)
        finals.append([np.asarray(x) for x in jax.tree.leaves(jax.device_get(state.params))])
    same = all(np.array_equal(a, b) for a, b in zip(*finals, strict=True))
    differing = sum(not np.array_equal(a, b) for a, b in zip(*finals, strict=True))
    return "bitwise equal" if same else f"differ ({differing} of {len(finals[0])} arrays)"


def checkpoint_cost(quick: bool) -> dict:
    from benchmarks import checkpoint_cost as cost

    if quick:
        return cost.measure(quick=True, batch=16, chunks=3, rounds=1)
    return cost.measure(model="resnet20", batch=128, chunks=6, rounds=2,
                        extra=["dataset=cifar10"], shape=(32, 32, 3))


def report(quick: bool) -> str:
    start = time.perf_counter()
    lines = ["# gpu_check" + (" (--quick: tiny sizes)" if quick else ""), "",
             "| what | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in versions()]
    calls = 2 if quick else 10
    if quick:
        import jax

        jax.config.update("jax_disable_most_optimizations", True)
    for label in MODELS:
        for per_call, precision in QUICK_SETTINGS if quick else SETTINGS:
            r = speed(label, quick, per_call, precision, calls)
            lines.append(f"| {label} batch {r['batch']}, {precision}, {per_call} steps/call | "
                         f"{r['images_per_sec']:,} images/s; compile {r['compile_s']} s |")
            print(json.dumps(r), flush=True)
    cost = checkpoint_cost(quick)
    print(json.dumps(cost), flush=True)
    lines.append(f"| checkpoint every {cost['every']} steps ({cost['model']}, "
                 f"{cost['state_mib']} MiB) | step {cost['step_ms']['none']} ms without, "
                 f"{cost['step_ms']['async']} ms with ({cost['overhead_pct']['async']:+.1f}%); "
                 f"synchronous as before: {cost['overhead_pct']['sync']:+.1f}% |")
    for deterministic in (True, False):
        lines.append(f"| two identical runs, train.deterministic={str(deterministic).lower()} "
                     f"| {identical_runs(quick, deterministic)} |")
    lines.append(f"| gpu_check time | {time.perf_counter() - start:.0f} s |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (runs on any CPU)")
    parser.add_argument("--out", type=Path, default=None, help="write the table here too")
    args = parser.parse_args(argv)
    table = report(args.quick)
    print(table)
    if args.out is not None:
        args.out.write_text(table)


if __name__ == "__main__":
    main()
