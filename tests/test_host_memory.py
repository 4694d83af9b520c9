"""Huge pages for XLA:CPU's buffers (cnnlab/host_memory.py): when the `cnnlab` command restarts
itself with glibc.malloc.hugetlb=1, that it does so once, and that the setting removes the page
faults of XLA's per-call buffers."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cnnlab import host_memory
from cnnlab.cli import main as cli
from cnnlab.host_memory import restart_tunables

GLIBC = (2, 36)
ON = "glibc.malloc.hugetlb=1"


@pytest.mark.parametrize("environ, mode, glibc, expected", [
    ({}, "madvise", GLIBC, ON),
    # The user's other tunables are kept, this one added.
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "madvise", GLIBC,
     f"glibc.malloc.arena_max=2:{ON}"),
    # The user's own choice stands (0: off), and a restarted process does not restart again.
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise", GLIBC, None),
    ({"GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{ON}"}, "madvise", GLIBC, None),
    # Nothing to gain: the kernel gives huge pages unasked, or never, or has no THP at all.
    ({}, "always", GLIBC, None),
    ({}, "never", GLIBC, None),
    ({}, None, GLIBC, None),
    # glibc before the tunable (2.35), or another C library (macOS, musl).
    ({}, "madvise", (2, 31), None),
    ({}, "madvise", None, None),
])
def test_when_the_command_restarts_with_huge_pages(environ, mode, glibc, expected):
    assert restart_tunables(environ, mode, glibc) == expected


def test_the_kernels_thp_mode_is_the_bracketed_word(tmp_path: Path):
    mode_file = tmp_path / "enabled"
    mode_file.write_text("always [madvise] never\n")
    assert host_memory.thp_mode(str(mode_file)) == "madvise"
    mode_file.write_text("[always] madvise never\n")
    assert host_memory.thp_mode(str(mode_file)) == "always"
    assert host_memory.thp_mode(str(tmp_path / "absent")) is None


@pytest.mark.parametrize("mode, glibc, tunables, expected", [
    ("madvise", GLIBC, ON, True),
    ("madvise", GLIBC, "glibc.malloc.hugetlb=0", False),
    ("madvise", GLIBC, "", False),
    ("always", GLIBC, "", True),  # the kernel's own
    ("never", GLIBC, ON, False),
    ("madvise", (2, 31), ON, False),  # an older glibc ignores the tunable
    ("madvise", None, ON, False),
])
def test_what_a_run_records_as_its_huge_pages(monkeypatch, mode, glibc, tunables, expected):
    monkeypatch.setattr(host_memory, "thp_mode", lambda: mode)
    monkeypatch.setattr(host_memory, "glibc_version", lambda: glibc)
    assert host_memory.huge_pages({"GLIBC_TUNABLES": tunables}) is expected


class Restarted(Exception):
    pass


def test_the_command_restarts_itself_once_and_python_callers_never(monkeypatch, tmp_path):
    monkeypatch.setattr(host_memory, "thp_mode", lambda: "madvise")
    monkeypatch.setattr(host_memory, "glibc_version", lambda: GLIBC)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    calls = []

    def execv(path, args):
        calls.append((path, args, os.environ.get("GLIBC_TUNABLES")))
        raise Restarted

    monkeypatch.setattr(os, "execv", execv)
    missing = str(tmp_path / "no_run")
    monkeypatch.setattr(sys, "argv", ["cnnlab", "summary", missing])
    monkeypatch.setattr(sys, "orig_argv", ["python3", "-X", "utf8", "/venv/bin/cnnlab",
                                           "summary", missing])
    with pytest.raises(Restarted):
        cli.main()
    # The same interpreter, its options and the command's arguments, with the tunable set.
    assert calls == [(sys.executable, [sys.executable, "-X", "utf8", "/venv/bin/cnnlab",
                                       "summary", missing], ON)]
    # The restarted process (the tunable set) and a Python caller (argv given) go on in place.
    for argv in (None, ["summary", missing]):
        with pytest.raises(SystemExit):  # the missing run directory: one line, exit 2
            cli.main(argv)
    assert len(calls) == 1


CHILD = textwrap.dedent("""
    import resource, jax, jax.numpy as jnp
    x = jnp.ones((4096, 2048), jnp.float32)
    # A 64 MiB buffer, mapped afresh at every call: glibc maps what outgrows its heaps (64 MiB
    # for a thread other than the main one) and unmaps it when freed.
    f = jax.jit(lambda x: jnp.sum(jnp.tanh(x @ x.T) @ x))
    f(x).block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        f(x).block_until_ready()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 3)
""")


def page_faults_per_call(tunables: str) -> int:
    env = {**os.environ, "GLIBC_TUNABLES": tunables, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(host_memory.command_tunables({}) is None,
                    reason="the restart changes nothing here (glibc, or the kernel's THP mode)")
def test_huge_pages_take_the_page_faults_out_of_xlas_calls():
    """What the restart is for: XLA:CPU maps its buffers afresh at each call, a page fault per
    4 KiB; with the tunable the restart sets, one per 2 MiB wherever the kernel can."""
    without = page_faults_per_call("glibc.malloc.hugetlb=0")
    with_huge_pages = page_faults_per_call(restart_tunables({}, "madvise", GLIBC))
    assert without > 16_000  # at least the 64 MiB of the first matmul's output, 4 KiB a fault
    assert with_huge_pages * 4 < without, (with_huge_pages, without)
