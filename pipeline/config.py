"""The run config: typed, validated at load (before any engine starts), and fingerprinted.

A config is YAML shaped like `configs/demo.yaml`. Unknown keys are errors, and every error names
the offending key path (for example `modes.0.length`). `--set key=value` overrides use the same
dotted paths, list items by index.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from pipeline import prompts
from pipeline.cleanup import TAG_CAPTION_TYPES
from pipeline.io.uris import canonical_uri
from pipeline.modes import expand_presets, resolve_modes  # modes.py imports config for type hints only: no cycle
from pipeline.sink import MODE_SUFFIXES, read_schema

MODE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,47}$")
# Columns a row has before its captions (the output's base columns, and the shard size and pixels it carries
# while in flight); a mode's columns (its name with each of sink.MODE_SUFFIXES) must not shadow them.
BASE_COLUMNS = frozenset(read_schema().names)


def _check_mode_columns(names: list[str]) -> None:
    """Refuse modes whose columns collide: `tags` and `tags_raw` would both write a `tags_raw` column, and
    a mode `shard` or `key_seed` would shadow or be shadowed by another column."""
    owner: dict[str, str] = {column: "a base column" for column in BASE_COLUMNS}
    for name in names:
        for suffix in MODE_SUFFIXES:
            column = name + suffix
            if column in owner:
                raise ValueError(f"mode {name!r} would write column {column!r}, which is already {owner[column]}: "
                                 "rename the mode")
            owner[column] = f"a column of mode {name!r}"


class ConfigError(ValueError):
    """A config that cannot run; the message names the key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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


class Defaults(Strict):
    """Run-level values for what a mode leaves out."""

    system_prompt: str = Field(prompts.DEFAULT_SYSTEM_PROMPT, min_length=1)
    temperature: float = Field(0.6, ge=0, le=2)
    top_p: float = Field(0.9, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    max_tokens: int = Field(256, ge=1, le=4096)
    fixed_length: bool = Field(False, description="Benchmarks: ignore end-of-turn and always generate "
                                                  "max_tokens, so runs are comparable.")


class WeightedPrompt(Strict):
    """One entry of a weighted prompt set: free text, or a caption type recipe, and its weight."""

    weight: float = Field(1.0, gt=0)
    prompt: str | None = None
    type: str | None = None
    length: str | int = "any"
    extra: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _one_source(self) -> WeightedPrompt:
        if (self.prompt is None) == (self.type is None):
            raise ValueError("give exactly one of `prompt` or `type`")
        return self


class TagCleanup(Strict):
    """Clean-up of a comma-separated tag list (tag modes: danbooru, e621, rule34, booru_like)."""

    style: Literal["spaces", "underscores", "as_is"] = Field(
        "as_is", description="Words inside a tag: `spaces` (long hair), `underscores` (long_hair, Danbooru's own "
                             "spelling) or `as_is`. Emoticon tags such as ^_^ and o_o keep their underscores.")
    lowercase: bool = Field(False, description="Lower-case every tag.")
    dedupe: bool = Field(False, description="Drop a tag seen earlier in the list; `Long_Hair`, `long hair` and "
                                            "`long_hair` count as one tag. The first spelling (restyled) stays.")
    separator: str = Field(", ", min_length=1, description="Joins the cleaned tags (the model's list is split "
                                                           "at commas and line breaks).")


class CleanupConfig(Strict):
    """Clean-up of a mode's captions after generation, in the write stage; all off by default.

    When any rule is on, the mode's column holds the cleaned caption and `<mode>_raw` the model's text as
    generated (without prepend/append), and the settings go into the manifest and the fingerprint."""

    strip_meta_openings: bool = Field(
        False, description="Remove a leading meta phrase (\"This image shows\", \"In this image,\", \"Here is a "
                           "description of the image:\") and re-capitalise; kept when removing it would leave a "
                           "fragment. A medium stays: \"This photo shows a cat\" becomes \"A photo of a cat\".")
    normalise_whitespace: bool = Field(
        False, description="Collapse runs of spaces and tabs, trim lines, at most one blank line in a row.")
    tags: TagCleanup | None = Field(
        None, description="Tag list clean-up; only for tag caption types, or free-text `prompt`s that ask "
                          "for tags.")

    @property
    def enabled(self) -> bool:
        return self.strip_meta_openings or self.normalise_whitespace or self.tags is not None


class ModeConfig(Strict):
    name: str = Field(description="Output column for this mode's caption.")
    type: str | None = Field(None, description="Caption type id, e.g. straightforward.")
    prompt: str | None = Field(None, description="Free-text instruction instead of `type`.")
    prompts: tuple[WeightedPrompt, ...] | None = Field(None, description="Weighted prompt set; one drawn per image.")
    length: str | int = Field("any", description="any, a length word, or a word count (20-260).")
    extra: tuple[str, ...] = Field((), description="Extra options by id or full sentence.")
    character_name: str | None = Field(None, description="Fills {name} in the `name` extra option.")
    max_tokens: int | None = Field(None, ge=1, le=4096)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    prepend: str = Field("", description="Text put before every caption of this mode.")
    append: str = Field("", description="Text put after every caption of this mode.")
    cleanup: CleanupConfig = Field(
        default_factory=CleanupConfig,
        description="Clean-up of this mode's captions (off by default); the model's text stays in `<name>_raw`.")

    @field_validator("name")
    @classmethod
    def _name_is_a_column(cls, name: str) -> str:
        if not MODE_NAME.match(name) or name in BASE_COLUMNS:
            raise ValueError(f"mode name {name!r} must be lower_snake_case and not one of {sorted(BASE_COLUMNS)}")
        return name

    @field_validator("cleanup")
    @classmethod
    def _tag_cleanup_needs_tags(cls, cleanup: CleanupConfig, info: ValidationInfo) -> CleanupConfig:
        """Tag rules split at commas: on a descriptive caption they would mangle sentences. A free-text
        prompt may ask for tags, so it is allowed; a weighted set only when every entry is."""
        if cleanup.tags is None:
            return cleanup
        recipes = info.data.get("prompts") or ()
        types = [info.data.get("type")] + [recipe.type for recipe in recipes]
        wrong = sorted({kind for kind in types if kind is not None and kind not in TAG_CAPTION_TYPES})
        if wrong:
            raise ValueError(f"`tags` is for tag caption types {sorted(TAG_CAPTION_TYPES)} or free-text prompts, "
                             f"not {', '.join(wrong)}")
        return cleanup

    @model_validator(mode="after")
    def _recipe_is_valid(self) -> ModeConfig:
        sources = [self.type is not None, self.prompt is not None, self.prompts is not None]
        if sum(sources) != 1:
            raise ValueError(f"mode {self.name!r}: give exactly one of `type`, `prompt` or `prompts`")
        for recipe in self.recipes():
            if recipe.type is not None:
                try:
                    prompts.caption_prompt(recipe.type, recipe.length, recipe.extra, self.character_name)
                except ValueError as err:
                    raise ValueError(f"mode {self.name!r}: {err}") from None
        return self

    def recipes(self) -> tuple[WeightedPrompt, ...]:
        if self.prompts is not None:
            return self.prompts
        return (WeightedPrompt(prompt=self.prompt, type=self.type, length=self.length, extra=self.extra),)


class QualityConfig(Strict):
    max_attempts: int = Field(3, ge=1, le=10, description="Generations per (image, mode) while output glitches.")
    retry_on: tuple[Literal["repetition", "truncated", "refusal", "empty"], ...] = Field(
        ("repetition", "truncated", "refusal", "empty"), description="Which glitches are retried.")
    repetition_ngram: int = Field(4, ge=2, description="A word n-gram repeated this many times is a loop.")
    repetition_min_repeats: int = Field(4, ge=2)
    max_error_share: float = Field(0.5, ge=0, le=1, description="A run ends with exit 5 when more than this share "
                                                               "of the output's rows are errors, or none is "
                                                               "captioned (1 never fails for errors).")


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
        _check_mode_columns(names)
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
            "modes": [mode.describe() for mode in resolve_modes(self)],
            "quality": self.quality.model_dump(exclude={"max_error_share"}),  # a verdict, not row content
            "seed": self.seed,
        }
        canonical = json.dumps(material, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text) if text.strip() else ""


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """Apply `a.b.0.c=value` to a nested dict/list tree in place."""
    if "=" not in assignment:
        raise ConfigError(f"--set needs key=value, got {assignment!r}")
    path, raw = assignment.split("=", 1)
    parts = path.strip().split(".")
    node: Any = tree
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"--set {path}: no list item {where}")
            index: int | str = int(part)
        elif isinstance(node, dict):
            index = part
            if not last and part not in node:
                node[part] = {}
        else:
            raise ConfigError(f"--set {path}: {'.'.join(parts[:depth])} is not a section")
        if last:
            node[index] = _parse_value(raw)
        else:
            node = node[index]


