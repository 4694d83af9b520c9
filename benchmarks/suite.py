"""The entries of the `make bench` suite and what its child processes share.

Each entry is one network at one input size and batch, described for both sides: the cnnlab
config overrides and the PyTorch model name (benchmarks/torch_suite.py builds it). Imported by
the runner (benchmarks/bench.py) and by both children, so neither side can drift from the other.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import sys

FRAMEWORKS = ("cnnlab", "eager", "compiled")


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    cnnlab: tuple[str, ...]  # model/dataset/augment overrides of conf/config.yaml
    shape: tuple[int, int, int]  # (H, W, C)
    num_classes: int
    batch_size: int
    # Augmentation on both sides: pad-N random crop (0: none) and a random horizontal flip.
    crop_pad: int
    # Random uint8 images held in memory; fewer at 224x224 (512 of them take 77 MB).
    num_images: int
    # cnnlab's steps per compiled call: its config default (10) where the compile stays short;
    # ResNet-110 and the 224x224 nets take fewer. (ResNet-56 took 2 until 2026-12-05, when 10
    # unrolled steps of it took 5 min to compile; they now take 43 s.)
    steps_per_call: int
    steps: int  # timed steps per framework
    warmup: int  # untimed steps before them (compilation included)

    @property
    def input(self) -> str:
        h, w, c = self.shape
        return f"{h}x{w}x{c}"


_CIFAR = ("dataset=cifar10", "augment=crop_flip")
# torchvision's models: ResNet-50 "v1.5" strides in the 3x3 conv, VGG-11 has no batch norm.
_IMAGENET = ("dataset=imagenet", "augment=flip")

ENTRIES: dict[str, Entry] = {e.name: e for e in (
    Entry("resnet20", ("model=resnet20", *_CIFAR), (32, 32, 3), 10, 128, 4, 10_000, 10, 30, 10),
    Entry("resnet56", ("model=resnet56", *_CIFAR), (32, 32, 3), 10, 128, 4, 10_000, 10, 30, 10),
    Entry("resnet110", ("model=resnet110", *_CIFAR), (32, 32, 3), 10, 128, 4, 10_000, 1, 6, 2),
    Entry("vgg11", ("model=vgg_a_cifar", "norm=none", *_CIFAR), (32, 32, 3), 10, 128, 4,
          10_000, 2, 12, 4),
    Entry("resnet18", ("model=resnet18", *_IMAGENET), (224, 224, 3), 1000, 16, 0, 512, 2, 12, 4),
    Entry("resnet50", ("model=resnet50", "model.stride_at=3x3", *_IMAGENET), (224, 224, 3), 1000,
          16, 0, 512, 1, 6, 2),
)}


def quick(entry: Entry) -> Entry:
    """The entry cut to a few small steps (tests, smoke runs): batch 8, 2 timed steps."""
    return dataclasses.replace(entry, batch_size=8, num_images=64, steps_per_call=1, steps=2,
                               warmup=1)


def add_entry_args(parser: argparse.ArgumentParser) -> None:
    """The options both children take to pick and size their entry."""
    parser.add_argument("--model", choices=sorted(ENTRIES), required=True)
    parser.add_argument("--steps", type=int, help="timed steps (default: the entry's)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default: the entry's)")
    parser.add_argument("--quick", action="store_true", help="batch 8, a few steps (tests)")


def entry_from_args(args: argparse.Namespace) -> Entry:
    entry = quick(ENTRIES[args.model]) if args.quick else ENTRIES[args.model]
    return dataclasses.replace(entry, steps=entry.steps if args.steps is None else args.steps,
                               warmup=entry.warmup if args.warmup is None else args.warmup)


def alternating_orders(items: list, rounds: int) -> list[list]:
    """The order of each of `rounds` rounds: `items`, reversed every other round. An item then
    follows its left neighbour in one round and its right one in the next, so from two rounds on
    none always follows the same one, and none always runs first (bench.py's runs,
    conv_layers.py's calls)."""
    return [list(items) if r % 2 == 0 else list(items)[::-1] for r in range(rounds)]


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1 (a count of rounds or repetitions)."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"wants a whole number of at least 1, got {text!r}")
    return int(text)


def usable_cores() -> int:
    """The cores this process may run on (its affinity), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no affinity
        return os.cpu_count() or 1


def peak_rss_mib() -> float:
    """This process's peak resident set size in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def warmup_overhead_s(warmup_times: list[float], median_s: float) -> float:
    """Compile time as the warm-up's time beyond that of as many steady-state steps (or calls):
    the first steps run the compiled code too, which is not compilation."""
    return max(sum(warmup_times) - len(warmup_times) * median_s, 0.0)


def emit(result: dict) -> None:
    """A child's result: one JSON line, the last line of its stdout."""
    print(json.dumps(result), flush=True)
