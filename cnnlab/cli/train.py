"""`cnnlab train [-m] [OVERRIDES]`: every run the command line describes is composed and checked
(cnnlab/cli/preflight.py), then Hydra runs it (cnnlab/cli/app.py), or the sweep, and the sweep's
tally is printed at the end."""

import os
import sys
from pathlib import Path

from omegaconf import DictConfig

from cnnlab import parallel
from cnnlab.cli import hydra_compat, job_devices
from cnnlab.cli.app import train_checked, train_job
from cnnlab.cli.hydra_compat import info_only, parse_args
from cnnlab.cli.preflight import check_config, without_hydra
from cnnlab.cli.sweep import job_count, report


def _name_jobs_by_swept_keys(overrides: list[str], cfg: DictConfig) -> list[str]:
    """Name multirun job folders by what varies (`3_model=plain56,seed=1`), not by every
    override: settings shared by the whole sweep would repeat in each name and can push it past
    the file system's limit. Returns the Hydra override that says so (none if the user set one).
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    key_setting = "hydra.job.config.override_dirname.exclude_keys"
    parsed = OverridesParser.create().parse_overrides(overrides)
    if any(o.get_key_element() == key_setting for o in parsed):
        return []
    swept = {o.get_key_element() for o in parsed if o.is_sweep_override()}
    fixed = [o.get_key_element() for o in parsed if o.get_key_element() not in swept
             and not o.get_key_element().startswith("hydra")]
    excluded = list(cfg.hydra.job.config.override_dirname.exclude_keys)
    return [f"{key_setting}=[{','.join(dict.fromkeys(excluded + fixed))}]"]


def _sweep_size(cfg: DictConfig, steps: list[int]) -> str:
    """What a multirun will run: a basic sweep's jobs, or an Optuna search's trials (its listed
    choices were each checked, but only n_trials of them run)."""
    trials = cfg.hydra.sweeper.get("n_trials")
    if trials is None:
        return f"cnnlab: sweep of {job_count(len(steps))}, {sum(steps):,} training steps in all"
    return (f"cnnlab: search of {trials} trials of up to {max(steps):,} training steps "
            f"({len(steps)} combinations of its choices checked)")


def _sweep_dir(cfg: DictConfig) -> str:
    """The sweep's folder, resolved once here (it names the time) and handed to Hydra, so that
    the tally at the end reads the folder the jobs wrote."""
    from omegaconf import OmegaConf

    return str(OmegaConf.select(cfg, "hydra.sweep.dir"))


def _one_run_dir(composed: DictConfig) -> DictConfig:
    """`composed` with its run directory resolved as process 0 of a multi-host job resolved it:
    each process names the time it started (`${now:...}`), and one started a few seconds later
    must train in the same folder (the preflight has joined the job by now)."""
    from omegaconf import OmegaConf, open_dict

    if not parallel.multi_process():
        return composed
    run_dir = parallel.broadcast_text(str(OmegaConf.select(composed, "hydra.run.dir")))
    with open_dict(composed):
        composed.hydra.run.dir = run_dir
    return composed


def train_command(args: list[str]) -> None:
    parsed = parse_args(args)
    if info_only(parsed):
        hydra_compat.run_app(parsed, train_job)
        return
    if parsed.multirun:  # before checking the jobs' configs starts JAX in this process
        job_devices.spare_the_sweep_process()
    checked = check_config(parsed.overrides, multirun=parsed.multirun,
                           config_dir=parsed.config_dir)
    if not parsed.multirun and len(checked.checked) == 1:
        run = without_hydra(checked.checked[0])
        composed = _one_run_dir(checked.composed[0])
        hydra_compat.run_composed(composed, lambda: train_checked(run), parsed.config_dir)
        return
    print(_sweep_size(checked.cfg, checked.steps), file=sys.stderr)
    sweep_dir = parallel.broadcast_text(_sweep_dir(checked.cfg))
    # Hydra names a job's folder by its overrides; the naming override joins them.
    parsed.overrides = [*_name_jobs_by_swept_keys(parsed.overrides, checked.cfg),
                        *parsed.overrides, f"hydra.sweep.dir='{sweep_dir}'"]
    try:
        hydra_compat.run_app(parsed, train_job)
    finally:
        job_devices.restore_preallocation(os.environ)
        # Hydra exits 1 after a sweep with failed jobs (the others have all run); say how many.
        if Path(sweep_dir).is_dir():
            line, _ = report(Path(sweep_dir))
            print(f"cnnlab: {line}", file=sys.stderr)
