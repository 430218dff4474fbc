"""The caption layer's settings: what a mode is, the run's defaults for it, clean-up and quality.

Typed and validated when the config loads (pydantic), against the JoyCaption prompt catalog
(`prompts`): an unknown caption type, a bad length or an extra option that does not exist fails there,
naming the key. `pipeline.config.RunConfig` composes these with the input, output, model and compute
sections.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from pipeline.captioning import fields, prompts
from pipeline.captioning.columns import RESERVED_COLUMNS
from pipeline.captioning.prompts import TAG_CAPTION_TYPES

MODE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,47}$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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
    requires: tuple[str, ...] = Field(
        (), description="Modes whose captions this one's prompt uses (`{mode.NAME}` or `{NAME}`): they run first, "
                        "on the same image, and their text (cleaned, without prepend/append) fills the field.")
    image: bool = Field(True, description="false: a text-only mode (no image in the request), e.g. a rewrite of "
                                          "a required mode's caption; needs a free-text `prompt` or `prompts`.")
    engine: str | None = Field(None, description="A name under the run's `engines:` (an OpenAI-compatible "
                                                 "server, e.g. one serving a text LLM for rewrites): this mode's "
                                                 "requests go there instead of to the run's engine.")
    system_prompt: str | None = Field(None, min_length=1, description="This mode's system message instead of "
                                                                     "`defaults.system_prompt`.")

    @field_validator("name")
    @classmethod
    def _name_is_a_column(cls, name: str) -> str:
        if not MODE_NAME.match(name) or name in RESERVED_COLUMNS:
            raise ValueError(f"mode name {name!r} must be lower_snake_case and not one of {sorted(RESERVED_COLUMNS)}")
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

    @field_validator("requires")
    @classmethod
    def _required_names(cls, requires: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        if info.data.get("name") in requires:
            raise ValueError(f"mode {info.data.get('name')!r} cannot require itself")
        repeated = sorted({name for name in requires if requires.count(name) > 1})
        if repeated:
            raise ValueError(f"repeated in `requires`: {repeated}")
        return requires

    @model_validator(mode="after")
    def _recipe_is_valid(self) -> ModeConfig:
        sources = [self.type is not None, self.prompt is not None, self.prompts is not None]
        if sum(sources) != 1:
            raise ValueError(f"mode {self.name!r}: give exactly one of `type`, `prompt` or `prompts`")
        if not self.image and any(recipe.type is not None for recipe in self.recipes()):
            raise ValueError(f"mode {self.name!r}, key image: a text-only mode (`image: false`) needs a free-text "
                             "`prompt` or `prompts`; caption types ask about an image")
        chained = frozenset(self.requires)
        for index, recipe in enumerate(self.recipes()):
            if recipe.prompt is not None:
                where = "prompt" if self.prompts is None else f"prompts.{index}.prompt"
                try:
                    used = fields.modes_used(recipe.prompt, chained)
                except ValueError as err:
                    raise ValueError(f"mode {self.name!r}, key {where}: {err}") from None
                unrequired = sorted(set(used) - chained)
                if unrequired:
                    raise ValueError(f"mode {self.name!r}, key {where}: uses the caption of {unrequired} without "
                                     f"requiring it; add `requires: {unrequired}`")
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
    confidence: bool = Field(True, description="Ask the engine for the sampled tokens' log-probabilities and store "
                                               "each caption's 0..1 confidence in <mode>_confidence.")
    max_error_share: float = Field(0.5, ge=0, le=1, description="A run ends with exit 5 when more than this share "
                                                               "of the output's rows are errors, or none is "
                                                               "captioned (1 never fails for errors).")
