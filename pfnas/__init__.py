"""pfnas: per-layer prompt fusion search for frozen Vision Transformers."""
from .config import OPS, ConfigError, DataError, ExperimentConfig, ModelError, PfnasError, TrainingError, load_config

__version__ = "0.1.0"
__all__ = ["OPS", "ConfigError", "DataError", "ExperimentConfig", "ModelError", "PfnasError", "TrainingError",
           "load_config", "__version__"]
