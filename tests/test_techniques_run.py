"""A short real run (offline fashion_mnist, tiny ResNet) with every training technique switched on.

`TECHNIQUES` lists each option as the overrides that switch it on. `make test` trains the
`COMBINED` runs, which between them switch on every technique (checked below), several at a
time; `make test-full` also trains each technique alone.
"""

import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from cnnlab.training.loop import train
from tests.helpers import TINY, compose_config
from tests.test_train import with_overrides

# Validation split and evaluations, for the options that watch the validation error.
WATCHED = ["dataset.val_size=128", "train.eval_every=2"]

INITIALIZERS = ("lecun_normal", "lecun_uniform", "glorot_normal", "glorot_uniform", "he_normal",
                "he_uniform", "he_normal_fan_out", "he_uniform_fan_out", "orthogonal",
                "orthogonal_relu", "torch_uniform")

TECHNIQUES: dict[str, list[str]] = {
    # initializers: the first half on the convs, the rest on the dense layer, so runs combine
    **{f"init={name}": [f"init.conv={name}"] for name in INITIALIZERS[:6]},
    **{f"init={name}": [f"init.dense={name}"] for name in INITIALIZERS[6:]},
    # activations
    **{f"activation={name}": [f"activation={name}"] for name in (
        "relu", "leaky_relu", "sigmoid", "tanh", "scaled_tanh", "elu", "gelu", "silu")},
    "activation.negative_slope": ["activation=leaky_relu", "activation.negative_slope=0.2"],
    # normalization
    **{f"norm={name}": [f"norm={name}"] for name in ("none", "batch", "lrn", "group", "layer")},
    "norm.momentum": ["norm=batch", "norm.momentum=0.99", "norm.epsilon=1e-3"],
    # optimizers, decay, clipping
    **{f"optimizer={name}": [f"optimizer={name}"] for name in (
        "sgd", "momentum", "nesterov", "adadelta", "adam", "adamw")},
    "optimizer.decay=decoupled": ["optimizer=momentum", "optimizer.decay=decoupled",
                                  "optimizer.weight_decay=0.01"],
    "optimizer.clip_norm": ["optimizer.clip_norm=1.0"],
    # regularization
    "regularization.l1": ["regularization.l1=1e-5"],
    "regularization.l2": ["regularization.l2=1e-4", "optimizer.weight_decay=0"],
    "regularization.label_smoothing": ["regularization.label_smoothing=0.1"],
    # schedules and model selection
    **{f"schedule={name}": [f"schedule={name}"] for name in ("constant", "step", "cosine")},
    "schedule.warmup_steps": ["schedule.warmup_steps=2"],
    "schedule=plateau": ["schedule=plateau", "schedule.patience=0", *WATCHED],
    "early_stopping": ["early_stopping.patience=1", *WATCHED],
    # model regularizers
    "model.stochastic_depth": ["model.stochastic_depth=0.5"],
    "model.stochastic_depth_mode=example": ["model.stochastic_depth=0.5",
                                            "model.stochastic_depth_mode=example"],
    "model.dropout_at.block": ["model.dropout_at.block=0.3"],
    "model.dropout_at.head": ["model.dropout_at.head=0.3"],
    "model.dropout_at.stage": ["model.dropout_at.stage=0.1"],
    # preprocessing
    **{f"preprocess={name}": [f"preprocess={name}"] for name in (
        "channel", "mean_image", "zca", "none")},
    # augmentation, by its keys so that one run combines several (the presets are these keys:
    # tests/test_augment.py builds each); 28x28 images take a 14-pixel cutout
    "augment=none": ["augment=none"],
    "augment.crop_pad": ["augment.crop_pad=4"],
    "augment.flip": ["augment.flip=true"],
    "augment.resized_crop": ["augment.resized_crop=true", "augment.crop_scale=[0.08,1.0]"],
    "augment.lighting": ["augment.lighting=0.1"],
    "augment.color_jitter": ["augment.brightness=0.4", "augment.contrast=0.4",
                             "augment.saturation=0.4"],
    "augment.cutout": ["augment.cutout=14"],
    "augment.mixup": ["augment.mixup=1.0"],
    **{f"augment={name}": [f"augment={name}"] for name in ("alexnet", "inception", "mixup")},
    # (augment.hue needs RGB: fashion_mnist is grey, so test_augment_recipes.py alone checks it)
    "augment.scale_jitter": ["augment.scale_jitter=[28,40]", "augment.resized_crop=false"],
    "augment.affine": ["augment.affine.rotate=10", "augment.affine.scale=[0.9,1.1]",
                       "augment.affine.shear=5", "augment.affine.translate=0.1"],
    "augment.color_cast": ["augment.color_cast=20"],
    # evaluation
    "eval.ema_decay": ["eval.ema_decay=0.99"],
    "eval.tta=flip": ["eval.tta=flip"],
    "eval.tta=ten_crop": ["augment=crop_flip", "eval.tta=ten_crop"],
    "eval.crop_size": ["augment=flip", "eval.tta=ten_crop", "eval.crop_size=24"],
    "schedule=cyclic_cosine": ["schedule=cyclic_cosine", "schedule.cycles=2"],
    # dense scales need per-channel preprocessing (mean_image/zca are per pixel)
    "eval.scales": ["eval.scales=[20,28,36]", "eval.scale_mode=dense", "preprocess=channel"],
    "eval.scale_mode=crop": ["eval.scales=[28,36]", "eval.scale_mode=crop"],
}



