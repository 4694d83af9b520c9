"""The experiments/ studies: both sizes exist and compose, every job of every sweep passes the
training checks, the smoke size differs from the full one only in size, the full size holds the
papers' settings its header names, and every smoke size runs end to end on the offline data."""

import functools
import itertools
import json

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from cnnlab.cli.preflight import validate_for_training
from cnnlab.config.groups import CONF_DIR, group_options
from cnnlab.config.presets import resolve_presets
from cnnlab.runs.tracking import flatten
from cnnlab.training.optim import make_schedule
from tests.helpers import run_cli

STUDIES = ["resnet_vs_plain", "init_study", "activation_study", "batchnorm_study",
           "dropout_study", "augmentation_study", "vgg_depth", "loss_study"]
# Optuna searches: a full size and a smoke size too, tested in tests/test_pattern_search.py.
SEARCHES = ["pattern_search"]
# Transfer learning: a source run on task A, then a sweep on task B that starts from it.
TRANSFER = ["transfer_source", "transfer_study"]
SIZES = {"full": "{}", "smoke": "smoke/{}"}
GROUPS = {p.name for p in CONF_DIR.iterdir() if p.is_dir()}
# The keys a smoke size may change: how big the data, the net and the run are, and where it goes.
SIZE_KEYS = ("dataset.", "model.depth", "model.width", "train.steps", "train.batch_size",
             "train.steps_per_call", "train.log_every", "train.eval_every",
             "train.eval_batch_size", "checkpoint.enabled", "progress", "logger.tags")


@functools.cache
def compose_study(option: str, overrides: tuple[str, ...] = ()) -> DictConfig:
    """The composed config of `experiment=OPTION OVERRIDES`, with its `hydra` node (cached:
    callers copy before changing it)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=[f"experiment={option}", *overrides],
                       return_hydra_config=True)


def sweep_axes(cfg: DictConfig) -> dict[str, list[str]]:
    """`hydra.sweeper.params` as {key: [value, ...]}, parsed as Hydra's basic sweeper does."""
    params = cfg.hydra.sweeper.params
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    return {o.get_key_element(): (list(o.sweep_string_iterator()) if o.is_sweep_override()
                                  else [o.get_value_element_as_str()]) for o in parsed}


def jobs(axes: dict[str, list[str]]) -> list[dict[str, str]]:
    return [dict(zip(axes, values, strict=True)) for values in itertools.product(*axes.values())]


def as_overrides(job: dict[str, str]) -> tuple[str, ...]:
    return tuple(f"{key}={value}" for key, value in job.items())


def swept_values(config: DictConfig, choices: DictConfig, keys: list[str]) -> dict[str, str]:
    """What a finished job ran with, for each swept key (group keys: the option chosen)."""
    return {key: choices[key] if key in GROUPS else str(OmegaConf.select(config, key))
            for key in keys}


def training_config(cfg: DictConfig) -> DictConfig:
    """What `cnnlab train` checks and runs: the config without `hydra`, presets resolved."""
    cfg = cfg.copy()
    with open_dict(cfg):
        del cfg["hydra"]
    resolve_presets(cfg)
    return cfg


def full_and_smoke(study: str) -> tuple[DictConfig, DictConfig]:
    return compose_study(study), compose_study(f"smoke/{study}")


def test_every_study_exists_in_both_sizes():
    options = set(group_options("experiment"))
    for study in STUDIES:
        assert {study, f"smoke/{study}"} <= options, study
    # No smoke size without its full study (vgg_cifar10 is a recipe, like resnet_cifar10).
    assert {o.removeprefix("smoke/") for o in options if o.startswith("smoke/")} == set(
        STUDIES + SEARCHES + TRANSFER)
    for study in TRANSFER:
        assert {study, f"smoke/{study}"} <= options, study
    for search in SEARCHES:
        assert {search, f"smoke/{search}"} <= options, search


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("study", STUDIES)
def test_every_job_of_the_sweep_composes_and_validates(study, size):
    option = SIZES[size].format(study)
    cfg = compose_study(option)
    # One command runs the whole sweep, into a folder named after the study, tagged for W&B.
    assert cfg.hydra.mode == RunMode.MULTIRUN
    assert f"multirun/{option}/" in cfg.hydra.sweep.dir
    assert study in cfg.logger.tags
    axes = sweep_axes(cfg)
    assert axes and all(axes.values())
    # Compose each combination of the other axes once; a seed is a plain integer key, set here.
    seeds = axes.pop("seed", [str(cfg.seed)])
    for job in jobs(axes):
        job_cfg = compose_study(option, as_overrides(job))
        assert swept_values(job_cfg, job_cfg.hydra.runtime.choices, list(job)) == job
        run_cfg = training_config(job_cfg)
        for seed in seeds:
            run_cfg.seed = seed
            assert run_cfg.seed == int(seed)
            validate_for_training(run_cfg)


