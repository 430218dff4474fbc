"""The run config: typed, validated at load (before any engine starts), and fingerprinted.

A config is YAML shaped like `configs/demo.yaml`. Unknown keys are errors, and every error names
the offending key path (for example `modes.0.length`). Loading and `--set` overrides are in `load.py`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import Field, field_validator

from pipeline.captioning.columns import check_mode_columns
from pipeline.captioning.modes import ResolvedMode, expand_presets, resolve_modes
from pipeline.captioning.specs import Defaults, ModeConfig, QualityConfig, Strict
from pipeline.config.uris import canonical_uri


class ConfigError(ValueError):
    """A config that cannot run; the message names the key."""


class InputConfig(Strict):
    uri: str = Field(description="Local folder/file or s3://bucket/prefix holding the images.")
    format: Literal["auto", "folder", "webdataset", "parquet", "filelist"] = Field(
        "auto", description="How the input is laid out; auto detects it from the URI.")
    glob: str | None = Field(None, description="Only files whose path relative to uri matches this glob.")
    image_column: str | None = Field(
        None, description="Parquet input: column with image bytes or {bytes, path}; unset, each file's is found "
                          "(image, jpg, jpeg, png, webp, a {bytes, path} struct, or bytes that start like an image).")
    shard_size: int = Field(256, ge=1, le=100_000,
                            description="Images per shard for folders and file lists; a shard is the unit of "
                                        "commit and resume.")
    max_pixels: int = Field(64_000_000, ge=1, description="Larger images become error rows (decompression bombs).")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options, e.g. endpoint_url.")


class OutputConfig(Strict):
    uri: str = Field(description="Local folder or s3://bucket/prefix for the Parquet table.")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options for the output.")


class ModelConfig(Strict):
    path: str = Field(description="Hugging Face id or a local model folder.")
    revision: str | None = Field(None, description="Model revision (commit or tag) for hub ids.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    max_model_len: int = Field(4096, ge=1024, description="Context length; prompts take ~780-900 tokens.")
    enable_prefix_caching: bool = Field(True, description="Share the image prefix between modes of one image.")
    enforce_eager: bool = Field(False, description="Skip CUDA graphs / compilation (always on for CPU).")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    quantization: Literal["fp8"] | None = Field(None, description="fp8 on GPUs that support it (H100).")
    load_format: Literal["auto", "safetensors", "dummy"] = Field(
        "auto", description="`dummy` runs the architecture on random weights (benchmarks).")
    kv_cache_space_gb: float = Field(1.0, gt=0, description="CPU engines only: KV cache size in GiB.")
    cpu_threads: int | None = Field(None, ge=1, description="CPU engines only: threads the engine computes "
                                                            "with; every core this process may use when unset.")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per engine, for models bigger than one GPU.")
    max_num_seqs: int | None = Field(None, ge=1, description="Engine batch limit; vLLM's default when unset.")


class ComputeConfig(Strict):
    ray_address: str | None = Field(None, description="Ray cluster address; default RAY_ADDRESS or a local Ray.")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local Ray (default: all).")
    actors: int | None = Field(None, ge=1, description="Caption actors (engines); default one per GPU, or 1.")
    gpus_per_actor: float | None = Field(None, ge=0, description="Default tensor_parallel_size on GPU clusters, "
                                                                 "0 on CPU.")
    cpus_per_actor: float = Field(1.0, gt=0)
    batch_size: int = Field(32, ge=1, description="Images per actor batch; each image sends every mode.")
    batches_in_flight: int | None = Field(
        None, ge=1, description="Actor batches an engine works on at once; default 2 on GPUs (the next batch's "
                                "requests queue while the last one drains), 1 on CPU engines.")
    decode_cpus: float = Field(0.25, gt=0, description="CPUs reserved per read/decode task.")
    max_actor_restarts: int = Field(2, ge=0, description="Times a caption actor whose engine failed, hung or died "
                                                         "is replaced (its batches redone) before the run fails.")
    requests_in_flight: int | None = Field(
        None, ge=1, description="Requests each engine holds at once; default the engine's max_num_seqs. Batches "
                                "are admitted image by image up to it; glitch retries go in at once.")
    engine_stall_timeout_s: float = Field(
        600.0, gt=0, description="Watchdog: an engine step that has not returned after this long while requests "
                                 "wait ends the actor, and Ray replaces it.")
    device_wait_s: float = Field(120.0, ge=0, description="GPU engines: how long a new actor waits for its GPU's "
                                                         "memory to be freed by the engine it replaces.")
    engine_report_s: float = Field(60.0, ge=0, description="Seconds between the actor's `engine use` log lines; 0 "
                                                         "logs after every batch.")
    commit_threads: int = Field(4, ge=0, le=64, description="Shard commits in flight at once on the driver's "
                                                           "commit threads (merge, part file, marker: mostly I/O, so "
                                                           "storage latencies overlap); 0 commits on the driver's "
                                                           "loop itself.")
    commit_tasks: int = Field(0, ge=0, le=1024, description="When above 0, shard commits run as Ray tasks instead, "
                                                           "this many in flight (each a Ray worker process): the "
                                                           "commit's CPU leaves the driver's node.")


class RunConfig(Strict):
    input: InputConfig
    output: OutputConfig
    model: ModelConfig
    modes: tuple[ModeConfig, ...] = Field(description="One caption per mode and image; or a preset name.")
    defaults: Defaults = Defaults()
    quality: QualityConfig = QualityConfig()
    compute: ComputeConfig = ComputeConfig()
    seed: int = Field(0, description="Run seed; each (image, mode) seed derives from it and the image key.")

    @field_validator("modes", mode="before")
    @classmethod
    def _expand_presets(cls, value: Any) -> Any:
        return expand_presets(value)

    @field_validator("modes")
    @classmethod
    def _unique_mode_names(cls, modes: tuple[ModeConfig, ...]) -> tuple[ModeConfig, ...]:
        if not modes:
            raise ValueError("`modes` needs at least one mode")
        names = [mode.name for mode in modes]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"mode names must be unique, repeated: {duplicates}")
        check_mode_columns(names)
        return modes

    def fingerprint(self) -> str:
        """Hash of everything that changes what a row contains; resume refuses a different one."""
        input_material = {**self.input.model_dump(exclude={"storage_options"}), "uri": canonical_uri(self.input.uri)}
        if input_material.get("image_column") is None:  # unset = found per file; the fingerprint of the old default
            input_material["image_column"] = "image"
        material = {
            "input": input_material,
            "model": self.model.model_dump(include={"path", "revision", "dtype", "quantization", "load_format"}),
            "system_prompt": self.defaults.system_prompt,
            "fixed_length": self.defaults.fixed_length,
            "modes": [mode.describe() for mode in self.resolved_modes()],
            "quality": self.quality.model_dump(exclude={"max_error_share"}),  # a verdict, not row content
            "seed": self.seed,
        }
        canonical = json.dumps(material, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def resolved_modes(self) -> list[ResolvedMode]:
        """The modes as the engine runs them: prompts rendered, sampling filled from `defaults`."""
        return resolve_modes(self.modes, self.defaults)

