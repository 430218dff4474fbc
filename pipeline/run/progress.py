"""Progress while a run is live: images captioned, committed shards, errors and glitches, rates and ETA.

The driver updates it as images come back from the caption actors (a batch at a time) and as shards
commit; the console (console.py) draws it, and the log gets a line every `interval` seconds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pipeline.table.records import Marker

log = logging.getLogger("pipeline.run.progress")


@dataclass
class Progress:
    total_shards: int
    done_shards: int
    images_known: int
    mode_names: list[str]
    interval: float = 30.0
    started: float = field(default_factory=time.monotonic)
    captions: int = 0
    tokens: int = 0
    shards_now: int = 0
    captioned: int = 0  # images back from the caption actors this run, committed or not
    committed_images: int = 0
    errors: int = 0  # error rows of the shards committed this run
    glitched: int = 0  # captions that still glitched after their retries, committed this run
    first_image_at: float | None = None
    _last_log: float = 0.0
    clock: Callable[[], float] = time.monotonic  # tests drive a fake one

    @property
    def images_to_do(self) -> int:
        """Images this run is expected to caption: all planned ones, less those of shards done before
        (estimated from the shard count when earlier runs committed some)."""
        if not self.total_shards:
            return 0
        return round(self.images_known * (self.total_shards - self.done_shards) / self.total_shards)

    def images_arrived(self, count: int) -> None:
        if count and self.first_image_at is None:
            self.first_image_at = self.clock()
        self.captioned += count

    def shard_done(self, marker: Marker) -> None:
        self.shards_now += 1
        self.committed_images += marker.rows
        self.errors += marker.errors
        for mode in marker.modes.values():
            self.captions += mode.captions
            self.tokens += mode.tokens
            self.glitched += mode.glitched
        self.maybe_log(force=self.done_shards + self.shards_now == self.total_shards)

    def image_rate(self) -> float:
        """Images/s since the first one came back (engine start-up is not captioning time)."""
        if self.first_image_at is None:
            return 0.0
        return self.captioned / max(self.clock() - self.first_image_at, 1e-6)

    def eta_s(self) -> float | None:
        rate, left = self.image_rate(), max(0, self.images_to_do - self.captioned)
        return left / rate if rate > 0 and self.captioned >= 1 else None

    def glitch_rate(self) -> float | None:
        return self.glitched / self.captions if self.captions else None

    def line(self) -> str:
        """One line for people: what is done, how fast, what is left, what went wrong."""
        total = self.images_to_do
        done = f"images {self.captioned:,}/{total:,}" if total else f"images {self.captioned:,}"
        if self.first_image_at is None:
            return f"{done} | starting: waiting for the first captions (engines load first)"
        eta = self.eta_s()
        parts = [done, f"{self.image_rate():.2f}/s", f"ETA {format_duration(eta) if eta is not None else '?'}",
                 f"shards {self.done_shards + self.shards_now}/{self.total_shards}", f"errors {self.errors:,}"]
        glitch = self.glitch_rate()
        if glitch is not None:
            parts.append(f"glitches {glitch:.1%}")
        return " | ".join(parts)

    def maybe_log(self, force: bool = False) -> None:
        now = self.clock()
        if force or now - self._last_log >= self.interval:
            self._last_log = now
            log.info(self.line())


def format_duration(seconds: float) -> str:
    """3 s, 4 min 05 s, 2 h 07 min: as precise as a person needs."""
    whole = max(0, round(seconds))
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    return f"{whole // 3600} h {whole % 3600 // 60:02d} min"
