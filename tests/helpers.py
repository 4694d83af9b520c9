"""Test helpers: the offline fashion_mnist, tiny run overrides, config composition, the CLI."""

import contextlib
import dataclasses
import functools
import io
import json
import logging
import logging.config
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import tensorflow_datasets as tfds
from omegaconf import DictConfig
from tensorflow_datasets.testing import mocking

from cnnlab.cli import preflight
from cnnlab.config import load as config_load
from cnnlab.config.groups import AUGMENT_BASE, option_values
from cnnlab.config.schema import AugmentConfig
from cnnlab.data import prepare, tfds_reader

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    return Path(os.environ.get("CNNLAB_SHARED_DATA",
                               REPO.parent / "shared" / "data" / "tfds_array_record"))


@pytest.fixture(scope="session")
def fashion_dir() -> Path:
    path = shared_data_dir()
    if not (path / "fashion_mnist").is_dir():
        pytest.skip(f"offline fashion_mnist not found at {path}")
    return path


# A few seconds per run on 2 CPU cores: ResNet-8 at width 4 on 1,024 real images.
TINY = [
    "model=resnet20", "model.depth=8", "model.width=4",
    "dataset.max_examples=1024", "train.batch_size=32", "train.steps=20",
    "train.steps_per_call=5", "train.log_every=10", "train.eval_every=0",
    "train.eval_batch_size=256", "checkpoint.every=10", "progress=false",
]


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    """The composed config, presets resolved, not validated (tests validate it themselves)."""
    return config_load.compose(overrides)


def augment_config(**options: object) -> DictConfig:
    """A complete `augment` config: conf/augment/_base.yaml (every augmentation off) with
    `options` on top, typed by the schema, as make_augment takes (tests name only what they
    turn on: `augment_config(cutout=3)`)."""
    from omegaconf import OmegaConf

    return OmegaConf.merge(OmegaConf.structured(AugmentConfig),
                           option_values("augment", AUGMENT_BASE), options)


@dataclasses.dataclass
class TinyStep:
    """A TINY model's pieces for calling the training step directly (no run, no data files)."""

    cfg: DictConfig
    model: object
    tx: object
    state: object  # cnnlab.training.steps.TrainState
    data: object  # cnnlab.data.device.DeviceSplit: 64 random 12x12x1 images on the device


def tiny_step(overrides: list[str] | None = None) -> TinyStep:
    from cnnlab.models import build_model
    from cnnlab.training.build import init_state
    from cnnlab.training.optim import make_optimizer, make_schedule

    cfg = compose_config([*TINY, *(overrides or [])])
    model = build_model(cfg, 10)
    tx = make_optimizer(cfg.optimizer, make_schedule(cfg.schedule, cfg.optimizer.lr, 100))
    state = init_state(cfg, model, tx, (12, 12, 1))
    return TinyStep(cfg, model, tx, state, random_device_split((12, 12, 1)))


def random_device_split(shape: tuple[int, int, int], n: int = 64) -> object:
    """`n` random uint8 images of `shape` and labels of 10 classes on the device, normalized
    with mean 0.5 and std 0.25 per channel (a cnnlab.data.device.DeviceSplit; seed 0)."""
    import jax
    import numpy as np

    from cnnlab.data.device import DeviceSplit
    from cnnlab.data.preprocess import PreprocessStats

    rng = np.random.default_rng(0)
    channels = shape[-1]
    return jax.device_put(DeviceSplit(
        images=rng.integers(0, 256, (n, *shape), dtype=np.uint8),
        labels=rng.integers(0, 10, (n,), dtype=np.int32), mask=np.ones((n,), bool),
        stats=PreprocessStats(mean=np.full((channels,), 0.5, np.float32),
                              std=np.full((channels,), 0.25, np.float32))))


def train_tiny(run_dir: Path, data_dir: Path, overrides: list[str] | None = None) -> dict:
    """A TINY run trained in this process (no W&B unless asked), with the config file Hydra
    would have written; returns its summary."""
    from omegaconf import OmegaConf

    from cnnlab.training.loop import train

    cfg = preflight.compose([*TINY, "logger.mode=disabled", f"dataset.data_dir={data_dir}",
                             *(overrides or [])])
    (Path(run_dir) / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, Path(run_dir) / ".hydra" / "config.yaml")
    return train(cfg, Path(run_dir))


