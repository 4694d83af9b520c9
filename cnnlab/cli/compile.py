"""`cnnlab compile TARGET [OVERRIDES]`: the run the overrides describe compiled for an
accelerator this host does not have (cnnlab/training/aot.py); one table, then one JSON line.

Exit 0 when it compiled and fits the chip; a run that cannot fit is one line, exit 2, as is a
missing compiler (the `tpu` or `gpu` extra). Only this command imports libtpu or the CUDA
plugin: training runs never load them.
"""

import json
import sys

from cnnlab.cli.args import fail
from cnnlab.cli.usage import USAGE
from cnnlab.errors import ConfigError


def _usage() -> str:
    return next(b for b in USAGE.split("\n\n") if b.lstrip().startswith("compile "))


def _gb(n: float) -> str:
    return f"{n / 1e9:.3f} GB"


def table(summary: dict) -> str:
    """The command's table: one row per figure, per device unless said."""
    m = summary["memory"]
    rows = [
        ("target", f"{summary['target']} ({summary['devices']} devices)"),
        ("training set", summary["data"]),
        ("precision", summary["precision"]),
        ("arguments", _gb(m["argument"])), ("outputs", _gb(m["output"])),
        ("  of which donated", _gb(m["alias"])), ("temporaries", _gb(m["temp"])),
        ("code", _gb(m["code"])),
        ("per device", f"{_gb(summary['per_device_bytes'])} of "
                       f"{_gb(summary['device_memory_bytes'])}: "
                       f"{'fits' if summary['fits'] else 'does not fit'}"),
        ("compile", f"{summary['compile_s']:.1f} s, {summary['compile_cpu_s']:.1f} s of CPU "
                    f"({summary['steps_per_call']} steps per call)"),
        ("FLOPs per step", f"{summary['flops_per_step']:.4g}"),
        ("bytes per step", f"{summary['bytes_per_step']:.4g}"),
        ("collectives", ", ".join(f"{k} x{v}" for k, v in summary["collectives"].items())
         or "none"),
        ("roofline step", f"{summary['roofline_step_s'] * 1e3:.3f} ms"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def compile_command(args: list[str]) -> None:
    if not args or args[0].startswith("-"):
        print(f"usage:\n{_usage()}")
        return
    from cnnlab.training import chips

    try:
        target = chips.parse_target(args[0])
    except ConfigError as e:
        fail(str(e))
    missing = chips.missing_extra(target)
    if missing:
        fail(missing)
    # Before anything starts JAX's backends (composing the config checks the geometry).
    chips.prepare_environment(target)
    from cnnlab.cli.app import quiet_library_logs
    from cnnlab.cli.preflight import check_config, without_hydra

    cfg = without_hydra(check_config(args[1:], for_training=False).cfg)
    if cfg.dataset.image_shape is None or cfg.dataset.num_classes is None:
        fail(f"dataset {cfg.dataset.name} does not declare image_shape and num_classes; "
             "set dataset.image_shape=[H,W,C] dataset.num_classes=N")
    quiet_library_logs()
    from cnnlab.training import aot

    try:
        compiled = aot.compile_for(cfg, target)
    except ConfigError as e:
        fail(str(e))
    summary = compiled.summary()
    if not compiled.fits:
        fail(f"does not fit {target.name}: {_gb(summary['per_device_bytes'])} per device, "
             f"over the chip's {_gb(summary['device_memory_bytes'])}")
    print(table(summary))
    print(json.dumps(summary))
    sys.stdout.flush()
