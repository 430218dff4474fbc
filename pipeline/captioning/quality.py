"""Glitch detection: repetition loops, runaway output, refusals, empty output.

JoyCaption glitches in 1.5-3% of generations; its author's advice is to retry. A glitch here is a
reason string (or None for clean output); the caption actor retries the kinds listed in
`quality.retry_on` with a new derived seed, and the row records what is left.
"""

from __future__ import annotations

import re

from pipeline.captioning.specs import QualityConfig

REFUSAL = re.compile(
    r"^\s*(i'?m sorry|i am sorry|sorry, but|i cannot|i can'?t|i can not|i won'?t|i will not|i apologi[sz]e|"
    r"as an ai\b|i'?m (unable|not able)|i am (unable|not able)|unfortunately,? i (cannot|can'?t))",
    re.IGNORECASE,
)
_WORDS = re.compile(r"[^\s,;]+")


def _has_loop(words: list[str], ngram: int, min_repeats: int) -> bool:
    """True if some n-gram (n <= ngram) repeats back to back `min_repeats` times."""
    for size in range(1, ngram + 1):
        needed = size * min_repeats
        # Single words repeat naturally ("very very"): ask more of them.
        if size == 1:
            needed = 2 * min_repeats
        for start in range(0, len(words) - needed + 1):
            window = words[start:start + size]
            if all(words[start + k * size:start + (k + 1) * size] == window for k in range(needed // size)):
                return True
    return False


def _repeated_tags(text: str, min_repeats: int) -> bool:
    """Tag lists loop by listing the same tag again and again, not always back to back."""
    tags = [tag.strip().lower() for tag in text.split(",") if tag.strip()]
    if len(tags) < 2 * min_repeats:
        return False
    return max(tags.count(tag) for tag in set(tags)) >= min_repeats


def detect_glitch(text: str, finish_reason: str | None, config: QualityConfig) -> str | None:
    """The kind of glitch in one generation, or None."""
    if not text.strip():
        return "empty"
    if REFUSAL.search(text):
        return "refusal"
    words = [word.lower() for word in _WORDS.findall(text)]
    if _has_loop(words, config.repetition_ngram, config.repetition_min_repeats) or _repeated_tags(
            text, config.repetition_min_repeats):
        return "repetition"
    if finish_reason == "length":
        return "truncated"
    return None