@pytest.mark.parametrize("study", STUDIES)
def test_smoke_size_differs_only_in_size(study):
    full, smoke = full_and_smoke(study)
    full_axes, smoke_axes = sweep_axes(full), sweep_axes(smoke)
    assert list(smoke_axes) == list(full_axes)
    for key, values in smoke_axes.items():
        assert set(values) <= set(full_axes[key]), key
    # The study's own axis keeps two contrasting values (the first axis; seeds come last).
    assert len(smoke_axes[next(iter(smoke_axes))]) >= 2
    assert len(jobs(smoke_axes)) <= 4
    # Same options in every group but the data set.
    skip = {"experiment", "dataset"}
    choices = {k: v for k, v in full.hydra.runtime.choices.items()
               if k not in skip and not k.startswith("hydra/")}
    assert choices == {k: v for k, v in smoke.hydra.runtime.choices.items()
                       if k not in skip and not k.startswith("hydra/")}
    assert full.dataset.name.startswith("cifar") and smoke.dataset.name == "fashion_mnist"
    # Same recipe: every key outside the size keys is equal (interpolations unresolved).
    flat_full, flat_smoke = (flatten(OmegaConf.to_container(c, resolve=False))
                             for c in (training_config(full), training_config(smoke)))
    assert flat_full.keys() == flat_smoke.keys()
    differ = {k for k in flat_full if flat_full[k] != flat_smoke[k]}
    assert all(k.startswith(SIZE_KEYS) for k in differ), sorted(
        k for k in differ if not k.startswith(SIZE_KEYS))
    assert set(full.logger.tags) <= set(smoke.logger.tags)
    assert smoke.dataset.max_examples <= 1024 and smoke.train.steps <= 8


def job_config(study: str, **job: str) -> DictConfig:
    return training_config(compose_study(study, as_overrides(job)))


def lrs_at(cfg: DictConfig, steps: list[int]) -> list[float]:
    schedule = make_schedule(cfg.schedule, cfg.optimizer.lr, cfg.train.steps)
    return [float(schedule(s)) for s in steps]


def assert_resnet_cifar10_recipe(cfg: DictConfig, lr: float = 0.1) -> None:
    """He et al. 2016, section 4.2 (experiment=resnet_cifar10)."""
    assert cfg.dataset.name == "cifar10" and cfg.dataset.val_size == 5000
    assert (cfg.train.steps, cfg.train.batch_size) == (64000, 128)
    assert (cfg.optimizer.name, cfg.optimizer.momentum, cfg.optimizer.weight_decay) == (
        "sgd", 0.9, 1e-4)
    assert cfg.optimizer.lr == lr
    assert lrs_at(cfg, [0, 31999, 32000, 47999, 48000, 63999]) == pytest.approx(
        [lr, lr, lr / 10, lr / 10, lr / 100, lr / 100])


def test_resnet_vs_plain_is_he_et_al_fig_6():
    axes = sweep_axes(compose_study("resnet_vs_plain"))
    depths = ["20", "32", "44", "56"]
    assert axes == {"model": [f"plain{d}" for d in depths] + [f"resnet{d}" for d in depths],
                    "seed": ["0", "1", "2"]}
    for model in ("plain56", "resnet56"):
        cfg = job_config("resnet_vs_plain", model=model)
        assert_resnet_cifar10_recipe(cfg)
        assert cfg.model.depth == 56 and cfg.model.residual == (model == "resnet56")
        assert (cfg.model.shortcut, cfg.model.width) == ("A", 16)
        assert (cfg.norm.name, cfg.init.conv, cfg.activation.name) == ("batch", "he_normal", "relu")
        assert (cfg.augment.crop_pad, cfg.augment.flip) == (4, True)


