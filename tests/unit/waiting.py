"""Synchronising tests without guessing how long things take.

`wait_until` polls a condition until it holds, and fails naming what it waited for once a generous deadline
passes: a slow machine only makes a test slower, never wrong. `FakeClock` stands in for `time.monotonic` or
`time.time` where production code takes a clock, so a test says how much time passes instead of sleeping it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(condition: Callable[[], T], timeout: float = 10.0, what: str = "the condition",
               interval: float = 0.005) -> T:
    """Poll `condition` until it returns something truthy, and return that; AssertionError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


class FakeClock:
    """A clock that moves only when told to (`advance`); counts its reads, so a test can tell when the code
    under test has looked at it."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self.reads = 0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            self.reads += 1
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds
