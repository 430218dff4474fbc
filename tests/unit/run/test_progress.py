"""Progress lines: images done/total, rate, ETA, errors and glitches from arrivals and commits."""

from __future__ import annotations

import io

import pytest

from pipeline.cli.console import Console, ProgressDisplay
from pipeline.run.progress import Progress, format_duration
from pipeline.table.records import Marker
from tests.unit.waiting import FakeClock, wait_until


def marker(rows: int, errors: int = 0, glitched: int = 0) -> Marker:
    return Marker.of("000001", {"rows": rows, "ok": rows - errors, "errors": errors,
                                "modes": {"tags": {"captions": rows - errors, "tokens": 250, "glitched": glitched}}})


def test_the_line_says_images_rate_eta_shards_errors_and_glitches():
    clock = FakeClock()
    progress = Progress(total_shards=4, done_shards=0, images_known=40, mode_names=["tags"], interval=3600,
                        clock=clock)
    assert progress.line().startswith("images 0/40 | starting")
    progress.images_arrived(10)
    clock.advance(5)  # 10 images in 5 s: 2/s, 30 left: 15 s
    progress.shard_done(marker(10, errors=1, glitched=2))
    line = progress.line()
    assert line.startswith("images 10/40 | 2.00/s") and "ETA 15 s" in line
    assert "shards 1/4" in line and "errors 1" in line and "glitches 22.2%" in line


def test_a_resumed_run_counts_only_what_is_left():
    progress = Progress(total_shards=10, done_shards=6, images_known=1000, mode_names=["tags"])
    assert progress.images_to_do == 400 and progress.line().startswith("images 0/400")


@pytest.mark.parametrize(("seconds", "text"), [(3.2, "3 s"), (245, "4 min 05 s"), (7620, "2 h 07 min")])
def test_durations_read_like_a_person_would_say_them(seconds: float, text: str):
    assert format_duration(seconds) == text


def test_without_a_terminal_the_display_prints_plain_lines_and_the_first_captions_at_once():
    console = Console(None, line_every_s=3600)
    console.err = io.StringIO()
    progress = Progress(total_shards=2, done_shards=0, images_known=8, mode_names=["tags"])
    with ProgressDisplay(console, progress):
        wait_until(lambda: "starting" in console.err.getvalue(), what="the starting line")
        progress.images_arrived(4)
        # The first captions are shown without waiting for the interval (an hour).
        wait_until(lambda: "images 4/8" in console.err.getvalue(), what="the line with the first captions")
    lines = console.err.getvalue().splitlines()
    assert len(lines) == 2 and "starting" in lines[0] and lines[1].startswith("images 4/8")
    assert "\r" not in console.err.getvalue()
