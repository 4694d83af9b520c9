"""Transparent huge pages for XLA:CPU's buffers: the `cnnlab` command restarts itself once with
glibc's `glibc.malloc.hugetlb=1`.

Why: XLA:CPU allocates a program's buffers anew at every call, the temporary one hundreds of
MiB for a chunk of training steps (349 MiB for ResNet-20's 10 steps at batch 128). glibc maps
an allocation that large with mmap and unmaps it when freed, so every call faults each page in
again, 4 KiB at a time: 85,000 page faults a call for ResNet-20 (0.2-0.45 s of kernel time),
166,000 for ResNet-18's 2 steps. With `glibc.malloc.hugetlb=1` glibc asks the kernel for
transparent huge pages (`madvise(MADV_HUGEPAGE)`) on what it maps: 2 MiB a fault, 600-1,800
faults a call, and ResNet-18's step 686 -> 557 ms, ResNet-20's 162-168 -> 157-162 ms
(docs/speed.md, 2026-12-06).

glibc reads its tunables only when a process starts, so the command sets `GLIBC_TUNABLES` and
executes itself again (same process id, same arguments) before it imports anything heavy. It
does so only where the setting changes something: glibc 2.35 or later (the tunable's first
release) and the kernel's THP mode `madvise` (`always` gives huge pages without asking; `never`
gives none). A user's own `glibc.malloc.hugetlb` in GLIBC_TUNABLES is kept (`=0` turns this
off), and child processes (sweeps' launchers, Slurm jobs) inherit the setting.
"""

import os
import sys
from collections.abc import Mapping, MutableMapping

TUNABLE = "glibc.malloc.hugetlb"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
FIRST_GLIBC = (2, 35)


def thp_mode(path: str = THP_MODE_FILE) -> str | None:
    """The kernel's transparent huge page mode (`always`, `madvise` or `never`; None: no THP,
    or not Linux)."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    chosen = [word[1:-1] for word in text.split() if word.startswith("[")]
    return chosen[0] if chosen else None


def glibc_version() -> tuple[int, int] | None:
    """This process's glibc version (None: another C library, such as macOS's or musl)."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # type: ignore[union-attr]
        major, minor = version.split(".")[:2]
        return (int(major), int(minor)) if name == "glibc" else None
    except (AttributeError, OSError, ValueError):
        return None


def _tunables(environ: Mapping[str, str]) -> dict[str, str]:
    items = [item.split("=", 1) for item in environ.get("GLIBC_TUNABLES", "").split(":") if item]
    return {item[0]: item[-1] for item in items}


def restart_tunables(environ: Mapping[str, str], mode: str | None,
                     glibc: tuple[int, int] | None) -> str | None:
    """The GLIBC_TUNABLES to restart with, or None where a restart would change nothing: glibc
    older than the tunable or none, a kernel THP mode other than `madvise`, or the tunable set
    already (by the user, or by this restart)."""
    if glibc is None or glibc < FIRST_GLIBC or mode != "madvise" or TUNABLE in _tunables(environ):
        return None
    current = environ.get("GLIBC_TUNABLES", "")
    return f"{current}:{TUNABLE}=1" if current else f"{TUNABLE}=1"


def command_tunables(environ: Mapping[str, str] = os.environ) -> str | None:
    """`restart_tunables` on this host: the GLIBC_TUNABLES the `cnnlab` command restarts with
    from `environ` (None: it does not restart)."""
    return restart_tunables(environ, thp_mode(), glibc_version())


def restart_with_huge_pages(environ: MutableMapping[str, str] = os.environ) -> None:
    """Execute this process again with `glibc.malloc.hugetlb=1` where that changes something
    (see `restart_tunables`); return where it does not. Call it first thing in a command: what
    ran before is run again."""
    tunables = command_tunables(environ)
    if tunables is None:
        return
    before = environ.get("GLIBC_TUNABLES")
    environ["GLIBC_TUNABLES"] = tunables
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
    except OSError:  # the run goes on as it was, only slower on the CPU
        if before is None:
            del environ["GLIBC_TUNABLES"]
        else:
            environ["GLIBC_TUNABLES"] = before


def huge_pages(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process's large host allocations get transparent huge pages (for a run's
    summary: it changes CPU timings, not results)."""
    mode, glibc = thp_mode(), glibc_version()
    glibc_asks = _tunables(environ).get(TUNABLE) == "1" and glibc is not None
    return mode == "always" or (mode == "madvise" and glibc_asks and glibc >= FIRST_GLIBC)
