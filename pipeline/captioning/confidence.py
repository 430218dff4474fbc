"""A confidence per caption, from the log-probabilities the model gave the tokens it sampled.

Two figures of the sampled tokens' log-probabilities `lp` (natural log, the model's raw distribution:
vLLM reports them before temperature and top-p, so the sampling settings do not move them):

    mean      the mean of `lp`: how expected the text was as a whole
    window    the lowest mean of `WINDOW` consecutive tokens (the whole text when shorter): the worst
              stretch, where a caption derails into tokens the model itself found unlikely

    confidence = exp((mean + window) / 2)

a number in 0..1: the geometric mean of the per-token probability over the whole text and over its
worst stretch. A caption the model found fluent throughout scores near 1; one that derails anywhere
scores low even when the rest is fluent (the window), and a caption that is unlikely everywhere scores
low through both.

What it cannot tell: a fluent hallucination (a confident, wrong caption) scores high, and so does a
repetition loop (once a loop starts, every repeat is very likely); loops are what the glitch detector
(quality.py) catches. The score ranks captions for review; it is not a verdict on its own.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

WINDOW = 8
FLOOR = -30.0  # a sampled token's log-probability is clamped here (-inf from a masked token counts as this)


@dataclass(frozen=True)
class Confidence:
    mean: float  # mean token log-probability
    window: float  # lowest mean over WINDOW consecutive tokens
    score: float  # exp((mean + window) / 2), in 0..1


def _clean(values: Iterable[float]) -> list[float]:
    cleaned = []
    for value in values:
        value = float(value)
        cleaned.append(FLOOR if math.isnan(value) else min(0.0, max(FLOOR, value)))
    return cleaned


def lowest_window_mean(logprobs: Sequence[float], window: int = WINDOW) -> float:
    """The lowest mean of `window` consecutive values (the mean of all of them when there are fewer)."""
    size = min(window, len(logprobs))
    total = sum(logprobs[:size])
    lowest = total
    for i in range(size, len(logprobs)):
        total += logprobs[i] - logprobs[i - size]
        lowest = min(lowest, total)
    return lowest / size


def confidence(logprobs: Iterable[float], window: int = WINDOW) -> Confidence | None:
    """The confidence of a text from its sampled tokens' log-probabilities; None when there are none."""
    values = _clean(logprobs)
    if not values:
        return None
    mean = sum(values) / len(values)
    low = lowest_window_mean(values, window)
    return Confidence(mean, low, math.exp((mean + low) / 2))


def sampled_logprobs(token_ids: Sequence[int], logprobs: Any) -> list[float] | None:
    """The log-probability of each sampled token, from a vLLM completion's `logprobs` (a list of
    {token_id: Logprob} per position, or vLLM's FlatLogprobs); None when the engine returned none."""
    if logprobs is None:
        return None
    values = []
    for token, position in zip(token_ids, logprobs, strict=False):
        entry = position.get(token) if position else None
        if entry is None:  # the sampled token is always reported; be lenient with odd engines
            return None
        values.append(float(getattr(entry, "logprob", entry)))
    return values


def score_of(token_ids: Sequence[int], logprobs: Any) -> float | None:
    """The 0..1 confidence of a completion, or None without log-probabilities or tokens."""
    values = sampled_logprobs(token_ids, logprobs)
    result = confidence(values) if values is not None else None
    return None if result is None else result.score
