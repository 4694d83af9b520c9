"""`cnnlab compare PATH [PATH ...] [compare.KEY=VALUE ...]`: tables and curves over runs
(cnnlab/analysis/compare.py)."""

import sys

from cnnlab.cli.args import fail, paths_and_overrides
from cnnlab.cli.usage import command_help
from cnnlab.errors import ConfigError


def compare_command(args: list[str]) -> None:
    """`cnnlab compare PATH [PATH ...] [compare.KEY=VALUE ...]` (cnnlab/analysis/compare.py)."""
    if any(arg in ("-h", "--help") for arg in args):
        print(command_help("compare"))
        return
    paths, overrides = paths_and_overrides(args, "compare", "run or multirun directories",
                                            "CSV output: compare.format=csv")
    from cnnlab.analysis.compare import compare, parse_config

    try:
        text, written = compare(paths, parse_config(overrides))
    except ConfigError as e:
        fail(str(e))
    print(text, end="")
    folders = sorted({str(path.parent) for path in written})
    print(f"cnnlab compare: wrote {', '.join(p.name for p in written)} to {', '.join(folders)}",
          file=sys.stderr)
