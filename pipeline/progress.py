"""Progress while a run is live: images/s, captions/s, tokens/s, done/total and ETA in the logs."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from pipeline.records import Marker

log = logging.getLogger("pipeline.progress")


@dataclass
class Progress:
    total_shards: int
    done_shards: int
    images_known: int
    mode_names: list[str]
    interval: float = 10.0
    started: float = field(default_factory=time.monotonic)
    captions: int = 0
    tokens: int = 0
    shards_now: int = 0
    captioned: int = 0  # images back from the caption actors, committed or not
    _last_log: float = 0.0

    def images_arrived(self, count: int) -> None:
        self.captioned += count

    def shard_done(self, marker: Marker) -> None:
        self.shards_now += 1
        for mode in marker.modes.values():
            self.captions += mode.captions
            self.tokens += mode.tokens
        self.maybe_log(force=self.done_shards + self.shards_now == self.total_shards)

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        done = self.done_shards + self.shards_now
        rate = self.shards_now / elapsed
        eta = (self.total_shards - done) / rate if rate > 0 else float("nan")
        eta_text = f"{eta:,.0f}s" if eta == eta else "unknown"
        known = f"/{self.images_known}" if self.images_known else ""
        return (f"shards {done}/{self.total_shards} ({rate:.2f}/s) | images {self.captioned}{known} this run "
                f"({self.captioned / elapsed:.2f}/s) | captions {self.captions / elapsed:.2f}/s | "
                f"tokens {self.tokens / elapsed:.1f}/s | ETA {eta_text}")

    def maybe_log(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_log >= self.interval:
            self._last_log = now
            log.info(self.line())
