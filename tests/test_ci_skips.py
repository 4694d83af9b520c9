"""Under CI=true a skip fails (a missing data folder, torch or ruff must not pass quietly)."""

import os

import pytest

from tests.helpers import REPO

pytest_plugins = ["pytester"]

SAMPLE = """
import pytest

def test_skips():
    pytest.skip("offline fashion_mnist not found")

@pytest.mark.can_skip
def test_may_skip():
    pytest.skip("cannot mount a tmpfs here")

@pytest.mark.xfail(reason="known")
def test_known_failure():
    assert False
"""


def _outcomes(pytester: pytest.Pytester, ci: str) -> dict[str, int]:
    pytester.makeconftest("from tests.conftest import pytest_runtest_makereport  # noqa: F401")
    pytester.makepyfile(SAMPLE)
    pytester.makeini("[pytest]\nmarkers =\n    can_skip: may skip under CI\n")
    env = {"CI": ci, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    return result.parseoutcomes()


def test_a_skip_fails_under_ci_unless_marked_can_skip(pytester: pytest.Pytester) -> None:
    assert _outcomes(pytester, "true") == {"failed": 1, "skipped": 1, "xfailed": 1}


def test_a_skip_is_a_skip_elsewhere(pytester: pytest.Pytester) -> None:
    assert _outcomes(pytester, "") == {"skipped": 2, "xfailed": 1}
