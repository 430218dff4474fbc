"""Progress lines: what the engines are doing before captions flow, images done/total, a smoothed rate and ETA,
errors and glitches, and why nothing moves when nothing does."""

from __future__ import annotations

import dataclasses
import re

import pytest

from pipeline.engine.states import FAILED, READY, STARTING, EngineState
from pipeline.run.progress import QUIET_S, RATE_MIN_S, RATE_WINDOW_S, EngineSnapshot, Progress, format_duration
from pipeline.table.records import Marker
from tests.unit.waiting import FakeClock


def marker(rows: int, errors: int = 0, glitched: int = 0) -> Marker:
    return Marker.of("000001", {"rows": rows, "ok": rows - errors, "errors": errors,
                                "modes": {"tags": {"captions": rows - errors, "tokens": 250, "glitched": glitched}}})


def progress(clock: FakeClock, images: int = 40, shards: int = 4) -> Progress:
    return Progress(total_shards=shards, done_shards=0, images_known=images, mode_names=["tags"], interval=3600,
                    clock=clock)


def rate_of(line: str) -> float | None:
    found = re.search(r"\| ([\d,.]+)/s", line)
    return float(found.group(1).replace(",", "")) if found else None


def test_the_line_says_images_rate_eta_shards_errors_and_glitches():
    clock = FakeClock()
    p = progress(clock)
    assert p.line().startswith("images 0/40 | starting")
    p.images_arrived(10)  # the first batch: captions flow from here, its images are not part of the rate
    clock.advance(RATE_MIN_S)
    p.images_arrived(20)  # 20 images in 10 s: 2/s; 10 left: 5 s
    p.shard_done(marker(10, errors=1, glitched=2))
    line = p.line()
    assert line.startswith("images 30/40 | 2.00/s") and "ETA 5 s" in line
    assert "shards 1/4" in line and "errors 1" in line and "glitches 22.2%" in line


def test_a_burst_at_the_start_is_not_a_rate():
    """256 images in the first 0.1 s are a burst (batches that waited for the engine), not 2,560/s."""
    clock = FakeClock()
    p = progress(clock, images=100_000, shards=391)
    p.images_arrived(128)
    clock.advance(0.05)
    p.images_arrived(128)
    clock.advance(0.05)
    line = p.line()
    assert line.startswith("images 256/100,000 | measuring the rate") and "ETA" not in line, line
    assert p.image_rate() is None and p.eta_s() is None
    # Nor later, once enough time has passed: the burst is spread over the time since the first batch.
    clock.advance(RATE_MIN_S)
    rate = rate_of(p.line())
    assert rate is not None and rate < 20, p.line()


def test_the_rate_settles_on_the_true_rate_and_the_first_one_shown_is_close():
    """Batches of 64 every 0.5 s (128/s), after a first batch that took the engines' start: every rate shown
    is within 10% of 128/s, from the first one on."""
    clock = FakeClock()
    p = progress(clock, images=100_000, shards=391)
    p.images_arrived(64)
    shown = []
    for _ in range(200):
        clock.advance(0.5)
        p.images_arrived(64)
        rate = p.image_rate()
        if rate is not None:
            shown.append(rate)
    assert shown and all(abs(rate - 128) / 128 < 0.1 for rate in shown), shown[:5]
    assert shown[0] == pytest.approx(128, rel=0.1)


def test_a_stall_lowers_the_rate_instead_of_freezing_it():
    clock = FakeClock()
    p = progress(clock, images=100_000, shards=391)
    p.images_arrived(10)
    for _ in range(30):
        clock.advance(1.0)
        p.images_arrived(10)  # 10/s
    assert p.image_rate() == pytest.approx(10)
    clock.advance(0.9)  # within the usual gap: unchanged
    assert p.image_rate() == pytest.approx(10)
    clock.advance(29.1)  # a 30 s wait: the 29 s past the usual 1 s gap count
    assert p.image_rate() == pytest.approx(300 / 59)
    clock.advance(RATE_WINDOW_S)  # every batch older than the window: the last two bound it, the wait counts
    assert p.image_rate() == pytest.approx(10 / (1 + 29 + RATE_WINDOW_S))


def test_the_rate_is_over_the_last_minute():
    clock = FakeClock()
    p = progress(clock, images=100_000, shards=391)
    p.images_arrived(10)
    for _ in range(120):  # 10/s for two minutes...
        clock.advance(1.0)
        p.images_arrived(10)
    for _ in range(60):  # ...then 2/s for one
        clock.advance(1.0)
        p.images_arrived(2)
    assert p.image_rate() == pytest.approx(2, rel=0.1)


def test_a_resumed_run_counts_only_what_is_left():
    p = Progress(total_shards=10, done_shards=6, images_known=1000, mode_names=["tags"])
    assert p.images_to_do == 400 and p.line().startswith("images 0/400")


@pytest.mark.parametrize(("seconds", "text"), [(3.2, "3 s"), (245, "4 min 05 s"), (7620, "2 h 07 min")])
def test_durations_read_like_a_person_would_say_them(seconds: float, text: str):
    assert format_duration(seconds) == text


NOW = 10_000.0  # wall time of the engines' reports in these tests


def engine(actor: str, state: str, started: float, since: float | None = None, batch_since: float | None = None,
           updated: float | None = None) -> EngineState:
    return EngineState(actor=actor, state=state, since=since if since is not None else started, started=started,
                       updated=updated if updated is not None else (since or started),
                       batches=1 if batch_since is not None else 0, batch_since=batch_since)


