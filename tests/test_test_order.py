"""tests/conftest.py orders the suite so that its longest tests start first, spread over the
test processes (pytest-xdist's worksteal hands each a contiguous share of the list)."""

import types
from pathlib import Path

import pytest

from tests.conftest import LONGEST, longest_first


def item(name: str) -> types.SimpleNamespace:
    file, test = name.split("::")
    return types.SimpleNamespace(path=Path("tests") / file, originalname=test.split("[")[0],
                                 name=test, full=name)


def worksteal_shares(items: list, processes: int) -> list[list]:
    """How pytest-xdist 3.8's worksteal first splits the list (scheduler/worksteal.py)."""
    shares, pending = [], list(items)
    for k in range(processes):
        n = len(pending) // (processes - k)
        shares.append(pending[:n])
        pending = pending[n:]
    return shares


@pytest.mark.parametrize("processes", [1, 2, 3, 4])
def test_each_share_starts_with_its_part_of_the_longest_tests(processes):
    longest = [item(name) for name in LONGEST]
    short = [item(f"test_f{i // 7}.py::test_{i}") for i in range(200)]
    items = short[:50] + longest[::-1] + short[50:]
    ordered = longest_first(items, processes)
    assert sorted(i.full for i in ordered) == sorted(i.full for i in items)
    seconds = [[LONGEST.get(i.full, 0) for i in share]
               for share in worksteal_shares(ordered, processes)]
    for share in seconds:  # the long ones first, longest first, then the short ones
        long = [s for s in share if s]
        assert share[:len(long)] == sorted(long, reverse=True)
    loads = [sum(share) for share in seconds]
    # Spread as evenly as whole tests allow: no share over the mean by more than its longest.
    assert max(loads) - sum(loads) / processes <= max(LONGEST.values())
    assert sum(loads) == sum(LONGEST.values())
    # The short tests keep their order (a file's tests together, sharing its fixtures).
    assert [i for i in ordered if i in short] == short


def test_the_longest_is_first_without_xdist():
    items = [item("test_a.py::test_x"), item(next(iter(LONGEST)))]
    assert longest_first(items, 1)[0].full == next(iter(LONGEST))


def test_a_parametrized_case_has_its_own_entry_or_its_functions(monkeypatch):
    monkeypatch.setitem(LONGEST, "test_a.py::test_x", 10)
    monkeypatch.setitem(LONGEST, "test_a.py::test_x[big]", 50)
    items = [item(f"test_a.py::test_x[{p}]") for p in ("small", "big")] + [item("test_b.py::t")]
    assert [i.full for i in longest_first(items, 1)] == [
        "test_a.py::test_x[big]", "test_a.py::test_x[small]", "test_b.py::t"]
