"""Faults on cue, for the tests of self-healing actors and of crashes: a real engine cannot be made to hang or
die at a chosen step, nor a real commit to stop between its part file and its marker.

Both are hooks of the run's seam (pipeline/run/hooks.py), given to `execute` or `main(argv, hooks=...)`
(tests/launch.py builds them from its flags); nothing here reads the environment.

- `EngineFaults("KIND@STEP[:ONCE_FILE],...")` makes an engine's step number STEP raise (KIND `raise`) or
  never return (KIND `hang`). With ONCE_FILE, only the first actor that creates that file gets the fault,
  so the replacement actor runs clean, as after a real one-off failure. Several faults, comma-separated,
  go to successive actors: each actor takes the first whose ONCE_FILE it can still create.
- `PauseAt(MOMENT, SECONDS)` holds a commit at a named moment, long enough for a test to kill the run there.
- `EngineDelay(start_s, first_step_s)` makes an engine slow to start and slow to return its first batch, as a
  large model on a GPU is: the console's engine-start lines and heartbeats can be seen on the tiny model.
- `HoldTextStage(after, seconds, flag_file)` holds the engine when a text-only request (a chained mode's later
  stage) arrives after `after` of them: it writes `flag_file` and waits, so a test can kill a run between the
  stages of a chain.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

from pipeline.run.hooks import MOMENTS

log = logging.getLogger("pipeline.testing.faults")
KINDS = ("raise", "hang")


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


@dataclass(frozen=True)
class Fault:
    """One fault of a spec: KIND at step STEP, for the first actor that creates `once_file` (every actor without)."""

    kind: str
    step: int
    once_file: str = ""

    @classmethod
    def parse(cls, text: str) -> Fault:
        """`KIND@STEP[:ONCE_FILE]`; ValueError when it is not."""
        head, _, once_file = text.strip().partition(":")
        kind, _, step = head.partition("@")
        if kind not in KINDS or not step.isdigit() or int(step) < 1:
            raise ValueError(f"engine fault {text.strip()!r}: expected raise@STEP or hang@STEP (STEP from 1), "
                             "optionally :ONCE_FILE")
        return cls(kind, int(step), once_file)

    def claim(self) -> bool:
        """Whether this actor gets the fault: always without a once-file, else if it is the first to create it."""
        if not self.once_file:
            return True
        try:
            os.close(os.open(self.once_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return False  # an earlier actor had this fault; this one may be its replacement
        return True


class EngineFaults:
    """An EngineHook: `wrap` gives the engine of each new actor the next fault of `spec` it can claim.

    `spec` is `KIND@STEP[:ONCE_FILE]`, comma-separated for successive actors; it is checked here, so a bad one
    fails the test at once rather than inside an actor."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.faults = tuple(Fault.parse(part) for part in spec.split(",") if part.strip())
        if not self.faults:
            raise ValueError(f"engine fault spec {spec!r} holds no fault: expected KIND@STEP[:ONCE_FILE],...")

    def __repr__(self) -> str:
        return f"EngineFaults({self.spec!r})"

    def wrap(self, engine: Any) -> Any:
        """The engine with the first fault this actor claims, or the engine itself when none is left."""
        for fault in self.faults:
            if fault.claim():
                return FaultyEngine(engine, fault.kind, fault.step)
        return engine


class SlowFirstStep:
    """The engine, except that its first step waits `seconds` first (its first batch stays in the engine)."""

    def __init__(self, engine: Any, seconds: float) -> None:
        self._engine, self._seconds, self._stepped = engine, seconds, False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def step(self) -> Any:
        if not self._stepped:
            self._stepped = True
            log.warning("test delay: the engine's first step waits %.1f s", self._seconds)
            time.sleep(self._seconds)
        return self._engine.step()


