"""The engine loop's bookkeeping: ordering, overlap between batches, failures, shutdown.

The real engine runs under it in the integration tests; here a scripted stand-in with vLLM's
`LLMEngine` surface (`add_request`, `step`, `has_unfinished_requests`) makes the orderings and the
faults that a real engine cannot be made to produce on cue.
"""

from __future__ import annotations

import threading
import time

import pytest
from vllm.sampling_params import RequestOutputKind, SamplingParams

from pipeline.engine_loop import EngineLoop, EngineLoopStoppedError
from tests.unit.scripted_engine import ScriptedEngine


def params(count: int) -> list[SamplingParams]:
    return [SamplingParams(max_tokens=4) for _ in range(count)]


def test_outputs_come_back_in_request_order_though_they_finish_out_of_order():
    engine = ScriptedEngine()
    loop = EngineLoop(engine)
    prompts = ["steps:5", "steps:1", "steps:3"]
    assert [o.prompt for o in loop.generate(prompts, params(3))] == prompts
    assert engine.kinds == [RequestOutputKind.FINAL_ONLY] * 3
    loop.shutdown()


def test_a_second_batch_joins_the_engine_while_the_first_is_still_running():
    engine = ScriptedEngine()
    loop = EngineLoop(engine)
    results: dict[str, list[str]] = {}

    def batch(name: str, prompts: list[str]) -> None:
        results[name] = [o.prompt for o in loop.generate(prompts, params(len(prompts)))]

    first = threading.Thread(target=batch, args=("first", ["steps:40"] * 4))
    first.start()
    while engine.steps < 5:  # the first batch is under way
        time.sleep(0.001)
    batch("second", ["steps:2"] * 3)
    first.join()
    assert results == {"first": ["steps:40"] * 4, "second": ["steps:2"] * 3}
    assert engine.most_unfinished == 7  # both batches were in the engine together
    loop.shutdown()


def test_a_refused_request_fails_alone():
    loop = EngineLoop(ScriptedEngine())
    futures = loop.submit(["steps:2", "refuse", "steps:1"], params(3))
    assert futures[0].result(5).prompt == "steps:2" and futures[2].result(5).prompt == "steps:1"
    with pytest.raises(ValueError, match="too long"):
        futures[1].result(5)
    loop.shutdown()


def test_an_engine_failure_reaches_every_waiter_and_every_later_call():
    loop = EngineLoop(ScriptedEngine(fail_at_step=3))
    with pytest.raises(RuntimeError, match="EngineCore died"):
        loop.generate(["steps:10", "steps:10"], params(2))
    with pytest.raises(RuntimeError, match="EngineCore died"):
        loop.generate(["steps:1"], params(1))


def test_shutdown_releases_waiters_and_refuses_new_work():
    engine = ScriptedEngine()
    loop = EngineLoop(engine)
    futures = loop.submit(["steps:100000"], params(1))
    while engine.steps == 0:  # the request is in the engine
        time.sleep(0.001)
    assert loop.in_flight() == 1
    loop.shutdown()
    with pytest.raises(EngineLoopStoppedError):
        futures[0].result(5)
    with pytest.raises(EngineLoopStoppedError):
        loop.generate(["steps:1"], params(1))
