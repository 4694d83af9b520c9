"""cnnlab installed from a wheel, away from the repo: the wheel carries conf/ and experiments/
(as cnnlab/conf/, without experiments/results/), and the commands run on that copy. Also a
user's own config folder, added with Hydra's `--config-dir` or `hydra.searchpath`."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from cnnlab.cli import preflight
from tests.helpers import REPO

# The user's model option: ResNet-8 at width 4, from the shipped resnet20 (same group).
MY_NET = "defaults:\n  - resnet20\n  - _self_\n\ndepth: 8\nwidth: 4\n"

TINY_RUN = ["dataset.max_examples=256", "train.steps=10", "train.steps_per_call=5",
            "train.log_every=5", "train.eval_every=0", "logger.mode=disabled", "progress=false"]


def _user_conf(root: Path) -> Path:
    (root / "model").mkdir(parents=True)
    (root / "model" / "my_net.yaml").write_text(MY_NET)
    return root


def _build_wheel(tmp: Path) -> Path:
    """The wheel of a copy of the repo (the build writes build/ and *.egg-info beside its
    sources), built with the installed setuptools: nothing is downloaded."""
    ignored = shutil.ignore_patterns(".git", ".venv", ".venv-*", "build", "dist", "*.egg-info",
                                     "results", "multirun", "outputs", "wandb", "__pycache__",
                                     ".*_cache")
    src = tmp / "src"
    shutil.copytree(REPO, src, symlinks=True, ignore=ignored)  # conf/experiment stays a link
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--no-index", "-q", "-w", str(tmp / "dist"), str(src)],
                   check=True, capture_output=True, text=True, timeout=300)
    [wheel] = (tmp / "dist").glob("cnnlab-*.whl")
    return wheel


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel's files installed into a folder of their own (this venv has the dependencies)."""
    tmp = tmp_path_factory.mktemp("install")
    wheel = _build_wheel(tmp)
    names = zipfile.ZipFile(wheel).namelist()
    assert "cnnlab/conf/config.yaml" in names
    assert "cnnlab/conf/experiment/smoke/resnet_vs_plain.yaml" in names  # the link, as files
    assert not [n for n in names if "/results/" in n or "__pycache__" in n]
    site = tmp / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q",
                    "--target", str(site), str(wheel)], check=True, capture_output=True,
                   text=True, timeout=300)
    return site


def _cnnlab(site: Path, cwd: Path, args: list[str], data_dir: Path | None = None,
            ) -> subprocess.CompletedProcess:
    """`cnnlab ARGS` from the installed copy: -P keeps the working directory off sys.path,
    PYTHONPATH holds only the installed folder."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_SERVICE")}
    env["PYTHONPATH"] = str(site)
    if data_dir is not None:
        env["TFDS_DATA_DIR"] = str(data_dir)
    result = subprocess.run([sys.executable, "-P", *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{args}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def test_the_installed_package_runs_on_its_own_configs(installed, fashion_dir, tmp_path):
    cwd = tmp_path / "work"
    cwd.mkdir()
    where = _cnnlab(installed, cwd, ["-c", "import cnnlab; from cnnlab.config.groups import "
                                     "CONF_DIR; print(cnnlab.__file__); print(CONF_DIR)"])
    package, conf = where.stdout.split()
    assert Path(package).is_relative_to(installed) and Path(conf) == installed / "cnnlab/conf"
    cli = ["-m", "cnnlab.cli"]
    assert "cnnlab 0.1.0" in _cnnlab(installed, cwd, [*cli, "--version"]).stdout

    summary = _cnnlab(installed, cwd, [*cli, "summary", "model=resnet20"]).stdout
    assert "269,434" in summary  # ResNet-20's parameters

    # One run, with a model option from the user's folder (--config-dir, Hydra's flag).
    user = _user_conf(tmp_path / "my_conf")
    _cnnlab(installed, cwd, [*cli, "train", "--config-dir", str(user), "model=my_net",
                             "hydra.run.dir=run", *TINY_RUN], fashion_dir)
    assert "summary.json" in {p.name for p in (cwd / "run").iterdir()}
    hydra_yaml = (cwd / "run/.hydra/hydra.yaml").read_text()
    assert "model: my_net" in hydra_yaml
    assert "depth: 8" in (cwd / "run/.hydra/config.yaml").read_text()

    # A study shipped in experiments/, shrunk to 2 jobs, one of them the user's model (a sweep
    # is run by Hydra's app, which reads --config-dir itself); then its tables.
    _cnnlab(installed, cwd, [*cli, "train", "-m", "--config-dir", str(user),
                             "experiment=smoke/resnet_vs_plain", "model=plain20,my_net",
                             "seed=0", "train.steps=2", "hydra.sweep.dir=sweep",
                             "logger.mode=disabled"], fashion_dir)
    jobs = sorted(p.parent for p in (cwd / "sweep").glob("*/summary.json"))
    choices = [(job / ".hydra/hydra.yaml").read_text() for job in jobs]
    assert len(jobs) == 2 and ["model: my_net" in text for text in choices] == [False, True]
    table = _cnnlab(installed, cwd, [*cli, "compare", "sweep"]).stdout
    assert "plain" in table and "resnet" in table, table


def test_config_dir_adds_a_users_options_to_the_preflight(tmp_path, capsys):
    """Single runs are composed by the preflight, not by Hydra's app: --config-dir reaches it,
    and so does a hydra.searchpath override; an unknown option lists the user's ones too."""
    user = _user_conf(tmp_path / "my_conf")
    checked = preflight.check_config(["model=my_net"], for_training=False, config_dir=str(user))
    assert (checked.cfg.model.depth, checked.cfg.model.width) == (8, 4)
    assert checked.cfg.hydra.runtime.choices.model == "my_net"
    checked = preflight.check_config(["model=my_net", f"hydra.searchpath=[file://{user}]"],
                                     for_training=False)
    assert checked.cfg.model.depth == 8
    capsys.readouterr()
    with pytest.raises(SystemExit):
        preflight.check_config(["model=my_nett"], for_training=False, config_dir=str(user))
    assert "my_net" in capsys.readouterr().err  # the closest choice, from the user's folder
    with pytest.raises(SystemExit):
        preflight.check_config(["model=my_net"], for_training=False)  # not without the folder
    assert "unknown model 'my_net'" in capsys.readouterr().err


def test_a_package_without_its_configs_says_so_in_one_line(tmp_path):
    """An install that lost conf/ (a broken packaging): one line naming both places looked in."""
    shutil.copytree(REPO / "cnnlab", tmp_path / "pkg" / "cnnlab",
                    ignore=shutil.ignore_patterns("__pycache__", "conf"))
    result = subprocess.run([sys.executable, "-m", "cnnlab.cli", "train"], cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(tmp_path / "pkg")},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("cnnlab: error: cnnlab's configs are missing")
    assert str(tmp_path / "pkg" / "conf") in line and "config.yaml" in line
