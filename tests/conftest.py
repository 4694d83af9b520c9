"""Fixtures shared by the tests (helpers live in tests/helpers.py)."""

from tests.helpers import fashion_dir, mock_tfds  # noqa: F401  (fixtures)
