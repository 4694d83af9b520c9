"""The streamed input pipeline (cnnlab/data/stream.py) alone, beside the training step it feeds.

For each set, the pipeline's images/s with 0 (in-process) and N Grain worker processes: the
batches of `train.batch_size` read in `batch_indices`' order (cnnlab/data/device.py), decoded
(and resized), as the training loop pulls them; the first batch (worker start-up) is timed
apart. Then the training step's images/s on batches already on the device (the step alone), and
a whole streamed run's chunks (step + pipeline), so the two say whether the pipeline keeps up.

Sets: fashion_mnist (28x28 PNGs; TFDS_DATA_DIR) and a synthetic ImageNet-style set of JPEGs of
random sizes (shorter side 256-400, as most ImageNet photos), resized and centre-cropped to
224x224, prepared with TFDS into a temporary folder.

    TFDS_DATA_DIR=../shared/data/tfds_array_record python benchmarks/input_pipeline.py
"""

import argparse
import io
import logging
import os
import platform
import tempfile
import time

import jax
import numpy as np
import tensorflow_datasets as tfds

from cnnlab.cli import preflight
from cnnlab.data import placement as stream_config
from cnnlab.data import stream
from cnnlab.training import build as run_lib


def synthetic_builder() -> type:
    """The builder class, defined when called: Grain workers re-import this script as
    __mp_main__ and receive the class by value (cloudpickle), so a module-level definition
    would register the name twice there."""

    class SyntheticJpeg(tfds.core.GeneratorBasedBuilder):
        """Random-pixel JPEGs of ImageNet-like sizes, 10 classes (noise compresses badly: each file
        is larger than a photo of its size, so decoding is, if anything, slower than ImageNet's)."""

        VERSION = tfds.core.Version("1.0.0")
        SIZES = {"train": 512, "validation": 64}

        def _info(self) -> tfds.core.DatasetInfo:
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(num_classes=10)}))

        def _split_generators(self, dl_manager: object) -> dict:
            return {split: self._generate_examples(n, seed)
                    for seed, (split, n) in enumerate(self.SIZES.items())}

        def _generate_examples(self, n: int, seed: int):
            from PIL import Image

            rng = np.random.default_rng(seed)
            for i in range(n):
                short = int(rng.integers(256, 401))
                long = int(short * rng.uniform(1.0, 1.5))
                shape = (short, long) if i % 2 else (long, short)
                # Smooth-ish pixels (an upsampled 1/8 image): photo-like JPEG sizes.
                small = rng.integers(0, 256, (shape[0] // 8 + 1, shape[1] // 8 + 1, 3), np.uint8)
                img = Image.fromarray(small).resize((shape[1], shape[0]), Image.Resampling.BILINEAR)
                encoded = io.BytesIO()
                img.save(encoded, format="JPEG", quality=90)
                yield i, {"image": encoded.getvalue(), "label": i % 10}

    return SyntheticJpeg


def pipeline_rate(split: stream.StreamSplit, batch_size: int, batches: int,
                  options: stream.StreamOptions) -> tuple[float, float]:
    """(seconds to the first batch, images/s over the following `batches`)."""
    key = np.asarray(jax.random.split(jax.random.PRNGKey(0))[0])
    start = time.perf_counter()
    it = stream.train_batches(split, key, batch_size, 0, batches + 1, options)
    next(it)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(batches):
        np.asarray(next(it)[0])
    return first, batches * batch_size / (time.perf_counter() - start)


def step_rates(overrides: list[str], chunks: int) -> tuple[float, float, float]:
    """(compile seconds, images/s of the step on one device-resident chunk, images/s of
    streamed chunks: pipeline and step together)."""
    cfg = preflight.compose(overrides)
    run = run_lib.build(cfg)
    per_call, batch = cfg.train.steps_per_call, cfg.train.batch_size
    state, chunk = run.state, run.chunk_at(0)
    data = run.chunk_data(0, per_call)
    start = time.perf_counter()
    state, sums = chunk(state, data, per_call)
    jax.block_until_ready(sums)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(chunks):  # the same batches again: no reading at all
        state, sums = chunk(state, data, per_call)
    jax.block_until_ready(sums)
    step_rate = chunks * per_call * batch / (time.perf_counter() - start)
    start = time.perf_counter()
    for i in range(1, chunks + 1):
        state, sums = chunk(state, run.chunk_data(i * per_call, per_call), per_call)
    jax.block_until_ready(sums)
    streamed_rate = chunks * per_call * batch / (time.perf_counter() - start)
    run.feeder.close()
    return compile_s, step_rate, streamed_rate


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2, help="N of the N-worker rows")
    parser.add_argument("--batches", type=int, default=20, help="timed batches per row")
    parser.add_argument("--chunks", type=int, default=3, help="timed training chunks")
    parser.add_argument("--only", default=None, help="one set: fashion_mnist or jpeg")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"jax {jax.__version__} on {jax.devices()[0].platform}")
    with tempfile.TemporaryDirectory() as tmp:
        synthetic_builder()(data_dir=tmp, file_format="array_record").download_and_prepare()
        sets = {
            "fashion_mnist": (["dataset=fashion_mnist", "model=resnet20",
                               "train.batch_size=128"], 128),
            "synthetic JPEG -> 224": (["dataset=imagenet", "dataset.name=synthetic_jpeg",
                                       "dataset.num_classes=10", "dataset.train_size=512",
                                       f"dataset.data_dir={tmp}", "model=resnet18",
                                       "augment=flip", "train.batch_size=16"], 16),
        }
        for name, (overrides, batch) in sets.items():
            if args.only and not name.startswith(args.only.replace("jpeg", "synthetic")):
                continue
            common = [*overrides, "dataset.on_device=false", "dataset.stats_sample=64",
                      "train.steps=1000", "train.steps_per_call=2", "logger.mode=disabled"]
            split = stream_config.load_streamed(preflight.compose(common)).train
            for workers in (0, args.workers):
                options = stream.StreamOptions(workers=workers, threads=2)
                first, rate = pipeline_rate(split, batch, args.batches, options)
                print(f"| {name} | pipeline, {workers} workers | {rate:,.0f} | first batch "
                      f"after {first:.1f} s |")
            compile_s, step_rate, streamed_rate = step_rates(
                [*common, f"dataset.stream_workers={args.workers}"], args.chunks)
            model = next(o for o in overrides if o.startswith("model="))
            print(f"| {name} | training step alone ({model}, batch {batch}) | "
                  f"{step_rate:,.0f} | compiled in {compile_s:.0f} s |")
            print(f"| {name} | streamed training ({args.workers} workers) | "
                  f"{streamed_rate:,.0f} | pipeline and step together |")


if __name__ == "__main__":
    main()
