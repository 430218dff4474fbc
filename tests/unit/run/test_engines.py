"""The driver's watch over its engines' reports: readings handed to the progress while a pass runs."""

from __future__ import annotations

from pipeline.engine.states import READY, STARTING, EngineState
from pipeline.run.engines import EngineWatch
from pipeline.run.progress import Progress
from tests.unit.waiting import wait_until


def test_the_watch_hands_each_reading_to_the_progress_and_clears_the_last_pass():
    reported: list[EngineState] = []
    cleared: list[str] = []
    progress = Progress(total_shards=1, done_shards=0, images_known=4, mode_names=["tags"])
    watch = EngineWatch(progress, expected=2, every_s=0.01, job_id="03000000", read=lambda job: list(reported),
                        clear=cleared.append, clock=lambda: 1000.0)
    with watch:
        assert cleared == ["03000000"]  # entries of an earlier pass's actors are gone
        wait_until(lambda: progress.engines_at is not None, what="a first reading")
        assert progress.engines is None  # nothing reported yet: no engine counts to show
        reported.append(EngineState("a", READY, since=990.0, started=960.0))
        reported.append(EngineState("b", STARTING, since=980.0, started=980.0))
        wait_until(lambda: progress.engines is not None, what="a reading with the engines")
    engines = progress.engines
    assert engines is not None and (engines.total, engines.ready, engines.starting) == (2, 1, 1)
    assert engines.slowest_start_s == 20.0 and engines.load_s == 30.0
    assert "engines starting: 1 of 2 ready" in progress.line()


def test_without_ray_the_watch_does_nothing(monkeypatch):
    monkeypatch.setattr("pipeline.run.engines.current_job_id", lambda: None)  # another test may have started Ray
    progress = Progress(total_shards=1, done_shards=0, images_known=4, mode_names=["tags"])
    with EngineWatch(progress, expected=1, read=lambda job: [], clear=lambda job: None) as watch:
        watch.poll()
    assert progress.engines is None and progress.engines_at is None
