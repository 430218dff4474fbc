"""What `pipeline plan` counts: the tallies of what was read, and the GPU-time estimate.

The estimate starts from one measured figure: 16.8 images/s per H100 (raw vLLM 0.26.0 `generate`, JoyCaption
Beta One 8B in bf16, prefix caching, dual caption of Booru-like tags capped at 128 tokens and a
Straightforward description capped at 256, output forced to the caps; ../shared/gpu/README.md). At that
rate the GPU writes 6,451 output tokens/s, so the workload is decode-bound: an image costs about its output
tokens. A config's rate is therefore the reference's scaled by the output-token budget of an image, the sum
of its modes' `max_tokens` (384 for the reference): one 128-token mode is 3x faster, four 256-token modes
2.7x slower. What this leaves out is said beside the figure: captions that end before their cap (faster,
unless `defaults.fixed_length`), glitch retries (slower, up to `quality.max_attempts` x), the prefill
and image encoding that a much smaller budget would no longer hide, and engine start (about a minute).
`--rate` replaces all of it with the user's own measured figure for the config.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.captioning.modes import stage_groups
from pipeline.config import RunConfig
from pipeline.engine.dedup import digest
from pipeline.table.records import known_fields, reason_kind  # reasons: as run summaries and `status` count them

DEFAULT_SAMPLE = 1000  # images read and prepared unless --sample says otherwise
REFERENCE_RATE = 16.8  # images/s per H100, the dual caption below (../shared/gpu/README.md)
REFERENCE_BUDGET = 128 + 256  # output tokens an image of the reference workload is capped at
REFERENCE = ("16.8 images/s per H100, raw vLLM 0.26 `generate`, JoyCaption 8B bf16, dual caption "
             "(128 + 256 tokens, forced to the caps)")
EXAMPLES_PER_REASON = 3
MAX_REASONS = 40  # kinds of error kept apart; more (never seen) are counted as `other`
BUCKETS_PER_OCTAVE = 4  # size histograms: a quantile within about 9 % of the true value


# ---------------------------------------------------------------------------------------------- tallies
def _bucket(value: int) -> int:
    return -1 if value <= 0 else math.floor(BUCKETS_PER_OCTAVE * math.log2(value))


@dataclass
class Spread:
    """Count, mean, min and max of sizes, with a log-bucketed histogram for quantiles in bounded memory."""

    count: int = 0
    total: int = 0
    low: int | None = None
    high: int | None = None
    buckets: Counter[int] = field(default_factory=Counter)

    def add(self, value: int) -> None:
        self.count, self.total = self.count + 1, self.total + value
        self.low = value if self.low is None else min(self.low, value)
        self.high = value if self.high is None else max(self.high, value)
        self.buckets[_bucket(value)] += 1

    def merge(self, other: Spread) -> None:
        if not other.count:
            return
        self.count, self.total = self.count + other.count, self.total + other.total
        self.low = other.low if self.low is None else min(self.low, other.low or 0)
        self.high = other.high if self.high is None else max(self.high, other.high or 0)
        self.buckets.update(other.buckets)

    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    def quantile(self, q: float) -> int | None:
        """The nearest-rank q-quantile, as the middle of its bucket (clipped to the values seen)."""
        if not self.count or self.low is None or self.high is None:
            return None
        rank, seen = max(1, math.ceil(q * self.count)), 0
        for bucket in sorted(self.buckets):
            seen += self.buckets[bucket]
            if seen >= rank:
                middle = 0 if bucket < 0 else round(2 ** ((bucket + 0.5) / BUCKETS_PER_OCTAVE))
                return min(max(middle, self.low), self.high)
        return self.high

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "min": self.low, "p50": self.quantile(0.5), "p90": self.quantile(0.9),
                "max": self.high, "mean": round(self.mean(), 1) if self.count else None}


@dataclass
class Tally:
    """What reading found: rows, broken ones by kind of reason (with the first few examples of each),
    decoded formats, file sizes and pixel counts. Tallies of parts merge into the whole."""

    rows: int = 0
    broken: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    formats: Counter[str] = field(default_factory=Counter)
    file_bytes: Spread = field(default_factory=Spread)
    pixels: Spread = field(default_factory=Spread)
    duplicates: int = 0  # readable images whose content (pipeline.io.content) an earlier one of the tally had
    contents: set[bytes] = field(default_factory=set, repr=False)  # 16-byte digests of the contents seen

    def add_content(self, content_hash: str | None) -> None:
        """Count a readable image's content: a duplicate when seen before (a run captions it once)."""
        if content_hash is None:
            return
        key = digest(content_hash)
        if key in self.contents:
            self.duplicates += 1
        else:
            self.contents.add(key)

    def add(self, key: str, source: str, error: str | None, fmt: str | None = None, width: int | None = None,
            height: int | None = None, size: int | None = None) -> None:
        self.rows += 1
        if size is not None:
            self.file_bytes.add(size)
        if width and height:
            self.pixels.add(width * height)
        if error is None:
            self.formats[fmt or "unknown"] += 1
            return
        self.broken += 1
        kind = reason_kind(error)
        if kind not in self.reasons and len(self.reasons) >= MAX_REASONS:
            kind = "other"
        self.reasons[kind] += 1
        examples = self.examples.setdefault(kind, [])
        if len(examples) < EXAMPLES_PER_REASON:
            examples.append({"key": key, "source": source, "error": error})

    def merge(self, other: Tally) -> None:
        self.rows, self.broken = self.rows + other.rows, self.broken + other.broken
        for kind, count in other.reasons.items():
            kind = kind if kind in self.reasons or len(self.reasons) < MAX_REASONS else "other"
            self.reasons[kind] += count
            examples = self.examples.setdefault(kind, [])
            examples.extend(other.examples.get(kind, [])[:EXAMPLES_PER_REASON - len(examples)])
        self.formats.update(other.formats)
        self.file_bytes.merge(other.file_bytes)
        self.pixels.merge(other.pixels)
        self.duplicates += other.duplicates + len(other.contents & self.contents)
        self.contents |= other.contents

    def to_dict(self) -> dict[str, Any]:
        return {"images": self.rows, "broken": self.broken, "reasons": dict(self.reasons.most_common()),
                "examples": {kind: self.examples[kind] for kind, _count in self.reasons.most_common()},
                "formats": dict(self.formats.most_common()), "file_bytes": self.file_bytes.to_dict(),
                "pixels": self.pixels.to_dict()}


