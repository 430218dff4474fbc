"""The progress display: plain lines at once when the run moves on and a heartbeat every interval even when
nothing changed; a live line on a terminal."""

from __future__ import annotations

import io

from pipeline.cli.console import Console, ProgressDisplay
from pipeline.engine.states import READY, STARTING, EngineState
from pipeline.run.progress import EngineSnapshot, Progress
from tests.unit.waiting import FakeClock, wait_until

NOW = 10_000.0


def plain_console(every_s: float) -> Console:
    console = Console(None, line_every_s=every_s)
    console.err = io.StringIO()
    return console


def snapshot(*states: EngineState, expected: int = 1, now: float = NOW) -> EngineSnapshot:
    return EngineSnapshot.of(list(states), expected=expected, waiting_since=NOW - 10, now=now)


def test_without_a_terminal_the_engines_lines_come_first_then_heartbeats_then_the_progress():
    console, clock = plain_console(every_s=30), FakeClock()
    progress = Progress(total_shards=3, done_shards=0, images_known=10, mode_names=["tags"], clock=clock)
    display = ProgressDisplay(console, progress, clock=clock)

    def tick(seconds: float) -> None:  # the display's thread draws once a second
        for _ in range(int(seconds)):
            clock.advance(1)
            display.draw()

    display.draw()  # nothing reported yet
    progress.engines_seen(snapshot(EngineState("a", STARTING, since=NOW - 2, started=NOW - 2)))
    tick(1)  # an engine reported: said at once
    tick(40)  # loading, nothing changes: one heartbeat at 30 s
    progress.engines_seen(snapshot(EngineState("a", READY, since=NOW, started=NOW - 2, updated=NOW)))
    tick(1)  # ready: said at once
    tick(29)
    progress.images_arrived(4)
    tick(1)  # the first captions: at once
    lines = console.err.getvalue().splitlines()
    assert [line.split(" | ")[1].split(":")[0].split(" (")[0] for line in lines] == [
        "starting", "engines starting", "engines starting", "engines ready", "measuring the rate"], lines
    assert lines[1] == "images 0/10 | engines starting: 0 of 1 ready, slowest loading for 3 s"  # read 1 s ago
    assert lines[2] == "images 0/10 | engines starting: 0 of 1 ready, slowest loading for 33 s"  # the heartbeat
    assert lines[3].startswith("images 0/10 | engines ready (1 of 1, loaded in 2 s)")
    assert lines[4].startswith("images 4/10 | measuring the rate")
    assert "\r" not in console.err.getvalue()


def test_a_heartbeat_comes_every_interval_even_when_the_line_is_the_same():
    console, clock = plain_console(every_s=10), FakeClock()
    progress = Progress(total_shards=3, done_shards=0, images_known=10, mode_names=["tags"], clock=clock)
    progress.engines_seen(snapshot(EngineState("a", READY, since=NOW, started=NOW - 2, batches=1, batch_since=NOW)))
    display = ProgressDisplay(console, progress, clock=clock)
    for _ in range(35):
        display.draw()
        clock.advance(1)
    lines = console.err.getvalue().splitlines()
    assert len(lines) == 4 and all("first batch in the engines for" in line for line in lines), lines


def test_on_a_terminal_the_line_is_redrawn_in_place():
    console, clock = plain_console(every_s=30), FakeClock()
    console.live = True
    progress = Progress(total_shards=3, done_shards=0, images_known=10, mode_names=["tags"], clock=clock)
    display = ProgressDisplay(console, progress, clock=clock)
    display.draw()
    progress.images_arrived(4)
    display.draw()
    text = console.err.getvalue()
    assert text.count("\r") == 2 and "\n" not in text and text.rstrip().endswith("measuring the rate | shards 0/3 | "
                                                                                   "errors 0")


def test_the_display_thread_prints_the_first_captions_without_waiting_for_the_interval():
    console = plain_console(every_s=3600)
    progress = Progress(total_shards=2, done_shards=0, images_known=8, mode_names=["tags"])
    with ProgressDisplay(console, progress, poll_s=0.01):
        wait_until(lambda: "starting" in console.err.getvalue(), what="the starting line")
        progress.images_arrived(4)
        # The first captions are shown without waiting for the interval (an hour).
        wait_until(lambda: "images 4/8" in console.err.getvalue(), what="the line with the first captions")
    lines = console.err.getvalue().splitlines()
    assert len(lines) == 2 and "starting" in lines[0] and lines[1].startswith("images 4/8")
