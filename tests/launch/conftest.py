"""The tiny prepared dataset and config of tests/train, shared with the launch tests."""

from tests.train.conftest import data_dir, tiny_config, train_losses  # noqa: F401  (data_dir: a fixture)
