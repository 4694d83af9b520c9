"""Loading fashion_mnist (train + test): decoded from TFDS's files vs read from the data cache.

Each row times a whole `cnnlab.data.load.load_dataset` call, what a run pays before training: fresh
(no cache: every PNG decoded), cold (decoded and stored in an empty cache) and warm (read back
from the cache; the median of `--repeats`). Every load also computes the train set's channel
mean/std, timed alone on the last line; TFDS's import is paid before any timing.

    TFDS_DATA_DIR=../shared/data/tfds_array_record python benchmarks/data_cache.py
"""

import argparse
import logging
import statistics
import tempfile
import time
from collections.abc import Callable

import numpy as np

from cnnlab.data import load as data
from cnnlab.data.types import Dataset


def timed(load: Callable[[], Dataset]) -> tuple[float, Dataset]:
    start = time.perf_counter()
    dataset = load()
    return time.perf_counter() - start, dataset


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--data-dir", default=None, help="TFDS data dir (default: TFDS's)")
    parser.add_argument("--repeats", type=int, default=3, help="timed warm loads (median)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import tensorflow_datasets  # noqa: F401  (its import is not part of any timing)

    def load(cache_dir: str | None) -> Dataset:
        return data.load_dataset(args.dataset, data_dir=args.data_dir, cache_dir=cache_dir)

    fresh_s, fresh = timed(lambda: load(None))
    with tempfile.TemporaryDirectory() as cache_dir:
        cold_s, _ = timed(lambda: load(cache_dir))
        warm = [timed(lambda: load(cache_dir)) for _ in range(args.repeats)]
    warm_s = statistics.median(seconds for seconds, _ in warm)
    for _, dataset in warm:
        for name in ("train", "test"):
            got, want = getattr(dataset, name), getattr(fresh, name)
            assert np.array_equal(got.images, want.images), name
            assert np.array_equal(got.labels, want.labels), name
    stats_s, _ = timed(lambda: data.channel_mean_std(fresh.train.images))

    examples = len(fresh.train) + len(fresh.test)
    print(f"{args.dataset}: {examples} examples (train + test), load_dataset wall time")
    print(f"fresh decode (no cache):        {fresh_s:7.2f} s")
    print(f"cold cache (decode + store):    {cold_s:7.2f} s")
    print(f"warm cache (median of {args.repeats}):      {warm_s:7.2f} s")
    print(f"speed-up fresh / warm:          {fresh_s / warm_s:7.1f}x")
    print(f"  of each load, train mean/std: {stats_s:7.2f} s")


if __name__ == "__main__":
    main()
