"""`make mutants` (tests/mutants.py) breaks named behaviours; each snippet it replaces must still
be in the code, once, or the mutant would test nothing."""

import pytest

from tests.mutants import MUTANTS, REPO, apply


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m.name)
def test_each_mutant_still_applies_to_exactly_one_place(mutant) -> None:
    apply(mutant, REPO, write=False)
    assert mutant.old != mutant.new
    assert all((REPO / test.split("::")[0]).is_file() for test in mutant.tests)