def test_init_study_is_a_deep_plain_net_without_bn():
    axes = sweep_axes(compose_study("init_study"))
    assert axes == {"init": ["lecun_uniform", "torch_uniform", "glorot_uniform", "he_normal"],
                    "activation": ["tanh", "relu"], "seed": ["0", "1", "2"]}
    for init in axes["init"]:
        cfg = job_config("init_study", init=init, activation="tanh")
        assert cfg.init.conv == cfg.init.dense == init and cfg.activation.name == "tanh"
        # ~30 weight layers as in He et al. 2015's Fig. 3, no shortcuts, no normalization.
        assert (cfg.model.depth, cfg.model.residual, cfg.norm.name) == (32, False, "none")
        assert_resnet_cifar10_recipe(cfg, lr=0.003)


def test_activation_study_is_the_notes_activations_with_and_without_bn():
    axes = sweep_axes(compose_study("activation_study"))
    assert axes == {"activation": ["sigmoid", "tanh", "scaled_tanh", "relu", "leaky_relu", "elu"],
                    "norm": ["batch", "none"], "seed": ["0", "1", "2"]}
    cfg = job_config("activation_study", activation="leaky_relu", norm="none")
    assert (cfg.model.depth, cfg.model.residual) == (20, False)
    assert cfg.activation.negative_slope == 0.01 and cfg.norm.name == "none"
    assert_resnet_cifar10_recipe(cfg, lr=0.01)


def test_batchnorm_study_is_ioffe_and_szegedy_x1_x5_x30():
    axes = sweep_axes(compose_study("batchnorm_study"))
    assert axes["norm"] == ["none", "batch"] and axes["seed"] == ["0", "1", "2"]
    rates = [float(v) for v in axes["optimizer.lr"]]
    assert [r / rates[0] for r in rates] == pytest.approx([1, 5, 30])
    for norm in ("none", "batch"):
        cfg = job_config("batchnorm_study", norm=norm, **{"optimizer.lr": "0.3"})
        assert cfg.norm.name == norm and (cfg.model.depth, cfg.model.residual) == (20, False)
        assert_resnet_cifar10_recipe(cfg, lr=0.3)


def assert_vgg_recipe(cfg: DictConfig) -> None:
    """Simonyan & Zisserman 2015, section 3.1, on CIFAR-10 (experiment=vgg_cifar10)."""
    assert cfg.dataset.name == "cifar10" and cfg.dataset.val_size == 5000
    assert cfg.train.batch_size == 256
    # 74 epochs of the 45k training images, to within one epoch.
    assert abs(cfg.train.steps - 74 * 45000 / 256) < 45000 / 256
    assert (cfg.optimizer.name, cfg.optimizer.lr, cfg.optimizer.momentum) == ("sgd", 0.01, 0.9)
    assert cfg.optimizer.weight_decay == 5e-4
    assert (cfg.schedule.name, cfg.schedule.factor, cfg.schedule.max_reductions) == (
        "plateau", 0.1, 3)
    assert cfg.schedule.metric == "val/error" and cfg.train.eval_every > 0
    assert (cfg.norm.name, cfg.init.conv, cfg.activation.name) == ("none", "he_normal", "relu")
    assert (cfg.augment.crop_pad, cfg.augment.flip) == (4, True)
    assert cfg.model.family == "stack" and cfg.model.width == 1


def test_vgg_recipe_is_one_run_of_vgg_d():
    cfg = compose_study("vgg_cifar10")
    assert not cfg.hydra.sweeper.params and cfg.hydra.mode != RunMode.MULTIRUN
    cfg = training_config(cfg)
    assert cfg.model.name == "vgg_d_cifar"
    assert_vgg_recipe(cfg)
    validate_for_training(cfg)


