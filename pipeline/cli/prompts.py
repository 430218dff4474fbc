"""Text for `pipeline prompts`: the vocabulary, and the exact prompt a mode sends."""

from __future__ import annotations

import argparse

from pipeline.captioning import prompts
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


def _show(name: str, instruction: str, system: str, sampling: dict[str, object] | None = None) -> list[str]:
    lines = [f"[{name}]", f"prompt: {instruction}"]
    if sampling:
        lines.append("sampling: " + ", ".join(f"{k}={v}" for k, v in sampling.items()))
    lines.append("chat string sent to the engine (<image> becomes 729 image tokens):")
    lines.append(prompts.chat_string(system, instruction))
    return lines


def describe_mode(args: argparse.Namespace) -> str:
    if args.config:
        config = load_config(args.config, args.set)
        system = args.system or config.defaults.system_prompt
        lines: list[str] = []
        for mode in config.resolved_modes():
            for instruction, weight in zip(mode.instructions, mode.weights, strict=True):
                label = mode.name if len(mode.instructions) == 1 else f"{mode.name} (weight {weight})"
                lines += [*_show(label, instruction, system, mode.sampling()), ""]
        return "\n".join(lines).rstrip()
    system = args.system or prompts.DEFAULT_SYSTEM_PROMPT
    instruction = args.prompt or prompts.caption_prompt(args.type, args.length, args.extra, args.name)
    return "\n".join(_show(args.type or "custom", instruction, system))
