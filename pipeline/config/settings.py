"""The run config: typed, validated at load (before any engine starts), and fingerprinted.

A config is YAML shaped like `configs/demo.yaml`. Unknown keys are errors, and every error names
the offending key path (for example `modes.0.length`). Loading and `--set` overrides are in `load.py`.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.captioning.columns import check_mode_columns
from pipeline.captioning.modes import ResolvedMode, chain_stages, expand_presets, resolve_modes
from pipeline.captioning.specs import Defaults, ModeConfig, QualityConfig, Strict
from pipeline.config.engine_options import caption_affecting, reserved_key_problems
from pipeline.config.engines import EngineConfig, named_engine_problem
from pipeline.config.limits import LEASE_TTL_S
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
    path: str = Field(description="Hugging Face id, a local model folder, or the URI of one (s3://..., any fsspec "
                                  "URI): each node fetches it once into model.cache_dir.")
    revision: str | None = Field(None, description="Model revision (commit or tag) for hub ids.")
    cache_dir: str | None = Field(None, description="Where nodes keep a model.path fetched from storage (default "
                                                    "~/.cache/joycaption-pipeline/models); one folder per URI and "
                                                    "revision, reused by later runs.")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options for a model.path URI, "
                                                                              "e.g. endpoint_url; never logged.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    max_model_len: int = Field(4096, ge=1024, description="Context length; prompts take ~780-900 tokens.")
    enable_prefix_caching: bool = Field(True, description="Share the image prefix between modes of one image.")
    enforce_eager: bool = Field(False, description="Skip CUDA graphs / compilation (always on for CPU).")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    quantization: str | None = Field(None, description="Any method the installed vLLM knows (fp8, bitsandbytes where "
                                                       "vLLM has it, ...); checked against vLLM when the config loads.")
    load_format: Literal["auto", "safetensors", "dummy"] = Field(
        "auto", description="`dummy` runs the architecture on random weights (benchmarks).")
    kv_cache_space_gb: float = Field(1.0, gt=0, description="CPU engines only: KV cache size in GiB.")
    cpu_threads: int | None = Field(None, ge=1, description="CPU engines only: threads the engine computes "
                                                            "with; every core this process may use when unset.")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per engine, for models bigger than one GPU.")
    max_num_seqs: int | None = Field(None, ge=1, description="Engine batch limit; vLLM's default when unset.")
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="More vLLM engine arguments, merged over the pipeline's own; checked "
                                          "against the installed vLLM when the config loads (engine_options.py).")

    @field_validator("engine_kwargs")
    @classmethod
    def _not_the_pipelines_own(cls, value: dict[str, Any]) -> dict[str, Any]:
        problems = reserved_key_problems(value)
        if problems:
            raise ValueError("; ".join(problems))
        return value

    @field_validator("quantization")
    @classmethod
    def _quantization_name(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("give a quantization method, or leave the key out")
        return value.strip() if value else None


def parse_actor_count(value: Any) -> int | str | None:
    """`compute.actors` in its canonical form: an int, `"LOW..HIGH"`, `"auto"`, or None."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    text = value.strip().lower() if isinstance(value, str) else None
    if text == "auto":
        return text
    if text is not None and text.isdigit() and int(text) >= 1:
        return int(text)
    match = re.fullmatch(r"(\d+)\s*\.\.\s*(\d+)", text or "")
    if match and 1 <= int(match[1]) <= int(match[2]):
        low, high = int(match[1]), int(match[2])
        return low if low == high else f"{low}..{high}"
    raise ValueError(f"{value!r} is not an engine count: give a number (2), a range \"LOW..HIGH\" with "
                     "1 <= LOW <= HIGH (\"1..4\"), or auto")


