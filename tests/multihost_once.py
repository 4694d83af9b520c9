"""One process of a 2-process job (tests/multihost_run.py's `launch`, tests/test_multihost.py)
doing a run's one-time work without training: it prepares a tiny TFDS dataset (generated here,
nothing downloaded) in DATA_DIR, as a dataset missing from dataset.data_dir is prepared, and
resumes from CHECKPOINTS, whose latest checkpoint is unusable (moved aside). Each process that
generates the dataset's examples appends its index to DATA_DIR/generated.log. Prints one JSON
line.

    SLURM_... python tests/multihost_once.py DATA_DIR CHECKPOINTS
"""

import json
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from cnnlab import parallel  # noqa: E402
from cnnlab.data import tfds_reader  # noqa: E402
from cnnlab.runs.checkpoint import Checkpointer  # noqa: E402

SHAPE = (8, 8, 1)


class MultihostTiny(tfds.core.GeneratorBasedBuilder):
    """16 training and 8 test images of 8x8 pixels, generated (registered as multihost_tiny)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=SHAPE, dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=2)}))

    def _split_generators(self, dl_manager: object) -> dict:
        return {"train": self._generate_examples(16), "test": self._generate_examples(8)}

    def _generate_examples(self, n: int):  # noqa: ANN202 (a generator of TFDS examples)
        with open(Path(self.data_dir_root) / "generated.log", "a") as log:
            log.write(f"{jax.process_index()}\n")
        rng = np.random.default_rng(n)
        for i in range(n):
            yield i, {"image": rng.integers(0, 256, SHAPE, dtype=np.uint8), "label": i % 2}


def main(data_dir: Path, checkpoints: Path) -> None:
    parallel.initialize_distributed("auto")
    builder, read = tfds_reader.prepared("multihost_tiny", str(data_dir), download=True)
    _, labels = read(builder, "train", "image", "label", SHAPE, None)
    like = {"w": jnp.zeros(4, jnp.float32)}  # the state tests/test_multihost.py saved
    step, state, _ = Checkpointer(checkpoints, keep=None).restore_latest(like)
    print(json.dumps({"process": jax.process_index(), "processes": jax.process_count(),
                      "labels": np.asarray(labels).tolist(), "restored": step,
                      "w": np.asarray(state["w"]).tolist(), "pid": os.getpid()}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
