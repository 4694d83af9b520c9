"""Config composition, the experiment recipe, and one-line errors for bad input."""

import dataclasses
from pathlib import Path

import pytest
from omegaconf import MISSING, OmegaConf

from cnnlab.cli.preflight import validate
from cnnlab.config.groups import CONF_DIR, group_options, option_values, root_values
from cnnlab.config.schema import (
    ActivationConfig,
    AffineConfig,
    AugmentConfig,
    CheckpointConfig,
    Config,
    DatasetConfig,
    DiagnosticsConfig,
    EarlyStoppingConfig,
    EvalConfig,
    InitConfig,
    LoggerConfig,
    LossConfig,
    LrFindConfig,
    NormConfig,
    OptimizerConfig,
    PreprocessConfig,
    RegularizationConfig,
    ResumeConfig,
    ScheduleConfig,
    SummaryConfig,
    TrainConfig,
    TransferConfig,
)
from cnnlab.errors import ConfigError
from cnnlab.models.cifar_resnet import CifarResNetOptions
from cnnlab.models.pattern import PatternOptions
from cnnlab.models.stack import StackOptions
from cnnlab.runs.tracking import flatten
from cnnlab.training.optim import make_schedule
from tests.helpers import compose_config, make_image_folder, run_cli


def test_defaults_compose_to_the_documented_run():
    cfg = compose_config()
    assert cfg.model.name == "resnet20" and cfg.model.depth == 20 and cfg.model.shortcut == "A"
    assert cfg.dataset.name == "fashion_mnist"
    # `augment: default` resolves to the dataset's preset, so logs show what ran.
    assert cfg.augment.name == "crop_flip" and cfg.augment.crop_pad == 4 and cfg.augment.flip
    assert (cfg.optimizer.lr, cfg.optimizer.momentum, cfg.optimizer.weight_decay) == (
        0.1, 0.9, 1e-4)
    assert cfg.logger.mode == "offline"
    validate(cfg)


# Options that watch the validation error need a validation split.
NEEDS = {"schedule=plateau": ["dataset.val_size=100"]}


GROUPS = ["model", "dataset", "init", "activation", "norm", "preprocess", "augment", "optimizer",
          "schedule", "logger"]


def test_every_group_has_options():
    for group in GROUPS:
        assert group_options(group), f"conf/{group} is empty"


def test_saved_runs_under_experiments_results_are_not_experiments():
    # experiments/results/resnet_vs_plain_2000/ keeps finished runs' .hydra/config.yaml files.
    saved = list((CONF_DIR / "experiment" / "results").rglob("*.yaml"))
    assert saved, "the premise: experiments/results holds saved run configs"
    options = group_options("experiment")
    assert "resnet_vs_plain" in options and "smoke/resnet_vs_plain" in options
    assert not [o for o in options if o.startswith("results/") or "/." in o]


def own_values(group: str, option: str) -> dict[str, object]:
    """The values an option's own YAML file sets, read with OmegaConf alone (its defaults list
    and interpolations left out), as {dotted key: value}."""
    raw = OmegaConf.to_container(OmegaConf.load(CONF_DIR / group / f"{option}.yaml"),
                                 resolve=False)
    raw.pop("defaults", None)
    return {k: v for k, v in flatten(raw).items() if not (isinstance(v, str) and "${" in v)}


# One test per option, so that the test processes share the model group's traces (each
# model's geometry is traced: a second for most, ~14 s for the 600 blocks of resnet1202).
@pytest.mark.parametrize("choice", [f"{group}={option}" for group in GROUPS
                                    for option in group_options(group)])
def test_every_group_option_composes_to_its_files_values_and_validates(choice, tmp_path):
    """Each option's own values reach the composed config (no base file or `_self_` order
    overrides them; `augment=default`: the values of the preset the dataset names), and the
    composed config passes the training checks."""
    needs = dict(NEEDS)
    group, option = choice.split("=")
    if choice == "dataset=folder":  # it reads the folder it names (its classes) while composing
        folder = make_image_folder(tmp_path / "images", {"a": 2, "b": 2})
        needs[choice] = [f"dataset.path={folder}", "dataset.image_size=[8,8]"]
    cfg = compose_config([choice, *needs.get(choice, [])])
    composed = flatten(OmegaConf.to_container(cfg[group], resolve=False))
    if choice == "augment=default":
        option = cfg.dataset.default_augment
    want = own_values(group, option)
    if choice == "dataset=folder":  # the command line and the folder's 2 classes fill its nulls
        want.update(path=str(folder), image_size=[8, 8], image_shape=[8, 8, 3], num_classes=2,
                    train_size=4)
    assert want and {k: composed.get(k) for k in want} == want
    validate(cfg)


