"""Engine faults on cue, for the tests of self-healing actors: a real engine cannot be made to hang or die
at a chosen step.

PIPELINE_ENGINE_FAULT=KIND@STEP[:ONCE_FILE] makes the engine's step number STEP raise (KIND `raise`) or
never return (KIND `hang`). With ONCE_FILE, only the first actor that creates that file gets the fault,
so the replacement actor runs clean, as after a real one-off failure. Several faults, comma-separated,
go to successive actors: each actor takes the first whose ONCE_FILE it can still create. Unset,
nothing is wrapped.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

log = logging.getLogger("pipeline.testing.faults")
ENV = "PIPELINE_ENGINE_FAULT"


class InjectedEngineFaultError(RuntimeError):
    """The engine failure a test asked for."""


class FaultyEngine:
    """The engine, except that one step raises or hangs."""

    def __init__(self, engine: Any, kind: str, at_step: int) -> None:
        self._engine, self._kind, self._at_step, self._steps = engine, kind, at_step, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def step(self) -> Any:
        self._steps += 1
        if self._steps == self._at_step:
            log.warning("injecting engine fault %r at step %d", self._kind, self._steps)
            if self._kind == "hang":
                threading.Event().wait()  # forever: only the watchdog ends this
            raise InjectedEngineFaultError(f"injected engine fault at step {self._steps}")
        return self._engine.step()


def with_faults(engine: Any) -> Any:
    """The engine wrapped as PIPELINE_ENGINE_FAULT asks, or the engine itself."""
    setting = os.environ.get(ENV, "")
    for fault in filter(None, (part.strip() for part in setting.split(","))):
        spec, _, once_file = fault.partition(":")
        kind, _, step = spec.partition("@")
        if kind not in ("raise", "hang") or not step.isdigit():
            raise ValueError(f"{ENV}={setting!r}: expected raise@STEP or hang@STEP, optionally :ONCE_FILE, "
                             "comma-separated")
        if once_file:
            try:
                os.close(os.open(once_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                continue  # an earlier actor had this fault; this one may be its replacement
        return FaultyEngine(engine, kind, int(step))
    return engine
