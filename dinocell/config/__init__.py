"""Configuration: the typed schema (one dataclass per section) and loading, merging, validating and saving it."""

from dinocell.config.loading import (
    ConfigError,
    config_to_dict,
    config_to_yaml,
    load_config,
    save_config,
    validate_config,
)
from dinocell.config.schema import (
    CROP_GROUPS,
    GLOBAL_CROP_GROUPS,
    CropsConfig,
    OptimConfig,
    SSLConfig,
    StudentConfig,
)

__all__ = [
    "CROP_GROUPS",
    "GLOBAL_CROP_GROUPS",
    "ConfigError",
    "CropsConfig",
    "OptimConfig",
    "SSLConfig",
    "StudentConfig",
    "config_to_dict",
    "config_to_yaml",
    "load_config",
    "save_config",
    "validate_config",
]
