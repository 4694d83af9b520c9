"""The `cnnlab` command: `cnnlab COMMAND ...` dispatches to cnnlab/cli/COMMAND.py.

User errors (unknown option, wrong type, impossible value, missing dataset) are caught before
anything compiles and reported as one line on stderr with exit code 2.
"""

import importlib
import logging
import sys

from cnnlab.cli.args import fail
from cnnlab.cli.usage import USAGE
from cnnlab.errors import ConfigError
from cnnlab.host_memory import restart_with_huge_pages
from cnnlab.host_pool import size_host_pool

# Each command's module (cnnlab/cli/<module>.py) and function, imported only when it runs, so that
# `cnnlab --version` and `--help` start without JAX.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("train", "train_command"),
    "summary": ("summary", "summary_command"),
    "eval": ("evaluate", "eval_command"),
    "compare": ("compare", "compare_command"),
    "lr_find": ("lr_find", "lr_find_command"),
    "viz": ("viz", "viz_command"),
    "compile": ("compile", "compile_command"),
}


def version() -> str:
    """`cnnlab --version`: this package's version and those of the libraries that decide the
    numbers (for bug reports and for papers' reproducibility sections)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    def of(package: str) -> str:
        try:
            return installed(package)
        except PackageNotFoundError:
            return "not installed"

    libraries = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "hydra-core",
                 "tensorflow-datasets", "wandb")
    return f"cnnlab {of('cnnlab')} (" + ", ".join(f"{p} {of(p)}" for p in libraries) + ")"


def main(argv: list[str] | None = None) -> None:
    """`cnnlab ARGS`; `argv` None: this process is the command (`sys.argv`), and may execute
    itself again first (host_memory: huge pages for XLA:CPU's buffers); a list: called from
    Python (the tests), in this process as it is."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    if args[0] in ("-V", "--version"):
        print(version())
        return
    command, rest = args[0], args[1:]
    # A log file that cannot be written (disk full, read-only) must not print a traceback per
    # message: the run reports the underlying failure itself, in one line.
    logging.raiseExceptions = False
    if command not in COMMANDS:
        fail(f"unknown command '{command}'; valid choices: {', '.join(COMMANDS)}")
    module, function = COMMANDS[command]
    if argv is None:
        restart_with_huge_pages()
    # Before JAX starts its CPU client (the commands below start it).
    size_host_pool()
    try:
        # Importing a command finds the configs (cnnlab/config/groups.py): an install without
        # them is one line too.
        run = getattr(importlib.import_module(f"cnnlab.cli.{module}"), function)
    except ConfigError as error:
        fail(str(error))
    run(rest)


if __name__ == "__main__":
    main()
