"""Each private Hydra call of cnnlab/cli/hydra_compat.py against the installed Hydra: the parser,
the sweep expansion, the app run on parsed arguments and one run on a composed config."""

import hydra
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from cnnlab.cli import hydra_compat
from cnnlab.config.groups import CONF_DIR


def test_hydra_is_the_release_the_private_calls_were_checked_against():
    assert hydra.__version__ == hydra_compat.CHECKED_WITH


def test_parse_args_reads_flags_then_overrides():
    parsed = hydra_compat.parse_args(["-m", "model=plain20,resnet20", "seed=1"])
    assert parsed.multirun and not hydra_compat.info_only(parsed)
    assert parsed.overrides == ["model=plain20,resnet20", "seed=1"]
    assert hydra_compat.info_only(hydra_compat.parse_args(["--cfg", "job"]))


def test_parse_args_refuses_an_unknown_flag_in_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        hydra_compat.parse_args(["--no-such-flag"])
    assert info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("cnnlab: error: could not")


def test_expand_sweep_lists_every_run_and_the_last_override_wins():
    parsed = OverridesParser.create().parse_overrides(["model=plain20,resnet20", "seed=0,1",
                                                       "seed=2"])
    runs = hydra_compat.expand_sweep(parsed)
    assert sorted(map(tuple, runs)) == [("model=plain20", "seed=2"), ("model=resnet20", "seed=2")]


def test_run_app_prints_the_composed_config(capsys):
    hydra_compat.run_app(hydra_compat.parse_args(["--cfg", "job", "seed=7"]),
                         lambda cfg: pytest.fail("--cfg runs nothing"))
    assert OmegaConf.create(capsys.readouterr().out).seed == 7


def test_run_composed_makes_the_run_directory_without_composing_again(tmp_path):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="app"):
        cfg = compose(config_name="config", return_hydra_config=True,
                      overrides=["seed=5", f"hydra.run.dir={tmp_path / 'run'}"])
    seen = {}

    def task() -> str:
        seen["output_dir"] = HydraConfig.get().runtime.output_dir
        return "done"

    assert hydra_compat.run_composed(cfg, task) == "done"
    assert seen["output_dir"] == str(tmp_path / "run")
    saved = OmegaConf.load(tmp_path / "run" / ".hydra" / "config.yaml")
    assert saved.seed == 5 and "hydra" not in saved
    assert OmegaConf.load(tmp_path / "run" / ".hydra" / "overrides.yaml") == ["seed=5"]


def test_run_composed_raises_what_the_task_raises(tmp_path):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="app"):
        cfg = compose(config_name="config", return_hydra_config=True,
                      overrides=[f"hydra.run.dir={tmp_path}"])

    def task() -> None:
        raise ValueError("the task's own error")

    with pytest.raises(ValueError, match="the task's own error"):
        hydra_compat.run_composed(cfg, task)