def _forget_handlers() -> None:
    logging._handlers.clear()  # type: ignore[attr-defined]
    del logging._handlerList[:]  # type: ignore[attr-defined]


def run_cli(args: list[str], cwd: Path, data_dir: Path | None = None, timeout: float = 600,
            fresh_process: bool = False) -> subprocess.CompletedProcess:
    """Run `cnnlab ARGS` as a user would: by default in this process (`cnnlab.cli.main.main`, with
    stdout, stderr, the exit code, the working directory and TFDS_DATA_DIR as a shell gives
    them), which spares a JAX import and reuses this process's compilations; with
    `fresh_process`, in a new Python process, for the tests of the entry point itself."""
    if fresh_process:
        env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_SERVICE")}
        if data_dir is not None:
            env["TFDS_DATA_DIR"] = str(data_dir)
        return subprocess.run([sys.executable, "-m", "cnnlab.cli", *args], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=timeout)
    from cnnlab.cli import main as cli

    out, err, code = io.StringIO(), io.StringIO(), 0
    previous_dir, previous_data = os.getcwd(), os.environ.get("TFDS_DATA_DIR")
    root = logging.getLogger()
    previous_handlers, previous_level = root.handlers[:], root.level
    os.chdir(cwd)
    if data_dir is not None:
        os.environ["TFDS_DATA_DIR"] = str(data_dir)
    try:
        # Hydra configures logging for each run, and logging.config closes every existing
        # handler on the way, pytest's own among them: forget them instead of closing them.
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                mock.patch.object(logging.config, "_clearExistingHandlers", _forget_handlers):
            try:
                cli.main(list(args))
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        root.handlers[:] = previous_handlers
        root.setLevel(previous_level)
        os.chdir(previous_dir)
        if previous_data is None:
            os.environ.pop("TFDS_DATA_DIR", None)
        else:
            os.environ["TFDS_DATA_DIR"] = previous_data
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def read_wandb_records(path: Path) -> list:
    """Decode an offline `run-<id>.wandb` file into wandb's protobuf `Record`s.

    The file is a LevelDB-style log: a 7-byte header (b":W&B", magic, version), then 32 KiB
    blocks of chunks, each with a 7-byte header (crc32, length, type: 1 full, 2 first,
    3 middle, 4 last). wandb 0.31 no longer ships a Python reader, so the tests carry this one.
    """
    from wandb.proto import wandb_internal_pb2

    block, raw = 32768, Path(path).read_bytes()
    assert raw[:4] == b":W&B", f"{path} is not a W&B transaction log"
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(raw):
        left_in_block = block - pos % block
        if left_in_block < 7:
            pos += left_in_block
            continue
        length = int.from_bytes(raw[pos + 4:pos + 6], "little")
        kind = raw[pos + 6]
        chunk = raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def _items(updates) -> dict:
    return {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in updates}


def _add_run(out: dict, run) -> None:
    out["groups"].add(run.run_group)
    out["names"].add(run.display_name)
    out["job_types"].add(run.job_type)
    out["config"].update(_items(run.config.update))


def _add_artifact(out: dict, artifact) -> None:
    out["artifacts"].append((artifact.type, artifact.name,
                             sorted(e.path for e in artifact.manifest.contents)))


# What each kind of W&B record adds to `wandb_run_contents`.
_RECORD_READERS = {
    "history": lambda out, r: out["history"].append(_items(r.history.item)),
    "run": lambda out, r: _add_run(out, r.run),
    "config": lambda out, r: out["config"].update(_items(r.config.update)),
    "summary": lambda out, r: out["summary"].update(_items(r.summary.update)),
    "artifact": lambda out, r: _add_artifact(out, r.artifact),
    "stats": lambda out, r: out["stats"].append({i.key: i.value_json for i in r.stats.item}),
}


def wandb_run_contents(run_dir: Path) -> dict:
    """History rows, config keys, groups, names, job types, artifacts and summary of the
    offline W&B run(s) in `run_dir`."""
    files = sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))
    out: dict = {"files": files, "history": [], "config": {}, "groups": set(), "summary": {},
                 "names": set(), "job_types": set(), "artifacts": [], "stats": []}
    for file in files:
        for record in read_wandb_records(file):
            reader = _RECORD_READERS.get(record.WhichOneof("record_type"))
            if reader is not None:
                reader(out, record)
    return out


# ---------------------------------------------------------------------- mocked TFDS datasets