def _format_errors(err: ValidationError) -> str:
    lines = []
    for item in err.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        lines.append(f"  {where}: {message}")
    return "invalid config:\n" + "\n".join(lines)


def build_config(tree: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    tree = json.loads(json.dumps(tree))  # deep copy, keeps the caller's tree untouched
    for assignment in overrides:
        apply_override(tree, assignment)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_errors(err)) from None


def absolute_paths(config: RunConfig) -> RunConfig:
    """URIs in their canonical form (`~` expanded, `file://` stripped, symlinks resolved, no trailing slash),
    so Ray workers with another working directory find them and one input has one fingerprint."""
    model_path = os.path.expanduser(config.model.path)
    try:
        input_uri, output_uri = canonical_uri(config.input.uri), canonical_uri(config.output.uri)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return config.model_copy(update={
        "input": config.input.model_copy(update={"uri": input_uri}),
        "output": config.output.model_copy(update={"uri": output_uri}),
        "model": config.model.model_copy(update={"path": os.path.abspath(model_path)})
        if os.path.isdir(model_path) else config.model,
    })


def read_yaml(path: str | Path, what: str, error: type[Exception]) -> Any:
    """The YAML document at `path`; a missing file or bad YAML raises `error` in one line naming `what`."""
    try:
        return yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise error(f"{what} file not found: {path}") from None
    except yaml.YAMLError as err:
        raise error(f"{what} {path} is not valid YAML: {err}") from None


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = (), input_uri: str | None = None,
                output_uri: str | None = None) -> RunConfig:
    """Read, override and validate a YAML run config."""
    tree = read_yaml(path, "config", ConfigError)
    if not isinstance(tree, dict):
        raise ConfigError(f"config {path} must be a mapping of sections")
    extra = list(overrides)
    if input_uri:
        extra.append(f"input.uri={json.dumps(input_uri)}")
    if output_uri:
        extra.append(f"output.uri={json.dumps(output_uri)}")
    return absolute_paths(build_config(tree, extra))
