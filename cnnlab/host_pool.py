"""Enough XLA:CPU threads for several host devices in one process (`XLA_FLAGS=
--xla_force_host_platform_device_count=N`, or `JAX_NUM_CPU_DEVICES`): the way to try data
parallelism on a CPU (docs/scale.md).

XLA:CPU runs every host device's program on one shared pool of max(cores, devices) threads
(`NPROC` replaces the cores). An all-reduce holds its thread until every device has reached it,
and XLA orders when collectives start, not when they end: a device that runs ahead holds one
blocked thread per all-reduce it has started (the metrics' and the gradients' are started early
and needed late). Once the devices that ran ahead hold every thread, the device they wait for
has none left to reach them, and XLA aborts the process after 40 s ("may be stuck", then a
failed check). `cnnlab train` of ResNet-20 on 4 forced host devices of a 2-core machine did so
every time (3 of 3, 2026-12-05). A device runs ahead by a few collectives at most (each layer
needs the BatchNorm statistics all-reduced before it), and with 2 or 4 threads per device every
such run finished; 4 leaves a margin. Real accelerators, and one CPU device per process (a CPU
cluster, gloo), do not share a pool this way and are left alone.
"""

import collections
import os
import re
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

THREADS_PER_HOST_DEVICE = 4
_FORCED = re.compile(r"--xla_force_host_platform_device_count=(\d+)")


def host_devices(environ: Mapping[str, str]) -> int:
    """The CPU devices JAX will create in a process started with `environ` (JAX's own setting,
    JAX_NUM_CPU_DEVICES, wins over XLA's flag, as in jax's make_cpu_client)."""
    if environ.get("JAX_NUM_CPU_DEVICES", "").strip().lstrip("-").isdigit():
        count = int(environ["JAX_NUM_CPU_DEVICES"])
        if count >= 0:
            return count
    forced = _FORCED.findall(environ.get("XLA_FLAGS", ""))
    return int(forced[-1]) if forced else 1


def size_host_pool(environ: MutableMapping[str, str] = os.environ) -> int | None:
    """Set `NPROC` (the pool's size, read when JAX's CPU client starts: call this before any
    device is used) for several host devices; the threads set, or None where nothing changed:
    one device, or NPROC already set by the user."""
    devices = host_devices(environ)
    if devices <= 1 or "NPROC" in environ:
        return None
    threads = max(_cores(), THREADS_PER_HOST_DEVICE * devices)
    environ["NPROC"] = str(threads)
    return threads


def pool_warning(devices: Sequence[Any], environ: Mapping[str, str] = os.environ) -> str | None:
    """One line for a run on several CPU devices of one process whose pool (as `environ` sizes
    it) has fewer than THREADS_PER_HOST_DEVICE threads each: a script that started JAX itself,
    without `size_host_pool`. None otherwise."""
    per_process = collections.Counter(d.process_index for d in devices if d.platform == "cpu")
    used = max(per_process.values(), default=0)
    nproc = environ.get("NPROC", "")
    threads = max(int(nproc) if nproc.isdigit() else _cores(), host_devices(environ))
    if used <= 1 or threads >= THREADS_PER_HOST_DEVICE * used:
        return None
    return (f"{used} CPU devices share XLA:CPU's {threads} threads, and all-reduces can block "
            f"them all and hang the run: run it through `cnnlab`, or set "
            f"NPROC={THREADS_PER_HOST_DEVICE * used} before JAX starts (docs/scale.md)")


def _cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