def _bound_or_unbound_getitems(*args: object, generator: object, serialized: bool = False):
    # TFDS 4.9.10 assigns functools.partial(_getitems, generator=...) as an attribute of a
    # MagicMock instance. MagicMock only binds the dunders it knows and `__getitems__` is not one,
    # so TFDS's own batched read calls the partial without `self` and the keys land in `self`.
    # Accept both call forms and delegate to TFDS's implementation.
    *_, record_keys = args
    return _ORIGINAL_GETITEMS(None, record_keys, generator=generator, serialized=serialized)


_ORIGINAL_GETITEMS = mocking._getitems


@pytest.fixture
def mock_tfds(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(mocking, "_getitems", _bound_or_unbound_getitems)
    # Mocked TFDS downloads nothing, so the offline probe of the real download hosts must not run.
    monkeypatch.setattr(tfds_reader, "_unreachable_hosts", lambda urls: "")
    # Nor does it read raw files, so it prepares without TensorFlow.
    monkeypatch.setattr(prepare, "tensorflow_step", lambda builder: "")
    return functools.partial(tfds.testing.mock_data, policy=tfds.testing.MockPolicy.USE_CODE)




# Modes a user's folder mixes: greyscale, RGB, RGB with alpha, palette.
IMAGE_MODES = ("L", "RGB", "RGBA", "P")


def make_image_folder(root: Path, counts: dict[str, int], seed: int = 0) -> Path:
    """`root/<class>/<i>.png|.jpg`: counts[class] random images of assorted sizes (6..40 px)
    and modes (IMAGE_MODES; JPEG only for L and RGB, which it can store)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name, count in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            height, width = (int(v) for v in rng.integers(6, 41, 2))
            mode = IMAGE_MODES[i % len(IMAGE_MODES)]
            img = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
            img = img.convert(mode)
            suffix = ".jpg" if mode in ("L", "RGB") and i % 2 else ".png"
            img.save(root / name / f"{i}{suffix}")
    return root


@contextlib.contextmanager
def xla_optimizations(on: bool):
    """Programs first compiled inside compile with XLA's default optimizations (`on`) or with
    most of them off, as tests/conftest.py sets them for the suite. The switch is read when a
    program compiles, and jit's caches do not key on it: a function this process compiled
    before keeps its executable, so only programs traced inside (a freshly built run's) take it.
    tests/test_optimized_xla.py checks that this gives a fresh optimized process's bits."""
    import jax

    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", not on)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture
def optimized_xla():
    """The test's programs compile as users' runs do (`xla_optimizations(True)`)."""
    with xla_optimizations(True):
        yield


def xla_probe() -> np.ndarray:
    """A conv + batch-norm gradient in float32, jitted afresh: its bits depend on how XLA
    optimized it (vectorized reductions sum in another order), so they tell a program compiled
    with the default optimizations from one compiled with most of them off."""
    import jax
    import jax.numpy as jnp

    def loss(w: jax.Array, x: jax.Array) -> jax.Array:
        y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        y = (y - y.mean((0, 1, 2))) / jnp.sqrt(y.var((0, 1, 2)) + 1e-5)
        return jnp.sum(jax.nn.relu(y) ** 2)

    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 3, 3, 16)).astype(np.float32)
    x = rng.normal(size=(32, 12, 12, 3)).astype(np.float32)
    return np.asarray(jax.jit(lambda w, x: jax.grad(loss)(w, x))(w, x))


def saved_state(step_dir: Path) -> dict:
    """A checkpoint's state as nested dicts of arrays, read with Orbax and NumPy only (not
    cnnlab's restore code): a packed checkpoint's buffers (cnnlab/runs/packing.py) are cut by
    the layout in its metadata, each leaf at its path; a tree-saved one is Orbax's tree."""
    import orbax.checkpoint as ocp

    state = ocp.StandardCheckpointer().restore(Path(step_dir) / "state")
    layout = json.loads((Path(step_dir) / "meta" / "metadata").read_text()).get("packed_layout")
    if layout is None:
        return state
    out: dict = {}
    for leaf in layout:
        flat = np.asarray(state["buffers"][leaf["buffer"]])
        size = int(np.prod(leaf["shape"]))
        node = out
        for key in leaf["path"][:-1]:
            node = node.setdefault(str(key), {})
        node[str(leaf["path"][-1])] = flat[leaf["offset"]:leaf["offset"] + size].reshape(
            leaf["shape"])
    return out
