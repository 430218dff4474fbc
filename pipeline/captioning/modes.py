"""Modes resolved for the engine: prompt recipes with sampling filled from run defaults.

A mode is one caption per image: a prompt (or a weighted set of prompts, one drawn per image), a
token cap and sampling settings. Named presets expand into modes at config load; `dual` is the
seed's dual-caption script: Booru-like tags within 50 words (128 tokens) and a Straightforward
description within 160 words (256 tokens).

**Chained modes.** A mode may `require` other modes and use their captions in its prompt (`{mode.NAME}`,
captioning/fields.py): tags first, then a description that uses them; a long description, then a text-only
(`image: false`) rewrite of it in 77 tokens. The order is resolved when the config loads (`chain_stages`): a
mode's stage is one more than the deepest mode it requires, unknown names and cycles fail there naming the
key. The engine runs an image's modes stage by stage, every mode of a stage together (so they share the
image's prefix in the engine's cache); a stage's prompts are filled with the earlier stages' text of the same
image, and `<mode>_prompt` records the filled prompt like any other.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
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
    requires: tuple[str, ...] = ()  # modes whose captions fill this one's `{mode.NAME}` fields
    image: bool = True  # False: a text-only request (no image), e.g. a rewrite of a required mode's caption
    stage: int = 0  # 0 for modes that require none; else one more than the deepest mode required
    engine: str | None = None  # a name under the run's `engines:`; None: the run's own engine
    engine_model: str | None = None  # that engine's served model (it makes the captions: in the fingerprint)
    system_prompt: str | None = None  # this mode's own system message; None: `defaults.system_prompt`

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

    def instruction_for_row(self, run_seed: int, key: str, meta: Any,
                            earlier: Mapping[str, str] | None = None) -> tuple[str, list[str]]:
        """This image's instruction with its template fields filled from the row's `meta` and, for a chained
        mode, its earlier captions (fields.py), and the plain fields it had no value for (filled empty)."""
        return fields.fill(self.instruction_for(run_seed, key), key, meta, earlier)

    def chained_text(self, text: str) -> str:
        """What a mode requiring this one reads of its caption: the caption as the table holds it (cleaned when
        clean-up is on), without the prepend and append meant for the trainer."""
        return cleanup.clean_caption(text, self.cleanup) if self.cleanup is not None else text

    def sampling(self) -> dict[str, Any]:
        return {"max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "top_k": self.top_k}

    def describe(self) -> dict[str, Any]:
        described = {"name": self.name, "instructions": list(self.instructions), "weights": list(self.weights),
                     "prepend": self.prepend, "append": self.append, **self.sampling()}
        # Only when on: a mode without clean-up keeps the fingerprint it had before clean-up existed.
        if self.cleanup is not None:
            described["cleanup"] = cleanup.describe(self.cleanup)
        if self.requires:  # likewise for chains: the chain (and so its order) is in the fingerprint
            described["requires"] = list(self.requires)
        if not self.image:
            described["image"] = False
        if self.engine is not None:  # another model makes this mode's captions; the server's address does not
            described["engine_model"] = self.engine_model
        if self.system_prompt is not None:
            described["system_prompt"] = self.system_prompt
        return described


def chain_stages(modes: Sequence[ModeConfig]) -> dict[str, int]:
    """Each mode's stage: 0 without `requires`, else one more than the deepest mode it requires. ValueError
    naming the key (`modes.N.requires`) for a name that is no mode of the run, or a cycle."""
    by_name = {mode.name: (index, mode) for index, mode in enumerate(modes)}
    for index, mode in enumerate(modes):
        unknown = [name for name in mode.requires if name not in by_name]
        if unknown:
            raise ValueError(f"modes.{index}.requires: {unknown} is not a mode of this run; modes: {sorted(by_name)}")
    stages: dict[str, int] = {}

    def stage_of(name: str, path: tuple[str, ...]) -> int:
        if name in path:
            cycle = " -> ".join((*path[path.index(name):], name))
            raise ValueError(f"modes.{by_name[name][0]}.requires: the modes require each other in a cycle: {cycle}")
        if name not in stages:
            required = by_name[name][1].requires
            stages[name] = 1 + max((stage_of(other, (*path, name)) for other in required), default=-1)
        return stages[name]

    for mode in modes:
        stage_of(mode.name, ())
    return stages


def stage_groups(modes: Sequence[ResolvedMode]) -> list[list[int]]:
    """Mode indices by stage, earliest first: the engine runs each group after the one before it."""
    groups: dict[int, list[int]] = {}
    for index, mode in enumerate(modes):
        groups.setdefault(mode.stage, []).append(index)
    return [groups[stage] for stage in sorted(groups)]


def resolve_modes(modes: Sequence[ModeConfig], defaults: Defaults,
                  engines: Mapping[str, Any] | None = None) -> list[ResolvedMode]:
    """Each mode's prompts rendered from the catalog, and what it leaves out filled from `defaults`; `engines`:
    the run's named engines (config.engines.EngineConfig), for the served model of a mode that names one."""
    resolved = []
    stages = chain_stages(modes)
    for mode in modes:
        recipes = mode.recipes()
        chained = frozenset(mode.requires)
        instructions = tuple(
            fields.normalise(recipe.prompt, chained) if recipe.prompt is not None  # a template (fields.py)
            else fields.literal(prompts.caption_prompt(recipe.type or "", recipe.length, recipe.extra,
                                                       mode.character_name))  # catalog text is literal
            for recipe in recipes
        )
        resolved.append(ResolvedMode(
            name=mode.name, instructions=instructions, weights=tuple(r.weight for r in recipes),
            max_tokens=mode.max_tokens or defaults.max_tokens,
            temperature=defaults.temperature if mode.temperature is None else mode.temperature,
            top_p=mode.top_p or defaults.top_p, top_k=mode.top_k or defaults.top_k,
            prepend=mode.prepend, append=mode.append, cleanup=mode.cleanup if mode.cleanup.enabled else None,
            requires=mode.requires, image=mode.image, stage=stages[mode.name], engine=mode.engine,
            engine_model=_served_model(engines, mode.engine), system_prompt=mode.system_prompt,
        ))
    return resolved


