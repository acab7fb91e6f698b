"""Named configs as Python functions (tiny ones first-class)."""

from braid.configs.models import MODEL_CONFIGS, model_config

__all__ = ["MODEL_CONFIGS", "model_config"]