def share_interval(hits: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (95 % for z 1.96) of a share seen as `hits` of `trials` sampled: honest
    at 0 hits and in small samples, where `hits / trials` alone would claim too much."""
    if trials <= 0:
        return 0.0, 1.0
    share, spread = hits / trials, z * z / trials
    centre = (share + spread / 2) / (1 + spread)
    half = z * math.sqrt(share * (1 - share) / trials + spread / (4 * trials)) / (1 + spread)
    return max(0.0, centre - half), min(1.0, centre + half)


# --------------------------------------------------------------------------------------------- estimate
@dataclass(frozen=True)
class Estimate:
    """GPU time for `images` at `rate` images/s per GPU, and the assumptions behind the rate."""

    images: int
    modes: int
    captions: int
    output_tokens_per_image: int
    rate: float
    rate_from: str  # "reference" (scaled from REFERENCE_RATE) or "--rate"
    gpus: int
    gpu_hours: float
    wall_hours: float
    assumes: list[str]
    stages: int = 1  # chained modes (captioning/modes.py): an image's modes run in this many steps
    engine: str = "vllm"  # engine.kind: with `openai` the GPUs are the server fleet's

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> Estimate:
        return cls(**known_fields(cls, value))


def output_budget(config: RunConfig) -> list[int]:
    """Each mode's output-token cap, run defaults filled in; modes sent to a named engine (`modes[].engine`)
    are left out: their tokens are another server's work."""

    return [mode.max_tokens for mode in config.resolved_modes() if mode.engine is None]


def config_assumptions(config: RunConfig) -> list[str]:
    """What the config adds to the estimate's assumptions: chained modes and a remote engine."""
    modes = config.resolved_modes()
    notes = []
    chained = [mode for mode in modes if mode.requires]
    if chained:
        caps = {mode.name: mode.max_tokens for mode in modes}
        carried = sum(caps[name] for mode in chained for name in mode.requires)
        text_only = [mode.name for mode in chained if not mode.image]
        notes.append(
            f"chained modes: {len(chained)} of {len(modes)} run after the modes they require "
            f"({len(stage_groups(modes))} stages an image); their output tokens are counted like any "
            f"mode's, the up to {carried} tokens of earlier captions their prompts carry are prefill (not counted)"
            + (f"; text-only ({', '.join(text_only)}): no image to encode" if text_only else ""))
    elsewhere = [f"{mode.name} on {mode.engine} ({config.engines[mode.engine].base_url})"
                 for mode in modes if mode.engine is not None]
    if elsewhere:
        notes.append(f"not counted: modes sent to a named engine, on its own servers: {', '.join(elsewhere)}")
    if config.engine.kind == "openai":
        notes.append(f"engine.kind openai: the GPUs are those of the server(s) at {config.engine.base_url} (give "
                     "--gpus for their count); the caption actors need none. Requests add PNG encoding and HTTP: "
                     "measure the fleet and pass --rate for a firmer figure")
    return notes


def assumed_gpus(config: RunConfig) -> int:
    """The GPUs the config asks for: compute.actors x GPUs per actor when actors are set (a range: its most),
    else 1. With a remote engine (engine.kind openai) the actors hold no GPU: 1 unless --gpus says."""
    if config.engine.kind == "openai":
        return 1
    bounds = config.compute.actor_bounds()
    if bounds is None:  # unset or `auto`: as many as the cluster has, unknown here
        return 1
    actors = bounds[1] or bounds[0]
    per_actor = config.compute.gpus_per_actor or config.model.tensor_parallel_size
    return max(1, math.ceil(actors * per_actor))


def scaled_rate(caps: list[int]) -> float:
    """The reference rate at this budget of output tokens an image (decode-bound: time ~ tokens)."""
    return REFERENCE_RATE * REFERENCE_BUDGET / max(1, sum(caps))


def estimate(images: int, caps: list[int], rate: float | None, gpus: int, fixed_length: bool = False,
             max_attempts: int = 1, notes: list[str] | None = None, stages: int = 1,
             engine: str = "vllm") -> Estimate:
    """GPU-hours and wall time for captioning `images` with modes capped at `caps` output tokens; `notes`:
    the config's own assumptions (config_assumptions)."""
    budget, given = sum(caps), rate is not None
    if rate is not None:
        assumes = [f"{rate:g} images/s per GPU as given (--rate), for this config as it is"]
    else:
        rate = scaled_rate(caps)
        assumes = [f"the reference: {REFERENCE}",
                   f"scaled by output tokens an image (decode-bound): {len(caps)} mode{'s' if len(caps) != 1 else ''}"
                   f" capped at {budget} tokens here, {REFERENCE_BUDGET} there: {REFERENCE_RATE:g} x "
                   f"{REFERENCE_BUDGET} / {budget} = {rate:.3g} images/s per GPU"]
        if not fixed_length:
            assumes.append("captions ending before their cap are faster (the reference forced every cap)")
        if budget < REFERENCE_BUDGET / 3:
            assumes.append("so small a budget no longer hides prefill and image encoding: likely optimistic")
    if max_attempts > 1:
        assumes.append(f"not counted: glitch retries (up to {max_attempts} attempts a caption), engine start "
                       "(about a minute an engine)")
    else:
        assumes.append("not counted: engine start (about a minute an engine)")
    assumes.extend(notes or [])
    gpu_hours = images / rate / 3600
    return Estimate(images, len(caps), images * len(caps), budget, round(rate, 3),
                    "--rate" if given else "reference", gpus,
                    round(gpu_hours, 6), round(gpu_hours / gpus, 6), assumes, stages, engine)