def _served_model(engines: Mapping[str, Any] | None, name: str | None) -> str | None:
    """The model a named engine serves (`engines.NAME.model`, else the name itself)."""
    if name is None:
        return None
    engine = (engines or {}).get(name)
    return (getattr(engine, "model", None) or name) if engine is not None else name


def row_instructions(modes: Sequence[ResolvedMode], run_seed: int, keys: Sequence[str],
                     metas: Sequence[Any] | None = None,
                     earlier: Sequence[Mapping[str, str]] | None = None) -> list[list[str]]:
    """result[i][m]: image i's instruction in mode m, drawn by weight and with its template fields filled from
    its `meta` and `earlier[i]` (its captions of earlier stages, by mode name). A plain field with no value is
    filled empty and counted in MISSING_FIELDS, with a warning for the first row of each field and then at
    every power of ten (a data problem, not an error row)."""
    metas = metas if metas is not None else [None] * len(keys)
    earlier = earlier if earlier is not None else [{}] * len(keys)
    result = []
    for key, meta, before in zip(keys, metas, earlier, strict=True):
        row = []
        for mode in modes:
            text, missing = mode.instruction_for_row(run_seed, key, meta, before)
            for name in missing:
                label = f"{mode.name} {{{name}}}"
                count = MISSING_FIELDS[label] = MISSING_FIELDS.get(label, 0) + 1
                if str(count).rstrip("0") == "1":  # 1, 10, 100, ...
                    log.warning("mode %s: template field {%s} has no value for %s (filled empty; %d rows so far)",
                                mode.name, name, key, count)
            row.append(text)
        result.append(row)
    return result