def test_plain_and_resnet_differ_only_in_shortcuts():
    for depth in (20, 32, 44, 56, 110):
        plain = compose_config([f"model=plain{depth}"]).model
        res = compose_config([f"model=resnet{depth}"]).model
        assert plain.depth == res.depth == depth
        assert (plain.residual, res.residual) == (False, True)


def test_paper_recipe_is_one_override_away():
    cfg = compose_config(["experiment=resnet_cifar10", "model=resnet110"])
    assert cfg.dataset.name == "cifar10" and cfg.dataset.val_size == 5000
    assert cfg.augment.crop_pad == 4 and cfg.augment.flip
    assert (cfg.train.steps, cfg.train.batch_size) == (64000, 128)
    assert cfg.model.depth == 110
    schedule = make_schedule(cfg.schedule, cfg.optimizer.lr, cfg.train.steps)
    # He et al.: 0.1, divided by 10 at 32k and 48k iterations.
    lrs = [float(schedule(s)) for s in (0, 31999, 32000, 47999, 48000, 63999)]
    assert lrs == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])


@pytest.mark.parametrize("override, message", [
    ("train.steps=0", "train.steps=0 must be a positive integer"),
    ("train.batch_size=-4", "train.batch_size=-4 must be a positive integer"),
    ("model.depth=21", "model.depth=21 is not 6n+2"),
    ("model.shortcut=D", "valid choices: A, B, C"),
    ("init.conv=he_normall", "unknown initializer 'he_normall'; valid choices:"),
    ("schedule.milestones=[0.8,0.5]", "must be increasing fractions"),
])
def test_semantic_validation_names_the_value(override, message):
    with pytest.raises(ConfigError, match=None) as info:
        validate(compose_config([override]))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("args, expected", [
    (["model=resnet21"], ["resnet21", "resnet56", "plain20"]),
    (["train.steps=abc"], ["train.steps", "abc"]),
    (["train.stepz=3"], ["stepz"]),
    (["train.batch_size=-1"], ["train.batch_size=-1"]),
    (["-m", "model=resnet20,resnet99", "seed=0,1"], ["resnet99", "valid choices"]),
    (["dataset=imagenet42"], ["imagenet42", "fashion_mnist", "cifar10"]),
    (["optimizer.lr=fast"], ["optimizer.lr", "fast"]),
    (["train.conv_impl=winograd3"], ["train.conv_impl='winograd3'", "auto", "im2col"]),
])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, args, expected):
    result = run_cli(["train", *args, f"hydra.run.dir={tmp_path}"], cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for word in expected:
        assert word in lines[0]
    # Rejected before anything ran: no run directory content.
    assert not (tmp_path / "metrics.jsonl").exists()


def test_cli_unknown_command(tmp_path):
    result = run_cli(["trian"], cwd=tmp_path, fresh_process=True)
    assert result.returncode == 2
    assert result.stderr.strip() == ("cnnlab: error: unknown command 'trian'; valid choices: "
                                     "train, summary, eval, compare, lr_find, viz, compile")


# ------------------------------------------------------------ every value lives in conf/

SCHEMAS = {"dataset": DatasetConfig, "init": InitConfig, "activation": ActivationConfig,
           "norm": NormConfig, "preprocess": PreprocessConfig, "augment": AugmentConfig,
           "optimizer": OptimizerConfig, "schedule": ScheduleConfig, "logger": LoggerConfig,
           "transfer": TransferConfig}


def test_schema_defaults_are_missing_or_null_only():
    # A value in a dataclass would be a second definition of a default that conf/ holds.
    classes = [*SCHEMAS.values(), Config, RegularizationConfig, EarlyStoppingConfig, EvalConfig,
               TrainConfig, CheckpointConfig, ResumeConfig, SummaryConfig, CifarResNetOptions,
               StackOptions, LossConfig, LrFindConfig, DiagnosticsConfig, AffineConfig,
               PatternOptions]
    for cls in classes:
        for field in dataclasses.fields(cls):
            if field.default is dataclasses.MISSING:  # a section: default_factory
                assert field.default_factory in classes, f"{cls.__name__}.{field.name}"
            else:
                assert field.default in (MISSING, None), f"{cls.__name__}.{field.name}"


@pytest.mark.parametrize("group", sorted(SCHEMAS))
def test_every_group_option_yields_all_its_keys(group):
    for option in group_options(group):
        values = OmegaConf.merge(OmegaConf.structured(SCHEMAS[group]),
                                 option_values(group, option))
        assert not OmegaConf.missing_keys(values), f"{group}={option}"


def test_option_values_follow_the_defaults_list_as_hydra_does():
    for group, option in (("augment", "cutout"), ("schedule", "plateau"), ("dataset", "mnist"),
                          ("model", "plain20"), ("model", "vgg_a_cifar")):
        composed = OmegaConf.to_container(compose_config([f"{group}={option}"])[group])
        assert OmegaConf.to_container(option_values(group, option)) == composed, option


def test_defaults_of_the_sections_no_group_chooses_are_config_yaml():
    cfg = compose_config()
    assert (cfg.train.steps, cfg.train.log_every, cfg.train.eval_every) == (500, 50, 250)
    assert (cfg.checkpoint.every, cfg.checkpoint.keep) == (250, 2)
    for section in ("train", "checkpoint", "regularization", "early_stopping", "eval", "summary"):
        assert cfg[section] == root_values(section), section
    assert not OmegaConf.missing_keys(cfg)


def test_default_augment_keeps_command_line_keys_that_differ_from_the_base():
    cfg = compose_config(["augment.cutout=16", "augment.flip=false"])
    assert (cfg.augment.name, cfg.augment.crop_pad, cfg.augment.cutout) == ("crop_flip", 4, 16)
    # false is the base's value: indistinguishable from not given, the preset's flip stays.
    assert cfg.augment.flip


def test_data_cache_setting_reaches_the_loader_and_is_bookkeeping(monkeypatch):
    from cnnlab.analysis import group
    from cnnlab.runs import resume
    from cnnlab.training import build as run

    monkeypatch.delenv("CNNLAB_DATA_CACHE", raising=False)
    assert compose_config().dataset.cache_dir == "~/.cache/cnnlab/data"
    monkeypatch.setenv("CNNLAB_DATA_CACHE", "/scratch/decoded")
    cfg = compose_config(["dataset.max_examples=8"])
    assert cfg.dataset.cache_dir == "/scratch/decoded"
    assert compose_config(["dataset.cache_dir=null"]).dataset.cache_dir is None

    class Called(Exception):
        pass

    def load_dataset(name, **kwargs):
        raise Called(kwargs)

    monkeypatch.setattr(run.data_lib, "load_dataset", load_dataset)
    with pytest.raises(Called) as info:
        run.load_data(cfg)
    assert info.value.args[0]["cache_dir"] == "/scratch/decoded"

    # Where decoded images are kept does not change what a run computes.
    start = {"dataset": {"cache_dir": "~/.cache/cnnlab/data", "max_examples": 8}}
    assert resume.config_changes(start, {"dataset": {"cache_dir": None, "max_examples": 8}}) == {}
    assert group.is_bookkeeping("dataset.cache_dir")
    # A run config written before the key existed loads without a cache.
    assert OmegaConf.structured(DatasetConfig).cache_dir is None


def test_version_names_cnnlab_and_the_libraries_that_decide_the_numbers(tmp_path):
    import tomllib

    import flax
    import jax

    from tests.helpers import run_cli

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    result = run_cli(["--version"], cwd=tmp_path)
    assert result.returncode == 0 and result.stderr == ""
    line = result.stdout.strip()
    assert line.startswith(f"cnnlab {project['project']['version']} (")
    assert f"jax {jax.__version__}" in line and f"flax {flax.__version__}" in line
    help_text = run_cli(["--help"], cwd=tmp_path).stdout
    assert "cnnlab --version" in help_text and "train -m experiment=" in help_text


@pytest.mark.parametrize("overrides, name, shown", [
    ("model=plain20,seed=0", "plain8", "model=plain8,seed=0"),
    ("model=resnet20", "resnet20", "model=resnet20"),
    ("model.depth=8,model=resnet20", "resnet8", "model.depth=8,model=resnet8"),
    ("optimizer.lr=0.1, model=vgg_a_cifar", "vgg_a_cifar", "optimizer.lr=0.1, model=vgg_a_cifar"),
    ("seed=1", "resnet8", "seed=1"),
])
def test_shown_overrides_name_the_model_trained(overrides, name, shown):
    from cnnlab.config.names import name_the_model, short_dirname

    assert name_the_model(overrides, name) == shown
    assert short_dirname(overrides, name) == shown


def test_a_job_that_varies_nothing_is_named_by_its_model():
    from cnnlab.config.names import short_dirname

    assert short_dirname("", "plain20") == "model=plain20"


@pytest.mark.parametrize("overrides, fitted", [
    ([], 10),  # 50, 250, 250: the default chunk fits
    (["train.log_every=15"], 5),
    (["train.log_every=7"], 1),
    (["train.eval_every=0", "train.log_every=20", "checkpoint.every=100"], 10),
    (["train.steps=100", "schedule=cyclic_cosine", "schedule.cycles=3", "train.log_every=2",
      "train.eval_every=0", "checkpoint.every=2"], 2),  # cycles of ceil(100/3)=34 steps
])
def test_steps_per_call_is_fitted_to_every_boundary_the_host_acts_at(overrides, fitted):
    from cnnlab.cli.preflight import compose

    cfg = compose(overrides)  # resolves, then validates: no "must be a multiple" left to say
    assert cfg.train.steps_per_call == fitted


@pytest.mark.parametrize("command, schema", [("compare", "CompareConfig"), ("eval", "EvalConfig")])
def test_command_help_lists_every_option_it_takes(tmp_path, command, schema):
    import dataclasses

    from cnnlab.analysis import compare
    from cnnlab.config import schema as config
    from tests.helpers import run_cli

    result = run_cli([command, "--help"], cwd=tmp_path)
    assert result.returncode == 0
    listed = {line.strip().split("=")[0] for line in result.stdout.splitlines()
              if line.startswith(f"  {command}.")}
    fields = {f.name for f in dataclasses.fields(getattr(compare if command == "compare"
                                                         else config, schema))}
    fields.discard("ema_decay")  # a training setting, refused by cnnlab eval
    assert listed == {f"{command}.{name}" for name in fields}
    assert f"  {command}.yscale=auto" in result.stdout or command == "eval"


def test_epochs_set_the_steps_from_the_images_the_trainer_sees(fashion_dir):
    import math

    import tensorflow_datasets as tfds

    from cnnlab.cli.preflight import compose
    from cnnlab.data.load import load_dataset

    # The declared size is the prepared split's (TFDS's own count of it).
    info = tfds.builder("fashion_mnist", data_dir=str(fashion_dir)).info
    assert compose_config().dataset.train_size == info.splits["train"].num_examples
    cfg = compose(["train.epochs=2.5", "dataset.max_examples=1000", "dataset.val_size=100",
                   "train.batch_size=64"])
    data = load_dataset("fashion_mnist", data_dir=str(fashion_dir), max_examples=1000,
                        val_size=100)
    assert cfg.train.steps == math.ceil(2.5 * len(data.train) / 64) == 36
    assert compose(["dataset=cifar10", "train.epochs=164"]).train.steps == 64063  # ~He's 64k


@pytest.mark.parametrize("overrides, message", [
    (["train.epochs=0"], "train.epochs=0.0 must be a positive number or null"),
    (["train.epochs=1", "dataset.train_split='train[:50%]'"],
     "train.epochs needs the size of dataset.train_split='train[:50%]'"),
    (["train.epochs=1", "dataset.train_size=null"],
     "train.epochs needs dataset.train_size, which dataset fashion_mnist does not declare"),
])
def test_epochs_that_cannot_be_turned_into_steps_are_one_line(overrides, message):
    from cnnlab.cli.preflight import compose

    with pytest.raises(ConfigError) as info:
        compose(overrides)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_run_saved_before_a_key_existed_loads_with_todays_default(tmp_path):
    """eval, viz and compare read old runs: a key added to cnnlab since (here eval.top_k and
    the whole augment.affine node) takes today's default for the run's group choices."""
    from omegaconf import OmegaConf

    from cnnlab.config.load import load_run_config

    cfg = compose_config(["model=plain20", "augment=crop_flip"])
    saved = OmegaConf.to_container(cfg)
    del saved["eval"]["top_k"], saved["augment"]["affine"]
    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(OmegaConf.create(saved), tmp_path / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": {"runtime": {"choices": {
        "model": "plain20", "augment": "crop_flip", "hydra/launcher": "basic"}}}}),
        tmp_path / ".hydra" / "hydra.yaml")
    loaded = load_run_config(tmp_path)
    assert loaded.eval.top_k == cfg.eval.top_k == 5
    assert loaded.augment.affine == cfg.augment.affine
    assert loaded.model.name == "plain20" and loaded.augment.crop_pad == cfg.augment.crop_pad
    (tmp_path / ".hydra" / "hydra.yaml").unlink()  # unknown choices: the schema alone
    assert OmegaConf.is_missing(load_run_config(tmp_path).eval, "top_k")
