"""Fixtures shared with tests/train: the tiny prepared dataset (session-scoped)."""

from tests.train.conftest import data_dir, tiny_config  # noqa: F401  (data_dir is a fixture)