@dataclass(frozen=True)
class EngineDelay:
    """An EngineHook that makes an engine slow, as a GPU engine loading a large model is: `start_s` more
    seconds before the engine counts as built (the actor reports itself ready that much later), `first_step_s`
    more before its first step returns. `then` is a further hook (EngineFaults) applied after the delays."""

    start_s: float = 0.0
    first_step_s: float = 0.0
    then: Any = None  # an EngineHook

    @classmethod
    def parse(cls, text: str) -> EngineDelay:
        """`start:SECONDS`, `first_step:SECONDS`, or both comma-separated (tests/launch.py's --engine-delay)."""
        values: dict[str, float] = {}
        for part in text.split(","):
            name, _, seconds = part.strip().partition(":")
            try:
                value = float(seconds)
            except ValueError:
                value = -1.0
            if name not in ("start", "first_step") or not value >= 0:
                raise ValueError(f"engine delay {text!r}: expected start:SECONDS and/or first_step:SECONDS")
            values[f"{name}_s"] = value
        return cls(**values)

    def wrap(self, engine: Any) -> Any:
        if self.start_s:
            log.warning("test delay: the engine's start takes %.1f s more", self.start_s)
            time.sleep(self.start_s)
        engine = self.then.wrap(engine) if self.then is not None else engine
        return SlowFirstStep(engine, self.first_step_s) if self.first_step_s else engine


@dataclass(frozen=True)
class PauseAt:
    """A run's pause hook: hold for `seconds` each time a commit reaches `moment` (one of run.hooks.MOMENTS)."""

    moment: str
    seconds: float

    def __post_init__(self) -> None:
        if self.moment not in MOMENTS:
            raise ValueError(f"pause moment {self.moment!r}: expected one of {', '.join(MOMENTS)}")
        if not self.seconds >= 0:
            raise ValueError(f"pause at {self.moment}: seconds must be 0 or more, not {self.seconds}")

    @classmethod
    def parse(cls, text: str) -> PauseAt:
        """`MOMENT:SECONDS`, as tests/launch.py's --pause takes it."""
        moment, _, seconds = text.partition(":")
        try:
            return cls(moment, float(seconds))
        except ValueError as err:
            raise ValueError(f"pause {text!r}: expected MOMENT:SECONDS ({err})") from None

    def __call__(self, moment: str) -> None:
        if moment == self.moment:
            log.warning("test pause: holding at %s for %.1f s", moment, self.seconds)
            time.sleep(self.seconds)


def _has_image(prompt: Any) -> bool:
    """Whether an engine request carries an image: a raw prompt dict (`multi_modal_data`) or vLLM 0.32's
    rendered input (`type: multimodal`)."""
    if isinstance(prompt, dict):
        return "multi_modal_data" in prompt or prompt.get("type") == "multimodal"
    return hasattr(prompt, "mm_kwargs")


class HeldTextStage:
    """The engine, except that its text-only request number `after + 1` writes `flag_file` and holds."""

    def __init__(self, engine: Any, after: int, seconds: float, flag_file: str) -> None:
        self._engine, self._after, self._seconds, self._flag = engine, after, seconds, flag_file
        self._seen = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def add_request(self, request_id: str, prompt: Any, params: Any, *args: Any, **kwargs: Any) -> Any:
        if not _has_image(prompt):
            self._seen += 1
            if self._seen == self._after + 1:
                log.warning("test hold: text-only request %d arrived; holding the engine %.1f s", self._seen,
                            self._seconds)
                with open(self._flag, "w") as flag:
                    flag.write(str(os.getpid()))
                time.sleep(self._seconds)
        return self._engine.add_request(request_id, prompt, params, *args, **kwargs)


@dataclass(frozen=True)
class HoldTextStage:
    """An EngineHook: each actor's engine holds `seconds` at its text-only request number `after + 1`, after
    writing `flag_file` (tests/launch.py's --hold-text-stage AFTER:SECONDS:FLAG_FILE). `then`: a further hook."""

    after: int
    seconds: float
    flag_file: str
    then: Any = None

    @classmethod
    def parse(cls, text: str) -> HoldTextStage:
        after, _, rest = text.partition(":")
        seconds, _, flag_file = rest.partition(":")
        try:
            hold = cls(int(after), float(seconds), flag_file)
        except ValueError:
            hold = None
        if hold is None or hold.after < 0 or not hold.seconds >= 0 or not flag_file:
            raise ValueError(f"text-stage hold {text!r}: expected AFTER:SECONDS:FLAG_FILE")
        return hold

    def wrap(self, engine: Any) -> Any:
        engine = self.then.wrap(engine) if self.then is not None else engine
        return HeldTextStage(engine, self.after, self.seconds, self.flag_file)
