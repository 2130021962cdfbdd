"""pfnas: per-layer prompt fusion search for frozen Vision Transformers."""
from .config import OPS, ConfigError, DataError, ExperimentConfig, ModelError, PfnasError, TrainingError, load_config

__version__ = "0.1.0"
__all__ = ["OPS", "ConfigError", "DataError", "ExperimentConfig", "ModelError", "PfnasError", "TrainingError",
           "load_config", "load_model", "__version__"]


def __getattr__(name: str):
    if name == "load_model":  # lazy: `import pfnas` (and the CLI start) stays free of torch
        from .export import load_model

        return load_model
    raise AttributeError(f"module 'pfnas' has no attribute {name!r}")
