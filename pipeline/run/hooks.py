"""Hooks into a run, for the tests that need a moment a real run cannot be made to hit: an engine that fails
at a chosen step, a commit held between its part file and its marker, or between its marker and the removal
of the part file it replaced (so a crash test can kill it there).

A run takes them as an argument (`execute(..., hooks=...)`); nothing reads them from the environment. Every
hook travels to other processes (the caption actors, commit tasks), so each must be picklable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pipeline.engine.hooks import EngineHook

AFTER_PART_FILE = "after_part_file"  # a commit has written its (new) part file, not yet its marker
AFTER_MARKER = "after_marker"  # a commit has written its marker, not yet removed the part file it replaced
MOMENTS = (AFTER_PART_FILE, AFTER_MARKER)  # the named moments a run passes to `RunHooks.at`


@dataclass(frozen=True)
class RunHooks:
    """`engine` wraps each caption actor's engine; `pause` is called with each named moment a commit reaches."""

    engine: EngineHook | None = None
    pause: Callable[[str], None] | None = None

    def at(self, moment: str) -> None:
        """A commit reached `moment` (one of MOMENTS); nothing happens unless a pause is set."""
        if self.pause is not None:
            self.pause(moment)


NO_HOOKS = RunHooks()