def _keys(overrides: list[str]) -> dict[str, str]:
    return dict(o.split("=", 1) for o in overrides)


def combine(techniques: dict[str, list[str]]) -> list[list[str]]:
    """Pack the techniques into few runs: each goes into the first run whose overrides do not
    set one of its keys to another value (two activations cannot share a run)."""
    runs: list[dict[str, str]] = []
    for overrides in techniques.values():
        wanted = _keys(overrides)
        for run in runs:
            if all(run.get(k, v) == v for k, v in wanted.items()):
                run.update(wanted)
                break
        else:
            runs.append(dict(wanted))
    return [[f"{k}={v}" for k, v in run.items()] for run in runs]


# Each run switches on several techniques at once.
COMBINED = combine(TECHNIQUES)


def run_tiny(overrides: list[str], run_dir: Path, data_dir: Path) -> dict:
    args = with_overrides(TINY, train__steps=4, train__steps_per_call=2, train__log_every=2,
                          train__eval_every=0, checkpoint__every=2, dataset__max_examples=512,
                          train__batch_size=32, logger__mode="disabled")
    cfg = compose_config(args + overrides + [f"dataset.data_dir={data_dir}"])
    summary = train(cfg, run_dir)
    assert summary["status"] == "finished", summary
    assert math.isfinite(summary["final/train/loss"]), summary
    # Group choices are Hydra's to apply; plain keys must reach the run's config as given.
    for key, value in _keys(overrides).items():
        if "." in key:
            actual = OmegaConf.select(cfg, key)
            same = str(actual).replace(" ", "").lower() == value.lower() or _close(actual, value)
            assert same, (key, actual)
    return summary


def _close(actual, expected: str) -> bool:
    try:
        return math.isclose(float(actual), float(expected))
    except (TypeError, ValueError):
        return False


def test_combined_runs_switch_on_every_technique():
    for name, overrides in TECHNIQUES.items():
        assert any(set(overrides) <= set(run) for run in COMBINED), f"{name} is in no run"
    for run in COMBINED:
        keys = [o.split("=", 1)[0] for o in run]
        assert len({k: _keys(run)[k] for k in keys}) == len(set(keys)), run


@pytest.mark.parametrize("overrides", COMBINED, ids=lambda o: ",".join(o)[:80])
def test_combined_techniques_train(overrides, fashion_dir, tmp_path):
    run_tiny(overrides, tmp_path, fashion_dir)


@pytest.mark.slow
@pytest.mark.parametrize("overrides", list(TECHNIQUES.values()), ids=list(TECHNIQUES))
def test_each_technique_trains_alone(overrides, fashion_dir, tmp_path):
    run_tiny(overrides, tmp_path, fashion_dir)