def test_engines_starting_show_how_many_are_ready_and_the_slowest_ones_time():
    clock = FakeClock()
    p = progress(clock, images=10, shards=3)
    # Two engines of three have reported: one loading for 37 s, one ready after 20 s; the third has not
    # reported yet and counts as loading since the pass began, 50 s ago.
    states = [engine("a", STARTING, NOW - 37), engine("b", READY, NOW - 40, since=NOW - 20)]
    p.engines_seen(EngineSnapshot.of(states, expected=3, waiting_since=NOW - 50, now=NOW))
    assert p.line() == "images 0/10 | engines starting: 1 of 3 ready, slowest loading for 50 s; waiting for the " \
                       "first batch from reads and decoding (20 s)"
    clock.advance(5)  # the display draws every second; the reading is 5 s old by now
    assert "slowest loading for 55 s" in p.line()
    p.engines_seen(EngineSnapshot.of([engine("a", STARTING, NOW - 37)], expected=1, waiting_since=NOW, now=NOW))
    assert p.line() == "images 0/10 | engines starting: 0 of 1 ready, slowest loading for 37 s"


def test_once_the_engines_are_ready_the_line_says_where_the_first_batch_is():
    clock = FakeClock()
    p = progress(clock, images=10, shards=3)
    ready = engine("a", READY, NOW - 45, since=NOW - 8)
    p.engines_seen(EngineSnapshot.of([ready], expected=1, waiting_since=NOW - 50, now=NOW))
    assert p.line() == "images 0/10 | engines ready (1 of 1, loaded in 37 s); waiting for the first batch from " \
                       "reads and decoding (8 s)"
    busy = engine("a", READY, NOW - 45, since=NOW - 8, batch_since=NOW - 6)
    p.engines_seen(EngineSnapshot.of([busy], expected=1, waiting_since=NOW - 50, now=NOW))
    assert p.line().endswith("; first batch in the engines for 6 s")
    # The engine handed it back; the write stage has it, the driver not yet.
    written = dataclasses.replace(busy, batches=1, batch_since=NOW - 1, done=1, done_at=NOW - 3)
    p.engines_seen(EngineSnapshot.of([written], expected=1, waiting_since=NOW - 50, now=NOW))
    assert p.line().endswith("; first batch captioned 3 s ago, being written")


def test_a_failed_engine_shows_as_restarting():
    snapshot = EngineSnapshot.of([engine("a", FAILED, NOW - 60), engine("b", READY, NOW - 60, since=NOW - 30)],
                                 expected=2, waiting_since=NOW - 60, now=NOW)
    assert (snapshot.ready, snapshot.failed, snapshot.starting) == (1, 1, 0)
    assert "1 failed and restarting" in snapshot.starting_text()


def test_when_no_captions_come_the_line_says_why():
    clock = FakeClock()
    p = progress(clock, images=1000, shards=4)
    p.images_arrived(100)
    clock.advance(RATE_MIN_S)
    p.images_arrived(100)
    assert "last captions" not in p.line()
    clock.advance(QUIET_S + 20)  # 30 s without captions
    p.engines_seen(EngineSnapshot.of([engine("a", READY, NOW - 600, since=NOW - 500, batch_since=NOW - 45)],
                                     expected=1, waiting_since=NOW - 600, now=NOW))
    assert p.line().endswith("| last captions 30 s ago: engines busy with a batch for 45 s")
    p.engines_seen(EngineSnapshot.of([engine("a", READY, NOW - 600, since=NOW - 500, updated=NOW - 25)],
                                     expected=1, waiting_since=NOW - 600, now=NOW))
    assert p.line().endswith("| last captions 30 s ago: engines idle for 25 s, waiting on reads (storage, decoding)")
    p.engines_seen(EngineSnapshot.of([engine("a", STARTING, NOW - 12)], expected=1, waiting_since=NOW - 600,
                                     now=NOW))
    assert p.line().endswith("| last captions 30 s ago: engines starting (0 of 1 ready, slowest loading for 12 s)")
    p.engines_seen(None)  # a captioner that reports nothing
    assert p.line().endswith("| last captions 30 s ago: waiting for the next batch")
    p.images_arrived(800)
    clock.advance(QUIET_S + 1)
    assert p.line().endswith("all images back, committing the last shards")


def test_the_phase_key_changes_when_the_run_moves_on():
    clock = FakeClock()
    p = progress(clock)
    keys = [p.phase_key()]
    p.engines_seen(EngineSnapshot.of([engine("a", STARTING, NOW - 1)], expected=2, waiting_since=NOW, now=NOW))
    keys.append(p.phase_key())
    p.engines_seen(EngineSnapshot.of([engine("a", STARTING, NOW - 5)], expected=2, waiting_since=NOW, now=NOW + 4))
    assert p.phase_key() == keys[-1]  # only time passed
    p.engines_seen(EngineSnapshot.of([engine("a", READY, NOW - 5, since=NOW)], expected=2, waiting_since=NOW,
                                     now=NOW + 4))
    keys.append(p.phase_key())
    p.engines_seen(EngineSnapshot.of([engine("a", READY, NOW - 5, since=NOW), engine("b", READY, NOW - 5, since=NOW)],
                                     expected=2, waiting_since=NOW, now=NOW + 4))
    keys.append(p.phase_key())
    p.images_arrived(4)
    keys.append(p.phase_key())
    assert len(set(keys)) == len(keys)
