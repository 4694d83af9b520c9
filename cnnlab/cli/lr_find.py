"""`cnnlab lr_find [OVERRIDES]`: the learning-rate range test of the run `cnnlab train` would
make (cnnlab/training/lr_find.py)."""

import sys
from pathlib import Path

from cnnlab.cli.args import fail
from cnnlab.cli.preflight import check_config, without_hydra
from cnnlab.cli.usage import command_help
from cnnlab.errors import ConfigError


def lr_find_command(args: list[str]) -> None:
    """`cnnlab lr_find [OVERRIDES]` (cnnlab/training/lr_find.py): train's run at exponentially
    growing
    lrs; prints the suggested lr, writes the plot and the (lr, loss) pairs."""
    if any(arg.startswith("-") for arg in args):
        print(command_help("lr_find"))
        return
    from cnnlab.training import lr_find

    cfg = without_hydra(check_config(args).cfg)
    try:
        lr_find.validate(cfg.lr_find)
    except ConfigError as e:
        fail(str(e))
    from cnnlab.cli.app import quiet_library_logs
    from cnnlab.data.types import DatasetUnavailableError
    from cnnlab.progress import console_log
    from cnnlab.training.build import use_compile_cache

    quiet_library_logs()
    use_compile_cache(cfg.compile_cache_dir)
    try:
        with console_log():
            result = lr_find.range_test(cfg)
    except (ConfigError, DatasetUnavailableError) as e:
        fail(str(e))
    written = lr_find.write(result, Path(cfg.lr_find.output),
                            title=f"LR range test: {' '.join(args) or 'defaults'}")
    print(lr_find.report(result), end="")
    print(f"cnnlab lr_find: wrote {', '.join(p.name for p in written)} to "
          f"{cfg.lr_find.output}", file=sys.stderr)
