"""`cnnlab viz KIND RUN_DIR [key=value ...]`: pictures of a trained run (cnnlab/viz/)."""

import sys
from pathlib import Path

from cnnlab.cli.args import fail, is_override
from cnnlab.cli.usage import command_help
from cnnlab.errors import ConfigError


def viz_command(args: list[str]) -> None:
    """`cnnlab viz KIND RUN_DIR [key=value ...]` (cnnlab/viz/)."""
    if any(arg in ("-h", "--help") for arg in args):
        print(command_help("viz"))
        return
    from cnnlab.viz.common import KINDS

    if not args or args[0] not in KINDS:
        from cnnlab.registry import unknown_choice

        fail(unknown_choice("viz kind", args[0] if args else "", KINDS.names()) + " (usage: "
             "cnnlab viz KIND RUN_DIR [key=value ...])")
    kind, rest = args[0], args[1:]
    paths = [a for a in rest if not is_override(a)]
    if len(paths) != 1:
        fail(f"viz {kind} takes one run directory, got {len(paths)}: cnnlab viz {kind} RUN_DIR "
             "[key=value ...]")
    from cnnlab import viz
    from cnnlab.cli.app import quiet_library_logs
    from cnnlab.data.types import DatasetUnavailableError

    quiet_library_logs()
    try:
        result = viz.visualize(kind, Path(paths[0]), [a for a in rest if is_override(a)])
    except (ConfigError, DatasetUnavailableError) as e:
        fail(str(e))
    for path in result.written:
        print(path)
    where = f"; logged to W&B ({result.wandb_folder})" if result.wandb_folder else ""
    print(f"cnnlab viz: wrote {len(result.written)} files to {Path(paths[0]) / 'viz'}{where}",
          file=sys.stderr)
