"""Text for `pipeline prompts`: the vocabulary, and the exact prompt a mode sends."""

from __future__ import annotations

import argparse

from pipeline.captioning import prompts
from pipeline.captioning.modes import ResolvedMode
from pipeline.config import load_config


def describe_catalog() -> str:
    lines = ["Caption types (type: id):"]
    for kind in prompts.CAPTION_TYPES.values():
        lines.append(f"  {kind.id:<20} {kind.label}")
    lines.append("")
    lines.append(f"Lengths (length:): any | {' | '.join(prompts.LENGTH_WORDS)} | a word count "
                 f"{prompts.MIN_WORDS}-{prompts.MAX_WORDS}")
    lines.append("")
    lines.append("Extra options (extra: [id, ...] or the full sentence):")
    for key, sentence in prompts.EXTRA_OPTIONS.items():
        lines.append(f"  {key:<20} {sentence}")
    lines.append("")
    lines.append("Presets (modes: NAME): dual = booru_like tags within 50 words (128 tokens) + "
                 "straightforward within 160 words (256 tokens)")
    return "\n".join(lines)


def _show(name: str, instruction: str, system: str, sampling: dict[str, object] | None = None,
          mode: ResolvedMode | None = None) -> list[str]:
    lines = [f"[{name}]", f"prompt: {instruction}"]
    if mode is not None and mode.requires:
        lines.append(f"stage {mode.stage + 1}: after {', '.join(mode.requires)}; each {{mode.NAME}} is filled with "
                     "that mode's caption of the same image")
    if mode is not None and mode.engine is not None:
        lines.append(f"engine: {mode.engine} (model {mode.engine_model}; the chat string below is what JoyCaption's "
                     "template makes of it, the server applies its own)")
    if mode is not None and mode.system_prompt is not None:
        system = mode.system_prompt
    if sampling:
        lines.append("sampling: " + ", ".join(f"{k}={v}" for k, v in sampling.items()))
    image = mode is None or mode.image
    lines.append("chat string sent to the engine (<image> becomes 729 image tokens):" if image else
                 "chat string sent to the engine (text only, no image):")
    lines.append(prompts.chat_string(system, instruction, image))
    return lines


def describe_mode(args: argparse.Namespace) -> str:
    if args.config:
        config = load_config(args.config, args.set)
        system = args.system or config.defaults.system_prompt
        lines: list[str] = []
        for mode in config.resolved_modes():
            for instruction, weight in zip(mode.instructions, mode.weights, strict=True):
                label = mode.name if len(mode.instructions) == 1 else f"{mode.name} (weight {weight})"
                lines += [*_show(label, instruction, system, mode.sampling(), mode), ""]
        return "\n".join(lines).rstrip()
    system = args.system or prompts.DEFAULT_SYSTEM_PROMPT
    instruction = args.prompt or prompts.caption_prompt(args.type, args.length, args.extra, args.name)
    return "\n".join(_show(args.type or "custom", instruction, system))
