"""Progress while a run is live: what the engines are doing, images captioned, committed shards, errors and
glitches, a smoothed rate and the ETA.

The driver updates it as images come back from the caption actors (a batch at a time), as shards commit,
and, every second or two, with what the engines last reported of themselves (run/engines.py: starting,
ready, holding a batch or idle). The console (cli/console.py) draws `line()`; the log gets a line every
`interval` seconds.

Before the first captions the line says what the run waits for: engines starting (how many of how many are
ready, and how long the slowest has been loading), then the first batch (not yet delivered by reads and
decoding, in the engines for how long, or captioned and being written). Once captions flow it is the
progress line; when none has come for `QUIET_S` it also says why (engines busy with a batch for how long,
engines idle and waiting on reads, engines restarting).

The rate (and so the ETA) counts only from the first caption batch back: the images of that batch took the
engines' start to produce, and a batch is a burst, not a rate. It is shown once `RATE_MIN_S` have passed
since that batch and another batch has followed; until then the line says the rate is being measured. It
is then the images of the batches that arrived within the last `RATE_WINDOW_S`, divided by the time they
took: from the arrival just before them to the latest one. When the wait for the next batch grows longer
than the usual gap between batches, the time past that gap counts too, so a stall lowers the rate instead
of freezing it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pipeline.engine.states import FAILED, READY, STARTING, EngineState
from pipeline.table.records import Marker

log = logging.getLogger("pipeline.run.progress")

RATE_WINDOW_S = 60.0  # the rate is over the batches of the last minute...
RATE_MIN_S = 10.0  # ...and none is shown until this long after the first batch came back
QUIET_S = 10.0  # no captions for this long: the line says why


@dataclass(frozen=True)
class EngineSnapshot:
    """The caption actors' engines at one reading (run/engines.py), as counts and ages in seconds."""

    total: int  # the pool's size, or as many as reported if more
    ready: int
    starting: int  # loading, including actors that have not reported yet
    failed: int  # failed and being replaced by Ray
    slowest_start_s: float | None = None  # the engine loading longest: seconds since its load began
    load_s: float | None = None  # the ready engines: the longest any took to load
    busy: int = 0  # ready engines holding a batch
    oldest_batch_s: float | None = None  # the oldest batch in any engine: seconds since it went in
    idle_s: float | None = None  # no ready engine holds a batch: seconds since the last one handed one back
    handed_back_s: float | None = None  # seconds since an engine last handed a batch back, if any did

    @classmethod
    def of(cls, states: Sequence[EngineState], expected: int, waiting_since: float, now: float) -> EngineSnapshot:
        """From the reported `states` at wall time `now`; `expected` actors in the pool, those that have not
        reported yet loading since `waiting_since` (when the pass began)."""
        ready = [s for s in states if s.state == READY]
        starting = [s for s in states if s.state == STARTING]
        failed = sum(1 for s in states if s.state == FAILED)
        total = max(expected, len(states))
        unreported = max(0, total - len(states))
        starts = [s.started for s in starting] + ([waiting_since] * (unreported > 0))
        busy = [s for s in ready if s.batches > 0 and s.batch_since is not None]
        handed_back = [s.done_at for s in states if s.done_at is not None]
        return cls(total=total, ready=len(ready), starting=len(starting) + unreported, failed=failed,
                   slowest_start_s=max(0.0, now - min(starts)) if starts else None,
                   load_s=max(s.since - s.started for s in ready) if ready else None,
                   busy=len(busy),
                   oldest_batch_s=max(0.0, now - min(s.batch_since for s in busy)) if busy else None,  # type: ignore[type-var]
                   idle_s=max(0.0, now - max(s.updated or s.since for s in ready)) if ready and not busy else None,
                   handed_back_s=max(0.0, now - max(handed_back)) if handed_back else None)

    def key(self) -> tuple[bool, bool, bool]:
        """What a plain console announces at once when it changes: none ready, all ready, some failed."""
        return self.ready == 0, self.ready >= self.total, self.failed > 0

    def starting_text(self, now_offset: float = 0.0) -> str:
        text = f"{self.ready} of {self.total} ready"
        if self.slowest_start_s is not None and self.ready < self.total:
            text += f", slowest loading for {format_duration(self.slowest_start_s + now_offset)}"
        if self.failed:
            text += f", {self.failed} failed and restarting"
        return text


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
    first_image_at: float | None = None  # when the first caption batch came back: captions flow from here
    last_image_at: float | None = None
    engines: EngineSnapshot | None = None  # the latest reading of the engines' states, if any
    engines_at: float | None = None  # when it was read (this clock)
    _last_log: float = 0.0
    clock: Callable[[], float] = time.monotonic  # tests drive a fake one
    # (time, images captioned by then) at each arrival: the first one, then those of the rate's window
    _marks: deque[tuple[float, int]] = field(default_factory=deque, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def images_to_do(self) -> int:
        """Images this run is expected to caption: all planned ones, less those of shards done before
        (estimated from the shard count when earlier runs committed some)."""
        if not self.total_shards:
            return 0
        return round(self.images_known * (self.total_shards - self.done_shards) / self.total_shards)

    def images_arrived(self, count: int) -> None:
        if not count:
            return
        now = self.clock()
        with self._lock:
            if self.first_image_at is None:
                self.first_image_at = now
            self.captioned += count
            self.last_image_at = now
            self._marks.append((now, self.captioned))

    def engines_seen(self, snapshot: EngineSnapshot | None) -> None:
        """The engines' latest reported states (run/engines.py); None when none could be read."""
        self.engines, self.engines_at = snapshot, self.clock()

    def shard_done(self, marker: Marker) -> None:
        self.shards_now += 1
        self.committed_images += marker.rows
        self.errors += marker.errors
        for mode in marker.modes.values():
            self.captions += mode.captions
            self.tokens += mode.tokens
            self.glitched += mode.glitched
        self.maybe_log(force=self.done_shards + self.shards_now == self.total_shards)

    def image_rate(self) -> float | None:
        """Images/s, smoothed (see the module's docstring); None while it is still being measured."""
        now = self.clock()
        with self._lock:
            if self.first_image_at is None or now - self.first_image_at < RATE_MIN_S or len(self._marks) < 2:
                return None
            while len(self._marks) > 2 and self._marks[1][0] <= now - RATE_WINDOW_S:
                self._marks.popleft()  # the newest mark at or before the window's start stays as its anchor
            (anchor, base), (last, count) = self._marks[0], self._marks[-1]
            gaps = len(self._marks) - 1
        usual_gap = (last - anchor) / gaps
        span = max(last - anchor, now - anchor - usual_gap)
        return (count - base) / span if span > 0 else None

    def eta_s(self) -> float | None:
        rate, left = self.image_rate(), max(0, self.images_to_do - self.captioned)
        if left == 0 and self.captioned:
            return 0.0
        return left / rate if rate else None

    def glitch_rate(self) -> float | None:
        return self.glitched / self.captions if self.captions else None

    def phase_key(self) -> tuple[object, ...]:
        """Changes when the run moves on (engines ready, captions flowing, an engine failing): a plain
        console prints a line at once then, and otherwise one every interval."""
        engines = self.engines.key() if self.engines is not None else None
        return ("captioning" if self.first_image_at is not None else "waiting", engines)

    def line(self) -> str:
        """One line for people: what is done, how fast, what is left, what went wrong, and what it waits for."""
        total = self.images_to_do
        done = f"images {self.captioned:,}/{total:,}" if total else f"images {self.captioned:,}"
        now = self.clock()
        if self.first_image_at is None:
            return f"{done} | {self._before_captions(now)}"
        rate, eta = self.image_rate(), self.eta_s()
        parts = [done]
        if rate is None:
            parts.append("measuring the rate")
        else:
            parts += [f"{rate:.2f}/s", f"ETA {format_duration(eta) if eta is not None else '?'}"]
        parts += [f"shards {self.done_shards + self.shards_now}/{self.total_shards}", f"errors {self.errors:,}"]
        glitch = self.glitch_rate()
        if glitch is not None:
            parts.append(f"glitches {glitch:.1%}")
        note = self._while_captioning(now)
        if note:
            parts.append(note)
        return " | ".join(parts)

    def _age(self, now: float) -> float:
        """Seconds since the engines' reading: its ages are that much older now."""
        return max(0.0, now - self.engines_at) if self.engines_at is not None else 0.0

    def _before_captions(self, now: float) -> str:
        engines, age = self.engines, self._age(now)
        if engines is None:
            return f"starting: waiting for the first captions ({format_duration(now - self.started)})"
        if engines.ready == 0:
            return f"engines starting: {engines.starting_text(age)}"
        if engines.ready < engines.total:
            head = f"engines starting: {engines.starting_text(age)}"
        else:
            loaded = f", loaded in {format_duration(engines.load_s)}" if engines.load_s is not None else ""
            head = f"engines ready ({engines.ready} of {engines.total}{loaded})"
        if engines.handed_back_s is not None:  # captioned: now in the write stage, on its way to the driver
            return f"{head}; first batch captioned {format_duration(engines.handed_back_s + age)} ago, being written"
        if engines.oldest_batch_s is not None:
            return f"{head}; first batch in the engines for {format_duration(engines.oldest_batch_s + age)}"
        idle = f" ({format_duration(engines.idle_s + age)})" if engines.idle_s is not None else ""
        return f"{head}; waiting for the first batch from reads and decoding{idle}"

    def _while_captioning(self, now: float) -> str:
        """Why no captions came for a while (or which engines are missing), else ''."""
        engines, age = self.engines, self._age(now)
        quiet = now - (self.last_image_at or now)
        missing = engines is not None and engines.ready < engines.total
        if quiet < QUIET_S:
            return f"engines {engines.starting_text(age)}" if engines is not None and missing else ""
        head = f"last captions {format_duration(quiet)} ago: "
        if self.images_to_do and self.captioned >= self.images_to_do:
            return head + "all images back, committing the last shards"
        if engines is None:
            return head + "waiting for the next batch"
        if engines.ready == 0:
            return head + f"engines starting ({engines.starting_text(age)})"
        also = f" ({engines.starting_text(age)})" if missing else ""
        if engines.oldest_batch_s is not None:
            return head + f"engines busy with a batch for {format_duration(engines.oldest_batch_s + age)}{also}"
        idle = f" for {format_duration(engines.idle_s + age)}" if engines.idle_s is not None else ""
        return head + f"engines idle{idle}, waiting on reads (storage, decoding){also}"

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