def test_vgg_depth_is_table_1_a_to_e():
    axes = sweep_axes(compose_study("vgg_depth"))
    assert axes == {"model": [f"vgg_{c}_cifar" for c in "abcde"], "seed": ["0", "1", "2"]}
    convs = {}
    for model in axes["model"]:
        cfg = job_config("vgg_depth", model=model)
        assert_vgg_recipe(cfg)
        layers = [str(layer) for layer in cfg.model.layers]
        convs[model[4]] = [layer for layer in layers if layer.startswith("conv")]
        assert layers.count("maxpool") == 5
        assert cfg.model.dropout == 0.5 and "dropout" in list(cfg.model.head)
    # Table 1: 8/10/13/13/16 conv layers (+3 fc = 11/13/16/16/19 weight layers); C's three
    # added layers are 1x1, D's are 3x3.
    assert {c: len(v) for c, v in convs.items()} == {"a": 8, "b": 10, "c": 13, "d": 13, "e": 16}
    assert sum(layer.startswith("conv1-") for layer in convs["c"]) == 3
    assert all(layer.startswith("conv3-") for c in "abde" for layer in convs[c])


def test_dropout_study_sweeps_the_rate_where_vgg_puts_it():
    axes = sweep_axes(compose_study("dropout_study"))
    assert axes["model.dropout"] == ["0.0", "0.25", "0.5", "0.75"]
    assert axes["model.dropout_at.conv"] == ["0.0", "0.2"] and axes["seed"] == ["0", "1", "2"]
    cfg = job_config("dropout_study", **{"model.dropout": "0.0", "model.dropout_at.conv": "0.2"})
    assert cfg.model.name == "vgg_a_cifar" and list(cfg.model.head) == ["fc-512", "dropout"]
    assert cfg.model.dropout == 0.0 and cfg.model.dropout_at.conv == 0.2
    assert_vgg_recipe(cfg)


def test_augmentation_study_is_the_presets_on_the_resnet_recipe():
    axes = sweep_axes(compose_study("augmentation_study"))
    assert axes == {"augment": ["none", "flip", "crop", "crop_flip", "color_jitter", "cutout",
                                "mixup"], "seed": ["0", "1", "2"]}
    for preset in axes["augment"]:
        cfg = job_config("augmentation_study", augment=preset)
        assert cfg.augment.name == preset and cfg.model.depth == 56 and cfg.model.residual
        assert_resnet_cifar10_recipe(cfg)
    none, cutout = (job_config("augmentation_study", augment=p) for p in ("none", "cutout"))
    assert (none.augment.crop_pad, none.augment.flip, none.augment.cutout) == (0, False, 0)
    assert (cutout.augment.crop_pad, cutout.augment.flip, cutout.augment.cutout) == (4, True, 16)


# `make test` trains the headline study's smoke size; every study's every job composes and
# validates above, and the others train through the same sweep and run code in the slow tests.
@pytest.mark.parametrize("study", [
    pytest.param(s, marks=() if s == "resnet_vs_plain" else pytest.mark.slow) for s in STUDIES])
