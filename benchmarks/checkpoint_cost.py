"""What checkpoints cost the training loop, and whether dispatching a chunk waits for the device.

The run's own pieces (`build`, the loop's `_chunk`, the `Checkpoint` action) on random images
of the dataset's shape: chunks of `--steps-per-call` steps, timed per step, in four modes:

- `none`: no checkpoints;
- `async`: a checkpoint every `--every` steps as cnnlab saves now (a copy of the state and its
  checksum queued on the device, handed to Orbax at the next tick once the next chunk is
  queued; Orbax writes in the background; the previous save waited for first);
- `sync`: the same saves made synchronous as before 2026-12-05 (a host copy and SHA-256 of
  the state, then waiting for Orbax to finish writing);
- `sync-step`: no saves, but the host reading `state.step` before each chunk, as the loop did.

The modes alternate for `--rounds` rounds (a shared machine's noise falls on all of them);
each figure is the median over rounds of the mean step time. "dispatch ms" is the host's time
inside `_chunk` per chunk after the first: what the device waits for when the host is late;
"checkpoint ms" the host's time in the checkpoint action per chunk (median over the chunks
that save or hand a save to Orbax). `--modes none async` times only those two.

    python benchmarks/checkpoint_cost.py                 # ResNet-20 on fashion_mnist's shape
    python benchmarks/checkpoint_cost.py --quick         # a tiny net, a few seconds
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODES = ("none", "async", "sync", "sync-step")


def _config(quick: bool, model: str, batch: int, per_call: int, every: int, run_dir: Path,
            extra: list[str]) -> tuple:
    from cnnlab.cli.preflight import compose

    sizes = ["model.depth=8", "model.width=4"] if quick else []
    cfg = compose([f"model={model}", *sizes, f"train.batch_size={batch}",
                   f"train.steps_per_call={per_call}", f"checkpoint.every={every}",
                   "checkpoint.keep=2", "progress=false", "logger.mode=disabled", *extra])
    return cfg, run_dir


def _one_mode(mode: str, run, checkpoint, chunks: int, start_step: int, state) -> tuple:
    """Train `chunks` chunks from `start_step` in `mode`; (seconds per step, dispatch ms,
    state, next step)."""
    import jax

    from cnnlab.progress import CompileTimer
    from cnnlab.runs.checkpoint import state_digest
    from cnnlab.training import actions, loop

    per_call = run.cfg.train.steps_per_call
    compiles = CompileTimer()
    compiles.is_new(("main", per_call))  # compiled already: no compile message
    step, dispatch, saving = start_step, [], []
    jax.block_until_ready(state)
    start = time.perf_counter()
    for _ in range(chunks):
        if mode == "sync-step":
            int(state.step)
        began = time.perf_counter()
        state, sums = loop._chunk(run, state, step, per_call, compiles)
        dispatch.append(time.perf_counter() - began)
        step += per_call
        if mode in ("async", "sync"):
            began = time.perf_counter()
            tick = actions.Tick(step, per_call, False, state, sums)
            checkpoint.settle(tick)
            if mode == "sync":  # as before: a host SHA-256 of the state, a synchronous save
                state_digest(tick.state)
                checkpoint.checkpoints.save(step, tick.state, {})
                checkpoint.checkpoints.wait()
            else:
                checkpoint(tick)
            saving.append(time.perf_counter() - began)
    jax.block_until_ready(state)
    checkpoint.checkpoints.wait()
    seconds = time.perf_counter() - start
    saves = [t for t in saving if t > 1e-3] or [0.0]
    return (seconds / (chunks * per_call), 1000 * statistics.median(dispatch[1:]),
            1000 * statistics.median(saves), state, step)


def measure(quick: bool = False, model: str = "resnet20", batch: int = 128, per_call: int = 10,
            every: int = 10, chunks: int = 6, rounds: int = 3, extra: list[str] | None = None,
            shape: tuple[int, int, int] = (28, 28, 1), modes: tuple[str, ...] = MODES) -> dict:
    """Step time per mode (median over rounds), in this process."""
    import jax

    from benchmarks.bench_cnnlab import synthetic_dataset
    from cnnlab.runs.rundir import RunDir
    from cnnlab.training import actions
    from cnnlab.training.build import build

    with tempfile.TemporaryDirectory() as folder:
        cfg, run_dir = _config(quick, model, batch, per_call, every, Path(folder), extra or [])
        run = build(cfg, synthetic_dataset(max(4 * batch, 512), shape, 10))
        checkpoint = actions.Checkpoint(cfg, RunDir(run_dir))
        state = run.state
        # Compile, and one save of each kind, outside the timing.
        from cnnlab.progress import CompileTimer
        from cnnlab.training import loop

        start = time.perf_counter()
        state, _ = loop._chunk(run, state, 0, per_call, CompileTimer())
        jax.block_until_ready(state)
        compile_s = time.perf_counter() - start
        step = per_call
        # The snapshot's function compiled, and Orbax's first save made, before the timing.
        checkpoint.checkpoints.snapshot(0, state, {})
        checkpoint.checkpoints.wait()
        times: dict[str, list[float]] = {m: [] for m in modes}
        dispatch: dict[str, list[float]] = {m: [] for m in modes}
        saving: dict[str, list[float]] = {m: [] for m in modes}
        for _ in range(rounds):
            for mode in modes:
                per_step, ms, save_ms, state, step = _one_mode(mode, run, checkpoint, chunks,
                                                               step, state)
                times[mode].append(per_step)
                dispatch[mode].append(ms)
                saving[mode].append(save_ms)
        checkpoint.close()
        state_mb = sum(x.nbytes for x in jax.tree.leaves(state)) / 2**20
    steps = {m: statistics.median(v) for m, v in times.items()}
    return {"model": f"{model}{' (depth 8, width 4)' if quick else ''}", "batch": batch,
            "steps_per_call": per_call, "every": every, "state_mib": round(state_mb, 2),
            "compile_s": round(compile_s, 1), "backend": jax.default_backend(),
            "step_ms": {m: round(1000 * s, 2) for m, s in steps.items()},
            "dispatch_ms": {m: round(statistics.median(v), 3) for m, v in dispatch.items()},
            "checkpoint_ms": {m: round(statistics.median(v), 1) for m, v in saving.items()},
            "all_step_ms": {m: [round(1000 * s, 2) for s in v] for m, v in times.items()},
            "overhead_pct": {m: round(100 * (steps[m] / steps["none"] - 1), 1)
                             for m in modes if m != "none"},
            "rounds": rounds, "chunks": chunks}


def table(result: dict) -> str:
    rows = ["| mode | step ms (median) | vs none | dispatch ms per chunk | checkpoint ms per save |"
            " rounds' step ms |", "|---|---|---|---|---|---|"]
    for mode in result["step_ms"]:
        over = result["overhead_pct"].get(mode)
        rows.append(f"| {mode} | {result['step_ms'][mode]} | "
                    f"{'' if over is None else f'{over:+.1f}%'} | {result['dispatch_ms'][mode]} | "
                    f"{result['checkpoint_ms'][mode]} | "
                    f"{', '.join(map(str, result['all_step_ms'][mode]))} |")
    head = (f"{result['model']}, batch {result['batch']}, {result['steps_per_call']} steps per "
            f"call, a checkpoint every {result['every']} steps ({result['state_mib']} MiB of "
            f"state), {result['backend']}")
    return head + "\n\n" + "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny net and few chunks")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps-per-call", type=int, default=10)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--chunks", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args(argv)
    result = measure(args.quick, args.model, 32 if args.quick else args.batch,
                     args.steps_per_call, args.every, 3 if args.quick else args.chunks,
                     2 if args.quick else args.rounds, modes=tuple(args.modes))
    print(json.dumps(result))
    print(table(result))
    if args.out is not None:
        args.out.write_text(table(result) + "\n```json\n" + json.dumps(result) + "\n```\n")


if __name__ == "__main__":
    main()
