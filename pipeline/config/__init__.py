"""The run config: typed settings validated at load, `--set` overrides, canonical URIs, the fingerprint.

The caption settings (modes, defaults, clean-up, quality) are the caption layer's own types
(`pipeline.captioning.specs`); they are re-exported here so that a config is read from one place.
"""

from pipeline.captioning.specs import CleanupConfig, Defaults, ModeConfig, QualityConfig, TagCleanup, WeightedPrompt
from pipeline.config.load import absolute_paths, apply_override, build_config, load_config, read_yaml
from pipeline.config.settings import (
    ComputeConfig,
    ConfigError,
    InputConfig,
    ModelConfig,
    OutputConfig,
    RunConfig,
)

__all__ = [
    "CleanupConfig", "ComputeConfig", "ConfigError", "Defaults", "InputConfig", "ModeConfig", "ModelConfig",
    "OutputConfig", "QualityConfig", "RunConfig", "TagCleanup", "WeightedPrompt", "absolute_paths",
    "apply_override", "build_config", "load_config", "read_yaml",
]
