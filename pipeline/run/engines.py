"""The driver's view of its engines: reads what the caption actors report of themselves (engine/states.py)
every `every_s` seconds while a pass runs, and hands each reading to the run's Progress, which the console
draws. It also logs the progress line at its interval, so the run's log shows the engines loading too (the
driver's own loop only wakes when a batch comes back).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence

from pipeline.engine.states import EngineState, clear_states, current_job_id, read_states
from pipeline.run.progress import EngineSnapshot, Progress

log = logging.getLogger("pipeline.run.engines")


class EngineWatch:
    """`with EngineWatch(progress, expected=actors):` (or `start()` / `stop()`) around one pass; `expected` is
    the pool's size (an elastic pool's fewest). Until an actor has reported, the progress gets no reading (a
    stand-in captioner never reports: the console then only says that it waits for captions)."""

    def __init__(self, progress: Progress, expected: int, every_s: float = 1.0, job_id: str | None = None,
                 read: Callable[[str], Sequence[EngineState]] = read_states,
                 clear: Callable[[str], None] = clear_states, clock: Callable[[], float] = time.time) -> None:
        self.progress, self.expected, self.every_s = progress, expected, every_s
        self._job_id, self._read, self._clear, self._clock = job_id, read, clear, clock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-watch", daemon=True)
        self._since = clock()

    def start(self) -> EngineWatch:
        self._job_id = self._job_id or current_job_id()
        if self._job_id is None:
            return self
        self._clear(self._job_id)  # an earlier pass's actors are gone
        self._since = self._clock()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def __enter__(self) -> EngineWatch:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def poll(self) -> None:
        """Read the engines once and hand the reading to the progress; once one has reported, those that have
        not yet count as loading since the pass began."""
        if self._job_id is None:
            return
        states = self._read(self._job_id)
        self.progress.engines_seen(EngineSnapshot.of(states, self.expected, self._since, self._clock())
                                   if states else None)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):  # a display must never end a run
                self.poll()
                self.progress.maybe_log()
            self._stop.wait(self.every_s)