class ComputeConfig(Strict):
    ray_address: str | None = Field(None, description="Ray cluster address; default RAY_ADDRESS or a local Ray.")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local Ray (default: all).")
    actors: int | str | None = Field(
        None, description="Caption actors (engines): a count (2), a range \"1..4\" (the pool grows as resources "
                          "appear), or auto (one engine up to one per GPU group, or one per node on CPU clusters); "
                          "default one per GPU group at start, or 1.")
    accelerator_type: str | None = Field(None, description="Only GPUs of this kind (Ray's accelerator type, e.g. "
                                                           "H100, A10G, L4) run engines.")
    placement_timeout_s: float = Field(
        600.0, gt=0, description="A pass whose engines and read tasks cannot all find resources (and that captions "
                                 "nothing meanwhile) fails after this long, naming what is missing.")
    gpus_per_actor: float | None = Field(None, ge=0, description="Default tensor_parallel_size on GPU clusters, "
                                                                 "0 on CPU.")
    cpus_per_actor: float = Field(1.0, gt=0)
    batch_size: int = Field(32, ge=1, description="Images per actor batch; each image sends every mode.")
    batches_in_flight: int | None = Field(
        None, ge=1, description="Actor batches an engine works on at once; default 2 on GPUs (the next batch's "
                                "requests queue while the last one drains), 1 on CPU engines.")
    decode_cpus: float = Field(0.25, gt=0, description="CPUs reserved per read/decode task.")

    @field_validator("actors", mode="before")
    @classmethod
    def _actor_count(cls, value: Any) -> int | str | None:
        return parse_actor_count(value)

    def actor_bounds(self) -> tuple[int, int | None] | None:
        """(fewest, most) engines for a range or a count; None where the cluster decides (unset, `auto`)."""
        if self.actors is None or self.actors == "auto":
            return None
        if isinstance(self.actors, int):
            return self.actors, self.actors
        low, high = self.actors.split("..")
        return int(low), int(high)
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
    lease_ttl_s: float = Field(LEASE_TTL_S, ge=1, le=3600, description="Advanced (tests): seconds the output's "
                               "lease lives without a renewal (renewed every third of it; a write needs a third "
                               "left). Shorter frees a crashed remote run's output sooner but stops a run whose "
                               "storage stalls that long.")
    dedup: bool = Field(True, description="Caption identical images once per run (same SHA-256 of the bytes, or "
                                          "img2dataset's `sha256`): the others get the first one's captions and "
                                          "`duplicate_of` its key (pipeline/engine/dedup.py).")
    dedup_wait_s: float = Field(300.0, ge=0, description="Longest a duplicate waits for its original, still being "
                                                        "captioned elsewhere, before it is captioned itself.")
    dedup_results: int = Field(100_000, ge=0, description="Finished captions the run's content index keeps for "
                                                         "reuse (LRU); older contents keep only their key.")


class RunConfig(Strict):
    input: InputConfig
    output: OutputConfig
    model: ModelConfig
    modes: tuple[ModeConfig, ...] = Field(description="One caption per mode and image; or a preset name.")
    defaults: Defaults = Defaults()
    quality: QualityConfig = QualityConfig()
    compute: ComputeConfig = ComputeConfig()
    engine: EngineConfig = EngineConfig()
    engines: dict[str, EngineConfig] = Field(
        default_factory=dict, description="More engines by name (OpenAI-compatible servers) that modes may send "
                                          "their requests to (`modes[].engine`), e.g. a text LLM for rewrites.")
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
        chain_stages(modes)  # unknown names and cycles in `requires` fail here, naming the key
        return modes

    @field_validator("engines", mode="before")
    @classmethod
    def _named_engines_default_to_servers(cls, value: Any) -> Any:
        """A named engine is always a server: `kind: openai` may be left out."""
        if isinstance(value, dict):
            return {name: {"kind": "openai", **engine} if isinstance(engine, dict) else engine
                    for name, engine in value.items()}
        return value

    @field_validator("engines")
    @classmethod
    def _named_engines_are_servers(cls, engines: dict[str, EngineConfig]) -> dict[str, EngineConfig]:
        for name, engine in engines.items():
            problem = named_engine_problem(name, engine)
            if problem:
                raise ValueError(problem)
        return engines

    @model_validator(mode="after")
    def _modes_name_known_engines(self) -> RunConfig:
        for index, mode in enumerate(self.modes):
            if mode.engine is not None and mode.engine not in self.engines:
                known = f"the run's engines: {sorted(self.engines)}" if self.engines else "the run names no `engines`"
                raise ValueError(f"modes.{index}.engine: {mode.engine!r} is not an engine of this run ({known})")
        return self

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
            # max_error_share is a verdict, not row content; confidence only adds a measure, the captions are the same
            "quality": self.quality.model_dump(exclude={"max_error_share", "confidence"}),
            "seed": self.seed,
        }
        engine = caption_affecting(self.model.engine_kwargs)  # speed-only knobs stay out (engine_options.py)
        if engine:  # only when set: the fingerprint of every config without them is unchanged
            material["engine_kwargs"] = engine
        canonical = json.dumps(material, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def resolved_modes(self) -> list[ResolvedMode]:
        """The modes as the engine runs them: prompts rendered, sampling filled from `defaults`."""
        return resolve_modes(self.modes, self.defaults, self.engines)

