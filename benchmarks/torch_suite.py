"""One PyTorch run of the `make bench` suite (eager or torch.compile), in its own process.

The same network as cnnlab's entry (benchmarks/suite.py): the option-A CIFAR ResNets of
benchmarks/torch_resnet.py, torchvision's VGG-11 with the 32x32 head of cnnlab's vgg_a_cifar
(FC-512, dropout, classifier after the 1x1x512 features), torchvision's ResNet-18 and
ResNet-50. The training step mirrors cnnlab's: a random batch gathered from uint8 NHWC images
in memory, normalized, the entry's crop/flip (torch_resnet.augment), cross-entropy, SGD
(lr 0.1, momentum 0.9, weight decay 1e-4), fp32. `--compile` wraps the model in
torch.compile (inductor; its on-disk caches off, so every run pays a cold compile) and leaves
the optimizer eager, the usual way to use it. Prints one JSON line.

    python -m benchmarks.torch_suite --model vgg11 --compile
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.suite import (
    Entry,
    add_entry_args,
    emit,
    entry_from_args,
    peak_rss_mib,
    usable_cores,
    warmup_overhead_s,
)
from benchmarks.torch_resnet import CIFAR_MEAN, CIFAR_STD, CifarResNet, augment, count_params
from cnnlab import host_memory


def vgg11_cifar(num_classes: int) -> nn.Module:
    """torchvision's VGG-11 (configuration A, no batch norm) with cnnlab's 32x32 head: five
    poolings leave 1x1x512, so no 7x7 average pool and FC-512 instead of the FC-4096 pair."""
    import torchvision

    model = torchvision.models.vgg11(num_classes=num_classes)
    model.avgpool = nn.Identity()
    model.classifier = nn.Sequential(nn.Linear(512, 512), nn.ReLU(inplace=True),
                                     nn.Dropout(0.5), nn.Linear(512, num_classes))
    return model


def make_model(entry: Entry) -> nn.Module:
    if entry.name.startswith("resnet") and entry.shape[0] == 32:
        return CifarResNet(int(entry.name.removeprefix("resnet")), entry.num_classes)
    if entry.name == "vgg11":
        return vgg11_cifar(entry.num_classes)
    import torchvision

    return getattr(torchvision.models, entry.name)(num_classes=entry.num_classes)


class Trainer:
    """The data, model and optimizer of one run, and its training step."""

    def __init__(self, entry: Entry, device: torch.device, compiled: bool) -> None:
        self.entry, self.device = entry, device
        self.gen = torch.Generator(device=device).manual_seed(0)
        h, w, c = entry.shape
        self.images = torch.randint(0, 256, (entry.num_images, h, w, c), dtype=torch.uint8,
                                    generator=self.gen, device=device)
        self.labels = torch.randint(0, entry.num_classes, (entry.num_images,),
                                    generator=self.gen, device=device)
        mean = torch.tensor(CIFAR_MEAN, device=device)
        std = torch.tensor(CIFAR_STD, device=device)
        self.scale, self.shift = 1.0 / (255.0 * std), -mean / std
        self.model = make_model(entry).to(device).train()
        self.params = count_params(self.model)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9,
                                         weight_decay=1e-4, foreach=True)
        self.forward = torch.compile(self.model) if compiled else self.model

    def step(self) -> torch.Tensor:
        idx = torch.randint(0, self.entry.num_images, (self.entry.batch_size,),
                            generator=self.gen, device=self.device)
        x = augment(self.images[idx], self.scale, self.shift, self.gen, channels_last=False,
                    pad=self.entry.crop_pad)
        loss = F.cross_entropy(self.forward(x), self.labels[idx])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def timed_steps(self, n: int) -> list[float]:
        """`n` steps, each timed to completion (.item() waits for the device)."""
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            self.step().item()
            times.append(time.perf_counter() - t0)
        return times


def run(entry: Entry, compiled: bool, threads: int | None) -> dict:
    torch.set_num_threads(threads or usable_cores())
    torch.compiler.config.force_disable_caches = True
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    trainer = Trainer(entry, device, compiled)
    warm = trainer.timed_steps(max(1, entry.warmup))
    start = time.perf_counter()
    times = trainer.timed_steps(max(1, entry.steps))
    elapsed = time.perf_counter() - start
    median = statistics.median(times)
    on_cpu = device.type == "cpu"
    return {
        "framework": "compiled" if compiled else "eager", "model": entry.name,
        "batch_size": entry.batch_size, "input": entry.input, "params": trainer.params,
        "images_per_sec": len(times) * entry.batch_size / elapsed,
        "step_ms_median": 1000 * median, "steps": len(times),
        "compile_s": warmup_overhead_s(warm, median) if compiled else None,
        "first_call_s": warm[0],
        "peak_mib": peak_rss_mib() if on_cpu else torch.cuda.max_memory_allocated() / 2**20,
        "peak_kind": "process peak RSS" if on_cpu else "torch.cuda.max_memory_allocated",
        "platform": "cpu" if on_cpu else "gpu",
        "device": "cpu" if on_cpu else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "host_huge_pages": host_memory.huge_pages(),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_entry_args(p)
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--threads", type=int, help="intra-op threads (default: usable cores)")
    args = p.parse_args(argv)
    emit(run(entry_from_args(args), args.compile, args.threads))


if __name__ == "__main__":
    main()
