"""pfnas: per-layer prompt fusion search for frozen Vision Transformers.

The public front: the configuration, the error family and :func:`load_model` (imported on first use, so
``import pfnas`` and the CLI's start stay free of torch).
"""
from ._version import __version__
from .config import OPS, ExperimentConfig, load_config
from .errors import ConfigError, DataError, ModelError, PfnasError, TrainingError

__all__ = ["OPS", "ConfigError", "DataError", "ExperimentConfig", "ModelError", "PfnasError", "TrainingError",
           "load_config", "load_model", "__version__"]


def __getattr__(name: str):
    if name == "load_model":  # the front's one deferred import: torch loads on first use
        from .tracking.artifacts import load_model

        return load_model
    raise AttributeError(f"module 'pfnas' has no attribute {name!r}")
