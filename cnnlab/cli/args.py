"""The command line's words: which are run directories and which `COMMAND.KEY=VALUE`
overrides, and the one-line refusal (exit 2) every command ends a bad one with."""

import sys
from pathlib import Path


def fail(message: str) -> None:
    print(f"cnnlab: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def is_override(arg: str) -> bool:
    # Multirun job folders are named `<n>_key=value,...`, so a folder that exists is a run
    # directory even when its name holds '='.
    key, sep, _ = arg.partition("=")
    return bool(sep) and not Path(arg).is_dir() and key.replace(".", "_").isidentifier()


def paths_and_overrides(args: list[str], command: str, what: str,
                         example: str) -> tuple[list[str], list[str]]:
    """Split `cnnlab eval|compare` arguments into directories and `<command>.KEY=VALUE`."""
    overrides = [arg for arg in args if is_override(arg)]
    paths = [arg for arg in args if not is_override(arg)]
    for arg in paths:
        if arg.startswith("-"):
            fail(f"{command} takes {what} and {command}.* overrides, not '{arg}' ({example})")
    for override in overrides:
        if not override.startswith(f"{command}."):
            fail(f"{command} takes {command}.* overrides only, got '{override}'; the model, "
                 "data and training settings come from each run's saved config")
    return paths, overrides
