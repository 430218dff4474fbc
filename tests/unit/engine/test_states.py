"""What a caption actor reports of its engine: starting, ready, the batches it holds, failed; gone once stopped."""

from __future__ import annotations

from pipeline.engine.states import EXITED, FAILED, READY, STARTING, EngineReporter, EngineState
from tests.unit.waiting import FakeClock


class FakeStore:
    def __init__(self) -> None:
        self.entries: dict[str, bytes] = {}

    def put(self, key: str, value: bytes) -> None:
        self.entries[key] = value

    def delete(self, key: str) -> None:
        self.entries.pop(key, None)

    def state(self, key: str) -> EngineState | None:
        return EngineState.from_json(self.entries[key]) if key in self.entries else None


def reporter(store: FakeStore, clock: FakeClock) -> EngineReporter:
    return EngineReporter(put=store.put, delete=store.delete, key="engines/02000000/actor1", clock=clock)


def test_an_engine_reports_starting_then_ready_with_its_load_time():
    store, clock = FakeStore(), FakeClock(start=5000.0)
    states = reporter(store, clock)
    states.starting()
    assert store.state("engines/02000000/actor1") == EngineState(
        actor="actor1", state=STARTING, since=5000.0, started=5000.0, updated=5000.0, pid=states.current.pid,
        node=states.current.node)
    clock.advance(37)
    states.ready()
    state = store.state("engines/02000000/actor1")
    assert state is not None and state.state == READY and state.since - state.started == 37


def test_the_oldest_batch_in_hand_is_reported_and_cleared():
    store, clock = FakeStore(), FakeClock(start=5000.0)
    states = reporter(store, clock)
    states.ready()
    states.batch_in()
    clock.advance(2)
    states.batch_in()
    state = store.state("engines/02000000/actor1")
    assert state is not None and (state.batches, state.batch_since) == (2, 5000.0)
    clock.advance(3)
    states.batch_out()
    state = store.state("engines/02000000/actor1")
    assert state is not None and (state.batches, state.batch_since, state.updated) == (1, 5002.0, 5005.0)
    assert (state.done, state.done_at) == (1, 5005.0)  # the console: captioned, on its way to the driver
    states.batch_out()
    state = store.state("engines/02000000/actor1")
    assert state is not None and (state.batches, state.batch_since, state.state) == (0, None, READY)


def test_a_stopped_engine_is_removed_but_a_failed_one_stays_failed():
    store, clock = FakeStore(), FakeClock()
    states = reporter(store, clock)
    states.ready()
    states.exited()
    assert store.entries == {} and states.current.state == EXITED
    failing = reporter(store, clock)
    failing.ready()
    failing.failed("EngineDeadError: boom")
    failing.exited()  # die() stops the engine after reporting the failure
    state = store.state("engines/02000000/actor1")
    assert state is not None and state.state == FAILED and state.reason == "EngineDeadError: boom"


def test_outside_a_ray_actor_or_when_the_store_fails_nothing_breaks():
    silent = EngineReporter(key="")
    silent.starting()
    silent.batch_in()
    silent.batch_out()
    silent.exited()

    def refuse(key: str, value: bytes) -> None:
        raise ConnectionError("GCS unreachable")

    EngineReporter(put=refuse, key="engines/x/y").ready()  # logged at debug level, never raised
    assert EngineReporter().current.state == STARTING  # not in a Ray actor: no key, no report


def test_an_entry_from_another_version_is_skipped_not_an_error():
    assert EngineState.from_json(b"not json") is None
    assert EngineState.from_json(b'{"actor": "a", "state": "dreaming", "since": 1, "started": 1}') is None
    state = EngineState.from_json(b'{"actor": "a", "state": "ready", "since": 2, "started": 1, "future": 3}')
    assert state is not None and state.state == READY
