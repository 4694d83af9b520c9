"""`cnnlab eval RUN_DIR [RUN_DIR ...] [eval.KEY=VALUE ...]`: saved runs on their test split,
alone and as an ensemble (cnnlab/training/ensemble.py)."""

from pathlib import Path

from cnnlab.cli.args import fail, paths_and_overrides
from cnnlab.cli.usage import command_help
from cnnlab.errors import ConfigError


def eval_command(args: list[str]) -> None:
    """`cnnlab eval RUN_DIR [RUN_DIR ...] [eval.KEY=VALUE ...]` (cnnlab/training/evaluate.py)."""
    if any(arg in ("-h", "--help") for arg in args):
        print(command_help("eval"))
        return
    run_dirs, overrides = paths_and_overrides(args, "eval", "run directories",
                                               "JSON output: eval.format=json")
    if "eval.ema_decay" in {o.partition("=")[0] for o in overrides}:
        fail("eval.ema_decay is a training setting; cnnlab eval reads each run's own "
             "(use eval.weights=ema)")
    if not run_dirs:
        fail("eval needs at least one run directory: cnnlab eval RUN_DIR [RUN_DIR ...] "
             "[eval.tta=flip]")

    import json

    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from cnnlab.config.groups import root_values
    from cnnlab.config.schema import EvalConfig

    try:
        # conf/config.yaml's eval section on the schema, then the command line's eval.* keys.
        ev = OmegaConf.merge(OmegaConf.structured(EvalConfig), root_values("eval"),
                             OmegaConf.from_dotlist([o.removeprefix("eval.") for o in overrides]))
    except OmegaConfBaseException as e:
        key = f"eval.{e.full_key}" if getattr(e, "full_key", None) else "eval"
        fail(f"{key}: {str(getattr(e, 'msg', e)).splitlines()[0]}")
    from cnnlab.cli.app import quiet_library_logs
    from cnnlab.data.types import DatasetUnavailableError
    from cnnlab.progress import console_log
    from cnnlab.training.ensemble import evaluate_runs, format_report

    quiet_library_logs()
    try:
        # Which run and split is being evaluated, and how long each took, on stderr.
        with console_log():
            report = evaluate_runs([Path(d) for d in run_dirs], ev)
    except (ConfigError, DatasetUnavailableError) as e:
        fail(str(e))
    print(format_report(report, ev.format))
    if ev.output is not None:
        Path(ev.output).write_text(json.dumps(report, indent=2) + "\n")
