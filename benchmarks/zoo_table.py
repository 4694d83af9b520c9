"""Print the README's model-zoo table: parameters and multiply-adds as `cnnlab summary` gives them.

    .venv/bin/python benchmarks/zoo_table.py

ImageNet-sized models are summarized on `dataset=imagenet` (224x224x3, 1000 classes), the others
on `dataset=cifar10` (LeNet-5 on `dataset=mnist`); the networks that predate batch norm
with `norm=none`, as their papers describe them.
"""

import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cnnlab.config.groups import CONF_DIR, group_options
from cnnlab.models import build_model  # noqa: E402
from cnnlab.models.summary import summarize  # noqa: E402

PRE_BATCH_NORM = ("lenet", "alexnet", "zfnet", "vgg", "googlenet", "convnetjs")


def settings(model: str, input_size: int | None) -> list[str]:
    if model.startswith("lenet"):
        dataset = "mnist"
    elif input_size and input_size > 100:
        dataset = "imagenet"
    else:
        dataset = "cifar10"
    norm = "none" if model.startswith(PRE_BATCH_NORM) else "batch"
    return [f"dataset={dataset}", f"norm={norm}"]


def order(model: str) -> tuple:
    """Papers in historical order, ImageNet models before their CIFAR siblings, depth ascending."""
    family = next((i for i, p in enumerate(PRE_BATCH_NORM) if model.startswith(p)),
                  len(PRE_BATCH_NORM))
    digits = "".join(c for c in model if c.isdigit())
    depth = int(digits) if digits else 0
    return (family, "cifar" in model, depth in (20, 32, 44, 56, 110),
            model.startswith("plain"), depth, model)


def main() -> None:
    print("| model | `cnnlab summary` settings | input | parameters | multiply-adds |")
    print("|---|---|---|---:|---:|")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for model in sorted(group_options("model"), key=order):
            probe = compose(config_name="config", overrides=[f"model={model}"])
            overrides = settings(model, probe.model.get("input_size"))
            cfg = compose(config_name="config", overrides=[f"model={model}", *overrides])
            summary = summarize(build_model(cfg, cfg.dataset.num_classes),
                                tuple(cfg.dataset.image_shape), model, training_memory=False)
            shape = "x".join(map(str, summary.model_input_shape))
            macs = summary.macs / 1e9
            macs_text = f"{macs:.2f} G" if macs >= 0.1 else f"{summary.macs / 1e6:.2f} M"
            print(f"| {model} | {' '.join(overrides)} | {shape} | {summary.params:,} "
                  f"| {macs_text} |")


if __name__ == "__main__":
    main()
