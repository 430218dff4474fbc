"""The seam through which a caller changes the engine a caption actor runs (the healing tests make it fail on cue).

Production code only calls the hook it is given; what a hook does lives with its caller (pipeline/testing/faults.py).
"""

from __future__ import annotations

from typing import Any, Protocol


class EngineHook(Protocol):
    """Wraps the engine a caption actor has just built.

    `wrap` is called in the actor's process, on the engine loop's thread, right after the engine is built; what
    it returns is the engine the loop steps. The hook travels to the actor with Ray Data's constructor
    arguments, so it must be picklable (a module-level class, not a closure)."""

    def wrap(self, engine: Any) -> Any: ...
