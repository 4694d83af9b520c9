"""Every call into Hydra's private modules (`hydra._internal`), in one place: the parser of
Hydra's command line, the basic sweeper's expansion of a sweep, and running the app on arguments
already parsed or on a config already composed. tests/test_hydra_compat.py checks each against
the installed Hydra, so that an upgrade that moves one fails there, not in a user's run.
"""

import argparse
import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from cnnlab.cli.args import fail
from cnnlab.config.groups import CONF_DIR

# The Hydra release these private calls were checked against (tests/test_hydra_compat.py): an
# upgrade fails that test until the calls are checked again and this is updated.
CHECKED_WITH = "1.3.8"

Task = Callable[[DictConfig], Any]


def parse_args(args: list[str]) -> argparse.Namespace:
    """The command line as Hydra's own parser reads it (flags, then the overrides)."""
    from hydra._internal.utils import get_args_parser

    try:
        return get_args_parser().parse_args(args)
    except SystemExit:
        fail(f"could not parse the arguments {' '.join(args)}; see cnnlab train --help")


def info_only(parsed: argparse.Namespace) -> bool:
    """Flags after which Hydra prints something instead of running: nothing to validate."""
    return bool(parsed.help or parsed.hydra_help or parsed.info or parsed.cfg
                or parsed.shell_completion)


def expand_sweep(overrides: list[Any]) -> list[list[str]]:
    """Every single-run override list that parsed, listable overrides describe, as Hydra's basic
    sweeper expands them (a later override of a key replaces an earlier one)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    [batch] = BasicSweeper.split_arguments(overrides, max_batch_size=None)
    return batch


def search_path(config_dir: str | None = None) -> Any:
    """The config search path of CONF_DIR, with a user's folder (`--config-dir DIR`) where
    Hydra's own command line puts it: after CONF_DIR, before the structured configs, so that
    `DIR/model/my_net.yaml` is `model=my_net` (a name CONF_DIR has too stays CONF_DIR's)."""
    from hydra._internal.utils import create_config_search_path
    from hydra.core.config_search_path import SearchPathQuery

    path = create_config_search_path(str(CONF_DIR))
    if config_dir is not None:
        folder = Path(config_dir).absolute()
        if not folder.is_dir():
            fail(f"--config-dir {folder}: no such folder")
        path.prepend(provider="command-line", path=f"file://{folder}",
                     anchor=SearchPathQuery(provider="schema"))
    return path


@contextlib.contextmanager
def initialize(config_dir: str | None = None) -> Iterator[None]:
    """`initialize_config_dir(CONF_DIR)` (job name `app`, as Hydra's run mode names the log
    file) with a user's `--config-dir` on the search path, as `run_app` has it for a sweep."""
    from hydra import initialize_config_dir
    from hydra._internal.hydra import Hydra
    from hydra.core.global_hydra import GlobalHydra

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="app"):
        if config_dir is not None:
            GlobalHydra.instance().clear()  # restored on leaving initialize_config_dir
            Hydra.create_main_hydra2(task_name="app", config_search_path=search_path(config_dir))
        yield


def run_app(parsed: argparse.Namespace, task: Task) -> None:
    """What `@hydra.main` does with the command line, on arguments already parsed: help, --cfg,
    --info, a sweep through the configured sweeper and launcher (which compose each job where
    it runs)."""
    from hydra._internal.utils import _run_hydra, get_args_parser

    _run_hydra(args=parsed, args_parser=get_args_parser(), task_function=task,
               config_path=str(CONF_DIR), config_name="config")


def run_composed(composed: DictConfig, task: Callable[[], Any],
                 config_dir: str | None = None) -> Any:
    """One run as Hydra's run mode makes it (run directory, .hydra/ files, logging, callbacks),
    from the config the preflight composed: no second composition. Returns what `task` returns;
    raises what it raises."""
    from hydra._internal.callbacks import Callbacks
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.core.utils import configure_log, run_job
    from hydra.types import HydraContext, RunMode
    from omegaconf import open_dict

    with open_dict(composed):
        composed.hydra.mode = RunMode.RUN
    configure_log(composed.hydra.hydra_logging, composed.hydra.verbose)
    callbacks = Callbacks(composed)
    callbacks.on_run_start(config=composed, config_name="config")
    loader = ConfigLoaderImpl(config_search_path=search_path(config_dir))
    ret = run_job(hydra_context=HydraContext(config_loader=loader, callbacks=callbacks),
                  task_function=lambda _saved: task(), config=composed,
                  job_dir_key="hydra.run.dir", job_subdir_key=None)
    callbacks.on_run_end(config=composed, config_name="config", job_return=ret)
    return ret.return_value  # raises the task's exception, as Hydra's run mode does
