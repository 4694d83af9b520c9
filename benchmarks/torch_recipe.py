"""He et al. 2016's CIFAR recipe in plain PyTorch, on a TFDS dataset, with no cnnlab code: the
reference side of `benchmarks/fidelity.py`.

SGD (momentum 0.9, weight decay 1e-4 on every parameter), batch 128, lr 0.1 divided by 10 at
50% and 75% of the steps, 4-pixel black-padded random crops and horizontal flips, per-channel
standardisation by the train set's mean and std, the nets of `torch_reference.CifarNet`. Each
epoch is a fresh permutation (the last, incomplete batch dropped). The train error is the mean
of the last 10 steps' batch errors; the test error is measured once at the end, with running BN
statistics. Prints one JSON line.

    TFDS_DATA_DIR=../shared/data/tfds_array_record \\
        python benchmarks/torch_recipe.py --depth 20 --plain --steps 300 --seed 0
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.torch_reference import CifarNet


def load(name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W, C) uint8 images and int64 labels, read with TFDS's array_record data source."""
    import tensorflow_datasets as tfds

    source = tfds.data_source(name, split=split)
    records = [source[i] for i in range(len(source))]
    images = np.stack([np.asarray(r["image"], np.uint8) for r in records])
    return images, np.array([r["label"] for r in records], np.int64)


def augment(batch: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """A random crop of the black-padded NCHW batch of [0, 1] pixels, and a flip (torchvision's
    RandomCrop(padding=4) and cnnlab's `augment.crop_pad`: the padding is black, not the mean)."""
    n, _, h, w = batch.shape
    padded = F.pad(batch, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    out = torch.stack([padded[i, :, oy[i]:oy[i] + h, ox[i]:ox[i] + w] for i in range(n)])
    out[flip] = out[flip].flip(-1)
    return out


def lr_at(step: int, steps: int, base: float) -> float:
    drops = sum(step >= int(f * steps) for f in (0.5, 0.75))
    return base * 0.1**drops


def train(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    train_x, train_y = load(args.dataset, "train")
    test_x, test_y = load(args.dataset, "test")
    pixels = train_x.astype(np.float32) / 255
    mean, std = pixels.mean((0, 1, 2)), pixels.std((0, 1, 2))

    mean_t, std_t = (torch.from_numpy(v).view(1, -1, 1, 1) for v in (mean, std))

    def pixels_nchw(images: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32) / 255)

    def standardise(x: torch.Tensor) -> torch.Tensor:
        return (x - mean_t) / std_t

    train_t, train_labels = pixels_nchw(train_x), torch.from_numpy(train_y)
    net = CifarNet(args.depth, not args.plain, in_channels=train_x.shape[-1],
                   num_classes=int(train_y.max()) + 1)
    optimizer = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    per_epoch = len(train_t) // args.batch_size
    errors, start = [], time.perf_counter()
    net.train()
    for step in range(args.steps):
        if step % per_epoch == 0:
            order = torch.randperm(len(train_t), generator=generator)
        idx = order[(step % per_epoch) * args.batch_size:][:args.batch_size]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr)
        logits = net(standardise(augment(train_t[idx], generator)))
        loss = F.cross_entropy(logits, train_labels[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        errors.append(100.0 * (logits.argmax(1) != train_labels[idx]).float().mean().item())
    net.eval()
    wrong = 0
    with torch.no_grad():
        test_t = standardise(pixels_nchw(test_x))
        for i in range(0, len(test_t), 1000):
            predicted = net(test_t[i:i + 1000]).argmax(1).numpy()
            wrong += int((predicted != test_y[i:i + 1000]).sum())
    return {"framework": "pytorch", "depth": args.depth, "residual": not args.plain,
            "seed": args.seed, "steps": args.steps,
            "train_error": float(np.mean(errors[-10:])),
            "test_error": 100.0 * wrong / len(test_y),
            "wall_time": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--plain", action="store_true", help="no shortcuts")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    print(json.dumps(train(p.parse_args(argv))))


if __name__ == "__main__":
    main()
