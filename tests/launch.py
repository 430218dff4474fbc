"""The pipeline's CLI with test hooks: `python tests/launch.py [--engine-fault SPEC] [--pause MOMENT:SECONDS]
[--engine-delay SPEC] ARGS`.

ARGS are the usual `pipeline` arguments (`run CONFIG ...`). The hooks are built from pipeline/testing/faults.py
and handed to `pipeline.cli.main.main`; the `pipeline` command itself has no way to take them.

  --engine-fault SPEC     KIND@STEP[:ONCE_FILE],...: an actor's engine raises (`raise`) or hangs (`hang`) at
                          its step STEP; with ONCE_FILE only the first actor that creates the file gets it
  --pause MOMENT:SECONDS  hold each commit that reaches MOMENT (after_part_file, after_marker) for SECONDS
  --engine-delay SPEC     start:SECONDS,first_step:SECONDS: each actor's engine starts that much later and its
                          first step waits that long (with --engine-fault too, the fault applies after)
  --hold-text-stage SPEC  AFTER:SECONDS:FLAG_FILE: an actor's engine, at its text-only request AFTER + 1 (a
                          chained mode's later stage), writes FLAG_FILE and holds SECONDS
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

from pipeline.cli.main import main
from pipeline.run.hooks import RunHooks
from pipeline.testing.faults import EngineDelay, EngineFaults, HoldTextStage, PauseAt

T = TypeVar("T")


def _flag_value(parse: Callable[[str], T]) -> Callable[[str], T]:
    """`parse` for argparse: its ValueError's own message becomes the usage error (argparse would drop it)."""

    def parse_flag(text: str) -> T:
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return parse_flag


def split_hooks(argv: Sequence[str]) -> tuple[RunHooks, list[str]]:
    """The hooks the launcher's flags ask for, and the arguments left for the pipeline's CLI."""
    # Exact flag names only: an abbreviation must not swallow one of the pipeline's own options.
    parser = argparse.ArgumentParser(prog="tests/launch.py", allow_abbrev=False, add_help=False)
    parser.add_argument("--engine-fault", type=_flag_value(EngineFaults))
    parser.add_argument("--pause", type=_flag_value(PauseAt.parse))
    parser.add_argument("--engine-delay", type=_flag_value(EngineDelay.parse))
    parser.add_argument("--hold-text-stage", type=_flag_value(HoldTextStage.parse))
    flags, rest = parser.parse_known_args(argv)
    engine = flags.engine_fault
    if flags.engine_delay is not None:
        engine = dataclasses.replace(flags.engine_delay, then=flags.engine_fault)
    if flags.hold_text_stage is not None:
        engine = dataclasses.replace(flags.hold_text_stage, then=engine)
    return RunHooks(engine=engine, pause=flags.pause), rest


if __name__ == "__main__":
    hooks, rest = split_hooks(sys.argv[1:])
    sys.exit(main(rest, hooks=hooks))
