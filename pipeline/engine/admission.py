"""Continuous admission: an engine keeps a target number of requests in flight, and a glitch is retried
the moment it is seen.

A caption batch used to submit its first attempts, wait for all of them, then submit the glitch
retries as a second wave. A glitching request usually runs to `max_tokens`, so that wave was a full
decode pass holding a handful of sequences, paid on nearly every batch. Here each finished request
is judged as it arrives, and a retry goes straight back to the engine while the rest of the batch
is still decoding.

The gate counts the requests one engine holds (all the batches the actor works on share it). A batch
admits its images whole, every mode of an image at once, so the image's prefix is cached between
modes; it waits while the engine already holds its target. Retries skip the wait: they belong to an
image already admitted, and holding them back would hold its batch back.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from typing import Any, Protocol

POLL_S = 0.02  # how often a batch waiting for room looks again (room is freed by other batches' requests)


class EngineStalledError(RuntimeError):
    """The engine's step has not returned for longer than the watchdog allows while requests wait."""


class EngineFailedError(RuntimeError):
    """The engine loop died: every request on it is lost, and the engine cannot take more."""


class Loop(Protocol):  # what admission needs of pipeline.engine.loop.EngineLoop
    def submit(self, prompts: Sequence[Any], params: Sequence[Any]) -> list[Future[Any]]: ...

    def stalled_for(self) -> float: ...

    @property
    def failure(self) -> BaseException | None: ...


class AdmissionGate:
    """Requests in flight on one engine, against a target; shared by the batches of one actor."""

    def __init__(self, target: int) -> None:
        self.target = max(1, target)
        self._in_flight = 0
        self._waiting = 0  # requests of batches not yet admitted (metrics: requests waiting)
        self._lock = threading.Lock()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def waiting(self) -> int:
        return self._waiting

    def queue(self, count: int) -> None:
        """`count` requests arrived that will ask for room (a batch's images x modes)."""
        with self._lock:
            self._waiting += count

    def unqueue(self, count: int) -> None:
        """Requests that will not ask for room after all (their batch ended early)."""
        with self._lock:
            self._waiting = max(0, self._waiting - count)

    def try_admit(self, count: int) -> bool:
        """Take room for `count` requests if the engine is under its target (an empty engine always admits,
        so an image with more modes than the target still runs)."""
        with self._lock:
            if self._in_flight and self._in_flight + count > self.target:
                return False
            self._in_flight += count
            self._waiting = max(0, self._waiting - count)
            return True

    def force(self, count: int) -> None:
        with self._lock:
            self._in_flight += count

    def release(self, count: int = 1) -> None:
        with self._lock:
            self._in_flight = max(0, self._in_flight - count)


@dataclass(frozen=True)
class Job:
    """One (image, mode) of a batch and which attempt it is on."""

    image: int
    mode: int
    attempt: int = 0


# What a finished request means: (result to keep, retry it?). The judge sees the engine output, or the
# exception of a request the engine refused alone.
Judge = Callable[[Job, Any, BaseException | None], tuple[Any, bool]]
MakeRequest = Callable[[Job], tuple[Any, Any]]


@dataclass
class AdmissionStats:
    retries_submitted: int = 0
    waited_for_room_s: float = 0.0


def run_batch(loop: Loop, gate: AdmissionGate, images: int, modes: int, make_request: MakeRequest, judge: Judge,
              stall_timeout_s: float, stats: AdmissionStats | None = None) -> list[list[Any]]:
    """Every (image, mode) of a batch through the engine; result[i][m] is the judge's last result for it.

    Raises EngineFailedError when the loop dies, EngineStalledError when an engine step outlives
    `stall_timeout_s`; requests of this batch still on the engine then are the caller's to abandon
    (the actor exits and Ray redoes the batch on a fresh engine).
    """
    stats = stats or AdmissionStats()
    results: list[list[Any]] = [[None] * modes for _ in range(images)]
    pending: dict[Future[Any], Job] = {}
    next_image = 0
    gate.queue(images * modes)

    def submit(jobs: list[Job]) -> None:
        prompts, params = zip(*(make_request(job) for job in jobs), strict=True)
        for future, job in zip(loop.submit(prompts, params), jobs, strict=True):
            pending[future] = job

    try:
        while next_image < images or pending:
            while next_image < images and gate.try_admit(modes):
                submit([Job(next_image, m) for m in range(modes)])
                next_image += 1
            # Still images to admit: look again soon, room is freed by other batches too.
            timeout = POLL_S if next_image < images else min(5.0, stall_timeout_s / 4)
            waited = time.monotonic()
            done = _wait_for_any(pending, timeout)
            if next_image < images and not done:
                stats.waited_for_room_s += time.monotonic() - waited
            _check_engine(loop, stall_timeout_s)
            retries = []
            for future in done:
                job = pending.pop(future)
                gate.release()
                error = future.exception()
                if error is not None and loop.failure is not None:
                    raise EngineFailedError(f"vLLM engine loop failed: {type(loop.failure).__name__}: "
                                            f"{loop.failure}") from loop.failure
                results[job.image][job.mode], again = judge(job, None if error else future.result(), error)
                if again:
                    retries.append(Job(job.image, job.mode, job.attempt + 1))
            if retries:  # straight back to the engine, while the rest of the batch still decodes
                gate.force(len(retries))
                stats.retries_submitted += len(retries)
                submit(retries)
    finally:
        gate.release(len(pending))  # abandoned with the engine; the gate must not leak room
        gate.unqueue((images - next_image) * modes)
    return results


def _wait_for_any(pending: dict[Future[Any], Job], timeout: float) -> set[Future[Any]]:
    if not pending:
        time.sleep(timeout)
        return set()
    done, _ = wait(list(pending), timeout=timeout, return_when=FIRST_COMPLETED)
    return done


def _check_engine(loop: Loop, stall_timeout_s: float) -> None:
    if loop.failure is not None:
        raise EngineFailedError(f"vLLM engine loop failed: {type(loop.failure).__name__}: {loop.failure}") \
            from loop.failure
    stalled = loop.stalled_for()
    if stalled > stall_timeout_s:
        raise EngineStalledError(f"vLLM engine made no progress for {stalled:.0f} s (an engine step has not "
                                 f"returned; compute.engine_stall_timeout_s is {stall_timeout_s:g})")
