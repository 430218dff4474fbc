"""Adaptive concurrency (AIMD) for a remote inference server.

A remote server says it is full in two ways: it refuses (429 Too Many Requests, 503 Service Unavailable)
or it answers more slowly. The limit on requests in flight grows by one for every `limit` successes (so
about one per round of requests), and halves when the server refuses or when a response's latency rises
past `latency_factor` times the best latency seen (the queue is growing on the server, not its batch).
It never leaves [1, maximum]. Thread-free: the caller (one asyncio loop) calls `acquire`-like checks via
`has_room` and reports each outcome.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class AdaptiveLimit:
    maximum: int
    start: int = 4
    latency_factor: float = 4.0
    cool_down_s: float = 1.0  # one decrease per this long: a burst of refusals is one signal, not many
    clock: Callable[[], float] = time.monotonic
    limit: float = field(init=False)
    in_flight: int = field(init=False, default=0)
    best_latency_s: float | None = field(init=False, default=None)
    decreases: int = field(init=False, default=0)
    _last_decrease: float = field(init=False, default=-float("inf"))

    def __post_init__(self) -> None:
        self.maximum = max(1, self.maximum)
        self.limit = float(min(self.maximum, max(1, self.start)))

    @property
    def current(self) -> int:
        return max(1, int(self.limit))

    def has_room(self) -> bool:
        return self.in_flight < self.current

    def started(self) -> None:
        self.in_flight += 1

    def finished(self) -> None:
        self.in_flight = max(0, self.in_flight - 1)

    def success(self, latency_s: float, tokens: int = 1) -> None:
        """A response came back: grow additively, unless its latency (per generated token when given)
        says the server is queueing."""
        per_token = latency_s / max(1, tokens)
        if self.best_latency_s is None or per_token < self.best_latency_s:
            self.best_latency_s = per_token
        if per_token > self.latency_factor * self.best_latency_s and self.limit > 1:
            self._decrease()
            return
        self.limit = min(float(self.maximum), self.limit + 1.0 / self.current)

    def overloaded(self) -> None:
        """The server refused for load (429/503) or failed (5xx, connection): halve."""
        self._decrease()

    def _decrease(self) -> None:
        now = self.clock()
        if now - self._last_decrease < self.cool_down_s:
            return
        self._last_decrease = now
        self.decreases += 1
        self.limit = max(1.0, self.limit / 2)
