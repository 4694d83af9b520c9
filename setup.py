"""The package build (the metadata is pyproject.toml's): a wheel carries the configs as
`cnnlab/conf/`, conf/ copied with its `experiment` link (-> experiments/) materialized as files,
without experiments/results/ (finished runs' logs). cnnlab/config/groups.py reads that copy when
cnnlab is installed; a checkout and an editable install (`make setup`) read the repo's conf/.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


def _not_shipped(folder: str, names: list[str]) -> set[str]:
    """What copytree leaves out: finished runs (experiment/results/), caches, hidden files."""
    left_out = {name for name in names if name.startswith(".") or name == "__pycache__"}
    if Path(folder).name == "experiment" and Path(folder).parent == HERE / "conf":
        left_out.add("results")
    return left_out


class BuildWithConfigs(build_py):
    """build_py, then conf/ into build/lib/cnnlab/conf/ (what the wheel packs)."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return  # an editable install reads the repo's conf/ in place
        target = Path(self.build_lib) / "cnnlab" / "conf"
        shutil.rmtree(target, ignore_errors=True)
        # symlinks=False: conf/experiment (a link to ../experiments) is copied as real files.
        shutil.copytree(HERE / "conf", target, symlinks=False, ignore=_not_shipped)
        if not (target / "config.yaml").is_file() or not any((target / "experiment").iterdir()):
            raise RuntimeError(f"{target}: conf/ or conf/experiment/ did not copy")


setup(cmdclass={"build_py": BuildWithConfigs})
