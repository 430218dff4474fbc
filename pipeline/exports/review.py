"""The worst captions first: committed rows ranked by confidence and glitch, for a person to review.

Every committed caption (one per row and mode) is an entry; flagged captions (a glitch) come first, then
the rest by ascending confidence (`<mode>_confidence`, captioning/confidence.py); captions without a
confidence (outputs written before the column existed, or runs with `quality.confidence: false`) come
last. With `error_kind`, error rows of that kind (`table.records.reason_kind`, `any` for all) are listed
too, before everything else. Part files are read through the markers a few columns and one record batch at
a time, and only the `worst` best-ranked entries are kept (a bounded heap), so memory does not grow with the
output.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from pipeline.exports.table import Output, check_modes, shard_batches
from pipeline.table.records import reason_kind

EXCERPT = 120


@dataclass(frozen=True)
class Entry:
    key: str
    shard: str
    mode: str | None  # None for an error row
    confidence: float | None
    glitch: str | None
    caption: str | None  # an excerpt
    error: str | None = None

    def rank(self) -> tuple[int, float]:
        """Sort key: error rows, then flagged captions, then the rest; each by ascending confidence."""
        group = 0 if self.mode is None else 1 if self.glitch else 2
        unknown = self.confidence is None or math.isnan(self.confidence)
        return group, math.inf if unknown else float(self.confidence)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Criteria:
    modes: list[str] | None = None
    flag: str | None = None  # only captions with this glitch (`any`: with any glitch)
    error_kind: str | None = None  # also error rows of this kind (`any`: all)
    below: float | None = None  # only captions with a confidence below this (or flagged ones, with flag)


def _excerpt(text: str | None) -> str | None:
    if text is None:
        return None
    flat = " ".join(text.split())
    return flat if len(flat) <= EXCERPT else flat[:EXCERPT - 1] + "…"


def _batches(output: Output, shard: str, wanted: list[str]) -> Iterator[Any]:
    """The shard's record batches with those of `wanted` its part file has (older ones lack confidence)."""
    batches = shard_batches(output, shard, wanted)
    try:
        first = next(batches, None)  # a column the file lacks fails here, before any row is out
    except (KeyError, ValueError, IndexError):
        first = None
    else:
        if first is not None:
            yield first
            yield from batches
        return
    first = next(shard_batches(output, shard, None, batch_rows=1), None)
    present = set(first.schema.names) if first is not None else set()
    yield from shard_batches(output, shard, [name for name in wanted if name in present])


def entries(output: Output, criteria: Criteria) -> Iterator[Entry]:
    """Every entry `criteria` admits, in the table's order (shard, then key)."""
    modes = check_modes(output, criteria.modes)
    wanted = ["key", "status", "error", *(f"{mode}{suffix}" for mode in modes
                                          for suffix in ("", "_confidence", "_glitch"))]
    for shard in output.shards:
        for batch in _batches(output, shard, wanted):
            for row in batch.to_pylist():
                if row.get("status") == "error":
                    kind = reason_kind(row.get("error"))
                    if criteria.error_kind is not None and criteria.error_kind in ("any", kind):
                        yield Entry(row["key"], shard, None, None, None, None, row.get("error"))
                    continue
                for mode in modes:
                    caption = row.get(mode)
                    if caption is None:
                        continue
                    entry = Entry(row["key"], shard, mode, row.get(f"{mode}_confidence"), row.get(f"{mode}_glitch"),
                                  _excerpt(caption))
                    if _admitted(entry, criteria):
                        yield entry


def _admitted(entry: Entry, criteria: Criteria) -> bool:
    if criteria.flag is not None and not (entry.glitch and criteria.flag in ("any", entry.glitch)):
        return False
    if criteria.error_kind is not None and criteria.flag is None and criteria.below is None:
        return False  # asked for error rows only
    if criteria.below is not None:
        return entry.confidence is not None and entry.confidence < criteria.below
    return True


def worst(output: Output, criteria: Criteria, count: int) -> list[Entry]:
    """The `count` worst entries, worst first (ties in table order); a heap of `count` entries at most."""
    numbered = zip(itertools.count(), entries(output, criteria), strict=False)
    return [entry for _, entry in heapq.nsmallest(count, numbered, key=lambda pair: (*pair[1].rank(), pair[0]))]


def format_entries(found: list[Entry]) -> str:
    lines = [f"{'confidence':>10}  {'glitch':<10}  {'mode':<12}  key / caption"]
    for entry in found:
        confidence = "-" if entry.confidence is None else f"{entry.confidence:.3f}"
        if entry.mode is None:
            lines.append(f"{'-':>10}  {'error':<10}  {'-':<12}  {entry.key}: {entry.error}")
            continue
        lines.append(f"{confidence:>10}  {entry.glitch or '-':<10}  {entry.mode:<12}  {entry.key}: {entry.caption}")
    return "\n".join(lines)
