"""Named configs as Python functions (tiny ones first-class)."""

from braid.configs.models import MODEL_CONFIGS, model_config

__all__ = ["MODEL_CONFIGS", "TRAIN_CONFIGS", "model_config", "train_config"]


def __getattr__(name):
    # Training configs import braid.train, which imports the model: load them on first use.
    if name in ("TRAIN_CONFIGS", "train_config"):
        from braid.configs import train

        return getattr(train, name)
    raise AttributeError(f"module 'braid.configs' has no attribute {name!r}")
