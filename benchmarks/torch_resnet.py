"""PyTorch reference benchmark: CIFAR ResNet (He et al. 2016, section 4.2) training throughput.

This is the plain-PyTorch baseline that cnnlab's JAX/Flax runner is compared against. It is
meant to be what a careful student would write: eager mode, an idiomatic ``nn.Module`` model,
and a training loop that mirrors the real runner on synthetic data:

* the whole dataset (N=10,000 random 32x32x3 images, random labels) lives in memory as a
  ``uint8`` tensor in NHWC layout, like a TFDS/NumPy CIFAR array;
* every step gathers a random batch, converts it to float, normalizes per channel, applies a
  random crop with 4-pixel zero padding and a random horizontal flip (vectorized on the whole
  batch with a single gather, no per-image Python loop);
* forward, cross-entropy, backward, SGD (lr 0.1, momentum 0.9, weight decay 1e-4) step.

Model: depth 6n+2 (20, 32, 44, 56, 110), 3 stages of n basic blocks with 16/32/64 channels,
bias-free 3x3 convolutions, BatchNorm (momentum 0.1, eps 1e-5), ReLU, global average pooling
and a linear classifier. Shortcuts are "option A": identity, or when the shape changes a
stride-2 spatial subsample plus zero-padding of the channels (planes // 4 on each side), so the
shortcuts add no parameters. Convolutions use Kaiming-normal initialization.

Only the steps after ``--warmup`` are timed (``time.perf_counter``; CPU eager execution is
synchronous, and the loss is read back with ``.item()`` before the clock stops). Throughput is
``batch_size * steps / elapsed``; the median step time is reported too, as it is less sensitive
to other processes competing for the CPU.

Usage (from the repository root, with ``pip install torch==2.14.1``, the bench extra)::

    python benchmarks/torch_resnet.py                      # ResNet-20, batch 128, 30 steps
    python benchmarks/torch_resnet.py --depth 56 --channels-last
    python benchmarks/torch_resnet.py --threads 2 --json   # one JSON line for scripts
    python benchmarks/torch_resnet.py --check              # verify parameter counts and exit
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

# Well-known parameter counts of the option-A CIFAR ResNets with 10 classes.
EXPECTED_PARAMS: dict[int, int] = {
    20: 269_722,
    32: 464_154,
    44: 658_586,
    56: 853_018,
    110: 1_727_962,
}

# Per-channel CIFAR-10 mean / std (of pixel values scaled to [0, 1]).
CIFAR_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)


class ShortcutA(nn.Module):
    """Parameter-free "option A" shortcut: subsample by 2 and zero-pad the channel dimension."""

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection (ReLU after the addition)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = ShortcutA(planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs with depth 6n+2 (He et al. 2016, section 4.2)."""

    def __init__(self, depth: int = 20, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers: list[nn.Module] = []
        in_planes = 16
        for stage, planes in enumerate((16, 32, 64)):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                layers.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


def count_params(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def make_dataset(
    n: int, num_classes: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random uint8 images (N, 32, 32, 3) and int64 labels, held in memory like CIFAR."""
    images = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, num_classes, (n,), dtype=torch.int64, generator=generator)
    return images, labels


def augment(
    batch_u8: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    generator: torch.Generator,
    channels_last: bool,
    pad: int = 4,
) -> torch.Tensor:
    """uint8 NHWC batch -> normalized, randomly cropped and flipped float NCHW batch.

    ``scale`` / ``shift`` fold the /255 and per-channel (x - mean) / std into one affine map.
    Normalization happens before padding, so the padded border is zero in normalized space
    (as in the runner). Crop and flip are a single vectorized ``index_select`` over the padded
    batch: one flat index per output pixel, with the column order reversed for flipped images.
    """
    b, h, w, c = batch_u8.shape
    hp, wp = h + 2 * pad, w + 2 * pad
    x = batch_u8.float().mul_(scale).add_(shift)  # (B, H, W, C)
    x = F.pad(x, (0, 0, pad, pad, pad, pad))  # zero-pad H and W: (B, Hp, Wp, C)
    dev = batch_u8.device
    oy = torch.randint(0, 2 * pad + 1, (b, 1, 1), generator=generator, device=dev)
    ox = torch.randint(0, 2 * pad + 1, (b, 1, 1), generator=generator, device=dev)
    flip = torch.rand((b, 1, 1), generator=generator, device=dev) < 0.5
    ar_h = torch.arange(h, device=dev).view(1, h, 1)
    ar_w = torch.arange(w, device=dev).view(1, 1, w)
    rows = oy + ar_h  # (B, H, 1)
    cols = ox + torch.where(flip, w - 1 - ar_w, ar_w)  # (B, 1, W)
    flat = (torch.arange(b, device=dev).view(b, 1, 1) * (hp * wp) + rows * wp + cols).view(-1)
    x = x.view(-1, c).index_select(0, flat).view(b, h, w, c)
    x = x.permute(0, 3, 1, 2)  # NCHW view with channels-last strides
    if channels_last:
        return x.contiguous(memory_format=torch.channels_last)
    return x.contiguous()


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    batch_size: int,
    generator: torch.Generator,
    channels_last: bool,
) -> torch.Tensor:
    """One full training step: sample, augment, forward, loss, backward, SGD update."""
    idx = torch.randint(0, images.shape[0], (batch_size,), generator=generator)
    x = augment(images[idx], scale, shift, generator, channels_last)
    y = labels[idx]
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def check_param_counts() -> None:
    """Assert the well-known option-A parameter counts for every supported depth."""
    for depth, expected in EXPECTED_PARAMS.items():
        got = count_params(CifarResNet(depth, num_classes=10))
        status = "ok" if got == expected else "MISMATCH"
        print(f"resnet{depth}: {got:,} parameters (expected {expected:,}) {status}")
        assert got == expected, f"resnet{depth}: {got} != {expected}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=20, help="6n+2: 20, 32, 44, 56, 110")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=30, help="timed steps (after warmup)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before timing")
    p.add_argument("--num-images", type=int, default=10_000, help="synthetic dataset size")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--channels-last", action="store_true", help="use NHWC memory format")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.add_argument("--check", action="store_true", help="verify parameter counts and exit")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.check:
        check_param_counts()
        return
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    model = CifarResNet(args.depth, args.num_classes)
    params = count_params(model)
    expected = EXPECTED_PARAMS.get(args.depth) if args.num_classes == 10 else None
    if expected is not None and params != expected:
        raise SystemExit(f"resnet{args.depth}: {params} params, expected {expected}")
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = torch.optim.SGD(
        model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, foreach=True
    )

    images, labels = make_dataset(args.num_images, args.num_classes, gen)
    mean = torch.tensor(CIFAR_MEAN)
    std = torch.tensor(CIFAR_STD)
    scale, shift = 1.0 / (255.0 * std), -mean / std  # x_u8 * scale + shift == (x/255 - m) / s

    def step() -> torch.Tensor:
        return train_step(
            model, optimizer, images, labels, scale, shift, args.batch_size, gen, args.channels_last
        )

    for _ in range(args.warmup):
        step()
    loss = torch.zeros(())
    step_times: list[float] = []
    start = time.perf_counter()
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = step()
        step_times.append(time.perf_counter() - t0)
    final_loss = loss.item()  # waits for the last step (CPU eager is synchronous anyway)
    elapsed = time.perf_counter() - start

    step_ms = 1000.0 * elapsed / max(args.steps, 1)
    # The median is robust to bursts of contention from other processes on a shared machine.
    step_ms_median = 1000.0 * statistics.median(step_times) if step_times else float("nan")
    images_per_sec = args.batch_size * args.steps / elapsed if elapsed > 0 else float("nan")
    result = {
        "framework": "pytorch",
        "model": f"resnet{args.depth}",
        "batch_size": args.batch_size,
        "images_per_sec": round(images_per_sec, 2),
        "step_ms": round(step_ms, 3),
        "step_ms_median": round(step_ms_median, 3),
        "params": params,
        "torch": torch.__version__.split("+")[0],
        "threads": torch.get_num_threads(),
        "channels_last": args.channels_last,
        "steps": args.steps,
        "warmup": args.warmup,
        "final_loss": round(final_loss, 4),
    }
    if args.json:
        print(json.dumps(result))
    else:
        layout = "channels-last" if args.channels_last else "NCHW"
        print(
            f"pytorch {torch.__version__} resnet{args.depth} ({params:,} params) "
            f"batch {args.batch_size} {layout}, {result['threads']} threads on "
            f"{platform.machine()}: {images_per_sec:.1f} img/s, {step_ms:.1f} ms/step "
            f"(median {step_ms_median:.1f} ms; {args.steps} timed steps after {args.warmup} "
            f"warmup, loss {final_loss:.3f})"
        )


if __name__ == "__main__":
    main()
