"""Checks that need several devices, in one child process with 2 forced host devices (run by
tests/test_numerics.py):

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python tests/two_device_checks.py DATA OUT

1. A reduce-on-plateau run over 2 devices whose lr is lowered twice compiles its chunk once
   (counted from JAX's compile log).
2. The checkpoint checksum of a state sharded over the 2 devices equals that of the same values
   on one device, and a sharded checkpoint saves and restores verified.
Prints one JSON object.
"""

import json
import logging
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tests.helpers import TINY, compose_config


class Compiles(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Compiling "):
            self.names.append(message.split()[1])


def plateau_compiles(data_dir: Path, out: Path) -> dict:
    from cnnlab.training.loop import train

    compiles = Compiles()
    logging.getLogger("jax").addHandler(compiles)
    jax.config.update("jax_log_compiles", True)
    cfg = compose_config([*TINY, "dataset.val_size=256", "train.steps=20", "train.log_every=5",
                          "train.eval_every=5", "checkpoint.every=5", "logger.mode=disabled",
                          "schedule=plateau", "schedule.patience=0", "schedule.threshold=100",
                          "schedule.max_reductions=2", "early_stopping.keep_best=false",
                          f"dataset.data_dir={data_dir}"])
    summary = train(cfg, out / "plateau")
    jax.config.update("jax_log_compiles", False)
    events = [json.loads(line) for line in (out / "plateau" / "metrics.jsonl").read_text()
              .splitlines()]
    return {"status": summary["status"], "devices": summary.get("devices"),
            "lrs": [e["lr"] for e in events],
            "chunk_compiles": sum(name.startswith("jit(train_chunk)") for name in compiles.names)}


def sharded_checksum(out: Path) -> dict:
    from cnnlab.runs.checkpoint import Checkpointer, state_checksum

    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    values = {"w": jnp.arange(64 * 8, dtype=jnp.float32).reshape(64, 8) / 7, "s": jnp.int32(3)}
    sharded = {"w": jax.device_put(values["w"], NamedSharding(mesh, PartitionSpec("data"))),
               "s": jax.device_put(values["s"], NamedSharding(mesh, PartitionSpec()))}
    one = jax.device_put(values, jax.devices()[0])
    saver = Checkpointer(out / "sharded", keep=1)
    saver.save(1, sharded, {})
    saver.wait()
    restored, _ = saver.restore(1, sharded)
    saver.close()
    return {"shards": len(sharded["w"].addressable_shards),
            "same_checksum": state_checksum(sharded) == state_checksum(one),
            "restored_equal": bool(np.array_equal(np.asarray(restored["w"]),
                                                  np.asarray(values["w"]))),
            "restored_sharded": restored["w"].sharding == sharded["w"].sharding}


if __name__ == "__main__":
    data, out = Path(sys.argv[1]), Path(sys.argv[2])
    result = {"device_count": jax.device_count(), **sharded_checksum(out),
              **plateau_compiles(data, out)}
    print(json.dumps(result))
