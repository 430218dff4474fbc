"""Modes resolved for the engine: prompt recipes with sampling filled from run defaults.

A mode is one caption per image: a prompt (or a weighted set of prompts, one drawn per image), a
token cap and sampling settings. Named presets expand into modes at config load; `dual` is the
seed's dual-caption script: Booru-like tags within 50 words (128 tokens) and a Straightforward
description within 160 words (256 tokens).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.captioning import cleanup, fields, prompts
from pipeline.captioning.specs import CleanupConfig, Defaults, ModeConfig

log = logging.getLogger("pipeline.captioning.fields")
MISSING_FIELDS: dict[str, int] = {}  # "mode {field}" -> rows of this process that had no value for it

PRESETS: dict[str, list[dict[str, Any]]] = {
    "dual": [
        {"name": "tags", "type": "booru_like", "length": 50, "max_tokens": 128},
        {"name": "description", "type": "straightforward", "length": 160, "max_tokens": 256},
    ],
}


def expand_presets(value: Any) -> Any:
    """`modes: dual` or a `{preset: dual}` item becomes the preset's modes; other items pass through."""
    items = [value] if isinstance(value, str | dict) else value
    if not isinstance(items, list | tuple):
        return value
    expanded: list[Any] = []
    for item in items:
        name = item if isinstance(item, str) else item.get("preset") if isinstance(item, dict) else None
        if name is None:
            expanded.append(item)
            continue
        if name not in PRESETS:
            raise ValueError(f"unknown mode preset {name!r}; known: {sorted(PRESETS)}")
        overrides = {k: v for k, v in item.items() if k != "preset"} if isinstance(item, dict) else {}
        expanded.extend({**mode, **overrides} for mode in PRESETS[name])
    return expanded


def derive_seed(run_seed: int, key: str, mode: str, attempt: int = 0) -> int:
    """A stable 63-bit seed per (run seed, image key, mode, attempt)."""
    digest = hashlib.sha256(f"{run_seed}\x1f{key}\x1f{mode}\x1f{attempt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


@dataclass(frozen=True)
class ResolvedMode:
    name: str
    instructions: tuple[str, ...]  # each prompt's instruction as a template (fields.py: `{{` is a brace)
    weights: tuple[float, ...]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int | None
    prepend: str
    append: str
    cleanup: CleanupConfig | None = None  # None when the mode's clean-up is off (the default)

    def instruction_for(self, run_seed: int, key: str) -> str:
        """Draw this image's instruction by weight, reproducibly from the run seed and key."""
        if len(self.instructions) == 1:
            return self.instructions[0]
        point = derive_seed(run_seed, key, f"{self.name}/prompt") / 2**63 * sum(self.weights)
        for instruction, weight in zip(self.instructions, self.weights, strict=True):
            if point < weight:
                return instruction
            point -= weight
        return self.instructions[-1]

    def instruction_for_row(self, run_seed: int, key: str, meta: Any) -> tuple[str, list[str]]:
        """This image's instruction with its template fields filled from the row's `meta` (fields.py), and the
        plain fields it had no value for (filled empty)."""
        return fields.fill(self.instruction_for(run_seed, key), key, meta)

    def sampling(self) -> dict[str, Any]:
        return {"max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "top_k": self.top_k}

    def describe(self) -> dict[str, Any]:
        described = {"name": self.name, "instructions": list(self.instructions), "weights": list(self.weights),
                     "prepend": self.prepend, "append": self.append, **self.sampling()}
        # Only when on: a mode without clean-up keeps the fingerprint it had before clean-up existed.
        if self.cleanup is not None:
            described["cleanup"] = cleanup.describe(self.cleanup)
        return described


def resolve_modes(modes: Sequence[ModeConfig], defaults: Defaults) -> list[ResolvedMode]:
    """Each mode's prompts rendered from the catalog, and what it leaves out filled from `defaults`."""
    resolved = []
    for mode in modes:
        recipes = mode.recipes()
        instructions = tuple(
            recipe.prompt if recipe.prompt is not None  # a template (fields.py); catalog text is literal
            else fields.literal(prompts.caption_prompt(recipe.type or "", recipe.length, recipe.extra,
                                                       mode.character_name))
            for recipe in recipes
        )
        resolved.append(ResolvedMode(
            name=mode.name, instructions=instructions, weights=tuple(r.weight for r in recipes),
            max_tokens=mode.max_tokens or defaults.max_tokens,
            temperature=defaults.temperature if mode.temperature is None else mode.temperature,
            top_p=mode.top_p or defaults.top_p, top_k=mode.top_k or defaults.top_k,
            prepend=mode.prepend, append=mode.append, cleanup=mode.cleanup if mode.cleanup.enabled else None,
        ))
    return resolved


def row_instructions(modes: Sequence[ResolvedMode], run_seed: int, keys: Sequence[str],
                     metas: Sequence[Any] | None = None) -> list[list[str]]:
    """result[i][m]: image i's instruction in mode m, drawn by weight and with its template fields filled from
    its `meta`. A plain field with no value is filled empty and counted in MISSING_FIELDS, with a warning
    for the first row of each field and then at every power of ten (a data problem, not an error row)."""
    metas = metas if metas is not None else [None] * len(keys)
    result = []
    for key, meta in zip(keys, metas, strict=True):
        row = []
        for mode in modes:
            text, missing = mode.instruction_for_row(run_seed, key, meta)
            for name in missing:
                label = f"{mode.name} {{{name}}}"
                count = MISSING_FIELDS[label] = MISSING_FIELDS.get(label, 0) + 1
                if str(count).rstrip("0") == "1":  # 1, 10, 100, ...
                    log.warning("mode %s: template field {%s} has no value for %s (filled empty; %d rows so far)",
                                mode.name, name, key, count)
            row.append(text)
        result.append(row)
    return result
