"""braid: pretraining hybrid language models at scale."""

__version__ = "0.1.0"
