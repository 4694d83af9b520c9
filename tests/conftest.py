"""Fixtures shared by the tests (helpers live in tests/helpers.py), and XLA set for the tests.

Most of the suite's time is XLA compiling tiny models; its optimizations only pay back over many
steps, so the tests compile without most of them (numbers agree with an optimized build to
float tolerance; tests that compare runs bitwise compare two runs built the same way).
"""

import os

import jax
import pytest

from tests.helpers import fashion_dir, mock_tfds  # noqa: F401  (fixtures)

# In this process, and (through the environment) in the CLI processes the tests start.
os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
jax.config.update("jax_disable_most_optimizations", True)


# CI installs everything the suite needs (../shared's data, torch, ruff, ...): there a skip would
# hide a missing piece, so it fails. Only a test marked `can_skip` (a kernel feature CI may lack)
# may skip there.
UNDER_CI = os.environ.get("CI") == "true"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    outcome = yield
    report = outcome.get_result()
    if (UNDER_CI and report.skipped and not hasattr(report, "wasxfail")
            and item.get_closest_marker("can_skip") is None):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, where nothing may be missing: {reason}"


@pytest.fixture(scope="session", autouse=True)
def _data_cache_of_this_session(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Runs composed by the tests cache decoded data and compiled programs in this session's
    folder, shared by the xdist workers (the parent of each worker's base temp), never in the
    user's ~/.cache."""
    root = tmp_path_factory.getbasetemp()
    shared = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root
    os.environ["CNNLAB_DATA_CACHE"] = str(shared / "data-cache")
    os.environ["CNNLAB_COMPILE_CACHE"] = str(shared / "xla-cache")
