"""Compile times and memory of runs compiled for a TPU this host does not have (docs/scale.md,
`cnnlab compile`): each line of --out is one compile's JSON summary with its overrides and the
chunk's loop (unrolled, the training chunk; rolled, an experimental lax.scan without unrolling).

Run with the `tpu` extra's interpreter (docs/scale.md), e.g.
  python benchmarks/compile_sweep.py --target tpu:v5e:2x2 --loop unrolled rolled \
      --runs "model=resnet20 dataset=cifar10 train.steps_per_call=10" --out FILE
"""

import argparse
import functools
import json
import sys
from typing import Any

import jax
import jax.numpy as jnp

from cnnlab.data.device import GivenBatch, StreamedChunk
from cnnlab.models import compute_dtype
from cnnlab.training import build, steps


def rolled_chunk(cfg: Any, model: Any, tx: Any, augment: Any, placement: Any,
                 frozen: Any = None) -> Any:
    """`build.make_chunk`'s chunk with its steps as a rolled `lax.scan` (one copy of the step
    in the program) instead of unrolled: the experiment of issue 35's finding 5."""
    batch = placement.batch
    step = steps.make_train_step(
        model, tx, augment, cfg.train.batch_size, cfg.regularization, cfg.eval.ema_decay,
        scale_lr=build.scales_lr(cfg), loss_config=cfg.loss, frozen=frozen,
        batch_sharding=batch, grad_accum=cfg.train.grad_accum or 1,
        compute_dtype=compute_dtype(cfg))
    placed = {} if batch is None else {"out_shardings": (placement.replicated,) * 2}

    @functools.partial(jax.jit, static_argnames="num_steps", donate_argnames="state", **placed)
    def chunk(state: Any, data: Any, num_steps: int) -> Any:
        streamed = isinstance(data, StreamedChunk)

        def body(carry: tuple, xs: Any) -> tuple:
            state, sums = carry
            state, metrics = step(state, GivenBatch(*xs, stats=data.stats) if streamed else data)
            return (state, jax.tree.map(jnp.add, sums, metrics)), None

        xs = (data.images, data.labels) if streamed else None
        return jax.lax.scan(body, (state, steps.zero_metrics()), xs, length=num_steps)[0]

    return chunk


LOOPS = {"unrolled": build.make_chunk, "rolled": rolled_chunk}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True)
    parser.add_argument("--runs", nargs="+", required=True, help="override lists, quoted")
    parser.add_argument("--loop", nargs="+", default=["unrolled"], choices=list(LOOPS))
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    from cnnlab.training import chips

    target = chips.parse_target(args.target)
    chips.prepare_environment(target)
    from cnnlab.cli.preflight import check_config, without_hydra
    from cnnlab.training import aot

    for run in args.runs:
        cfg = without_hydra(check_config(run.split(), for_training=False).cfg)
        for loop in args.loop:
            try:
                summary = aot.compile_for(cfg, target, LOOPS[loop]).summary()
            except aot.DoesNotFit as e:
                summary = {"fits": False, "error": str(e)}
            summary.update(overrides=run, loop=loop)
            line = json.dumps(summary)
            print(line, flush=True)
            with open(args.out, "a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    sys.exit(main())