def test_smoke_study_runs(study, fashion_dir, tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = run_cli(["train", "-m", f"experiment=smoke/{study}", "logger.mode=disabled",
                      f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path, data_dir=fashion_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    axes = sweep_axes(compose_study(f"smoke/{study}"))
    job_dirs = sorted(p.parent.parent for p in sweep_dir.rglob(".hydra/config.yaml"))
    assert len(job_dirs) == len(jobs(axes)), [p.name for p in job_dirs]
    steps = sum(OmegaConf.load(d / ".hydra" / "config.yaml").train.steps for d in job_dirs)
    assert f"cnnlab: sweep of {len(job_dirs)} jobs, {steps:,} training steps in all" in (
        result.stderr)
    ran = []
    for job_dir in job_dirs:
        summary = json.loads((job_dir / "summary.json").read_text())
        assert summary["status"] == "finished", (job_dir.name, summary)
        config = OmegaConf.load(job_dir / ".hydra" / "config.yaml")
        choices = OmegaConf.load(job_dir / ".hydra" / "hydra.yaml").hydra.runtime.choices
        assert summary["final_step"] == config.train.steps and config.train.steps <= 8
        assert config.dataset.name == "fashion_mnist" and not config.checkpoint.enabled
        job = swept_values(config, choices, list(axes))
        assert set(as_overrides(job)) <= set(OmegaConf.load(job_dir / ".hydra" / "overrides.yaml"))
        if "model" in axes:  # the folder names the net trained (plain8), not the choice (plain20)
            assert f"model={config.model.name}," in job_dir.name, job_dir.name
        ran.append(job)
    # Every job of the sweep ran, each once, with its own values.
    assert sorted(tuple(job.values()) for job in ran) == sorted(
        tuple(job.values()) for job in jobs(axes))
    if "model" in axes:  # and so does the compare table
        table = run_cli(["compare", str(sweep_dir)], cwd=tmp_path).stdout
        for job_dir in job_dirs:
            name = OmegaConf.load(job_dir / ".hydra" / "config.yaml").model.name
            choice = OmegaConf.load(job_dir / ".hydra" / "hydra.yaml").hydra.runtime.choices.model
            assert f"| {name} |" in table and (choice == name or choice not in table), table


@pytest.mark.parametrize("size", SIZES)
def test_transfer_study_is_yosinski_et_al_on_fashion_mnist_halves(size):
    """Task A = classes 0-4, task B = classes 5-9; AnB (finetune_top: the first k layers copied
    and frozen) and AnB+ (finetune_all, the backbone at the full lr) at every k; every job
    validates."""
    study = SIZES[size].format("transfer_study")
    source_study = compose_study(SIZES[size].format("transfer_source"))
    source = training_config(source_study)
    axes = sweep_axes(compose_study(study))
    assert axes["transfer"] == ["finetune_top", "finetune_all"]
    assert list(source.dataset.classes) == [0, 1, 2, 3, 4]
    # As above: each combination of the other axes composed once, each seed validated.
    seeds = axes.pop("seed", [str(source.seed)])
    for job in jobs(axes):
        cfg = training_config(compose_study(study, as_overrides(job)))
        for seed in seeds:
            cfg.seed = seed
            validate_for_training(cfg)
        assert list(cfg.dataset.classes) == [5, 6, 7, 8, 9] and cfg.dataset.num_classes == 5
        assert cfg.transfer.freeze_through is None and cfg.transfer.backbone_lr_mult == 1.0
        assert cfg.transfer.source == source_study.hydra.run.dir
    if size == "full":
        assert axes["transfer.load_through"] == ["stem_norm", "stage1", "stage2", "stage3"]
        assert len(axes["dataset.per_class"]) == 3 and len(seeds) == 3


@pytest.mark.slow  # tests/test_transfer.py trains transfer runs from a source in `make test`
def test_transfer_study_smoke_runs_after_its_source(fashion_dir, tmp_path):
    """The documented commands at CI size: task A, then the sweep on B (which reads A's run
    directory), then B from scratch; each job loads what its k says and freezes it or not."""
    source = run_cli(["train", "experiment=smoke/transfer_source", "logger.mode=disabled"],
                     cwd=tmp_path, data_dir=fashion_dir)
    assert source.returncode == 0, source.stderr[-3000:]
    source_dir = tmp_path / "multirun" / "smoke" / "transfer" / "source"
    assert json.loads((source_dir / "summary.json").read_text())["status"] == "finished"
    sweep_dir = tmp_path / "sweep"
    result = run_cli(["train", "-m", "experiment=smoke/transfer_study", "logger.mode=disabled",
                      f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path, data_dir=fashion_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = {"stem_norm": 2, "stage3": 5}
    summaries = [json.loads(p.read_text()) for p in sorted(sweep_dir.rglob("summary.json"))]
    assert len(summaries) == 4
    for summary in summaries:
        assert summary["status"] == "finished"
        transfer = summary["transfer"]
        k = len(transfer["frozen"]) if transfer["mode"] == "finetune_top" else None
        assert transfer["loaded_layers"] in loaded.values() and transfer["head_reset"] is False
        if k is not None:
            assert k == transfer["loaded_layers"]
        else:
            assert transfer["frozen"] == []
    baseline = run_cli(["train", "-m", "experiment=smoke/transfer_study", "transfer=scratch",
                        "transfer.source=null", "transfer.load_through=null",
                        "logger.mode=disabled", f"hydra.sweep.dir={tmp_path / 'scratch'}"],
                       cwd=tmp_path, data_dir=fashion_dir)
    assert baseline.returncode == 0, baseline.stderr[-3000:]
    scratch = [json.loads(p.read_text()) for p in (tmp_path / "scratch").rglob("summary.json")]
    assert len(scratch) == 1 and "transfer" not in scratch[0]
