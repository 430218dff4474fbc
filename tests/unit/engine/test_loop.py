"""The engine loop's bookkeeping: ordering, overlap between batches, failures, shutdown.

The real engine runs under it in the integration tests; here a scripted stand-in with vLLM's
`LLMEngine` surface (`add_request`, `step`, `has_unfinished_requests`) makes the orderings and the
faults that a real engine cannot be made to produce on cue.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from vllm.sampling_params import RequestOutputKind, SamplingParams

from pipeline.engine.loop import EngineLoop, EngineLoopStoppedError
from tests.unit.engine.scripted_engine import ScriptedEngine
from tests.unit.waiting import FakeClock, wait_until


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
    engine = ScriptedEngine(pause_at_step=5)
    loop = EngineLoop(engine)
    results: dict[str, list[str]] = {}

    def batch(name: str, prompts: list[str]) -> None:
        results[name] = [o.prompt for o in loop.generate(prompts, params(len(prompts)))]

    first = threading.Thread(target=batch, args=("first", ["steps:40"] * 4))
    first.start()
    wait_until(engine.paused.is_set, what="the first batch to be under way (engine paused at step 5 of 40)")
    second = threading.Thread(target=batch, args=("second", ["steps:2"] * 3))
    second.start()
    wait_until(lambda: loop.in_flight() == 7, what="the second batch to be queued behind the first")
    engine.resume.set()
    for thread in (first, second):
        thread.join(30)
        assert not thread.is_alive(), f"{thread.name} never finished"
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
    wait_until(lambda: engine.steps > 0, what="the request to be in the engine")
    assert loop.in_flight() == 1
    loop.shutdown()
    with pytest.raises(EngineLoopStoppedError):
        futures[0].result(5)
    with pytest.raises(EngineLoopStoppedError):
        loop.generate(["steps:1"], params(1))


def test_a_built_engine_is_built_and_stepped_on_the_loop_thread():
    threads: dict[str, threading.Thread] = {}

    class Recording(ScriptedEngine):
        def step(self):  # type: ignore[no-untyped-def]
            threads["step"] = threading.current_thread()
            return super().step()

    def build() -> ScriptedEngine:
        threads["build"] = threading.current_thread()
        return Recording()

    loop = EngineLoop(build=build)
    assert loop.generate(["steps:2"], params(1))[0].prompt == "steps:2"
    assert threads["build"] is threads["step"] is not threading.current_thread()
    loop.shutdown()


def test_a_failed_build_raises_in_the_caller_and_leaves_no_loop_running():
    def build() -> ScriptedEngine:
        raise OSError("no such model")

    before = threading.active_count()
    with pytest.raises(OSError, match="no such model"):
        EngineLoop(build=build)
    wait_until(lambda: threading.active_count() <= before, what="the loop thread to end")
    assert threading.active_count() == before
    with pytest.raises(ValueError, match="an engine or a build function"):
        EngineLoop()


def test_idle_time_counts_only_the_time_without_any_request():
    clock = FakeClock()

    class Timed(ScriptedEngine):
        def step(self):  # type: ignore[no-untyped-def]
            clock.advance(0.002)  # each step takes 2 ms
            return super().step()

    loop = EngineLoop(Timed(), clock=clock)
    wait_until(lambda: clock.reads >= 1, what="the loop to start idling")
    clock.advance(0.2)  # nothing to do
    loop.generate(["steps:50"], params(1))  # 0.1 s of steps, none of it idle
    assert loop.idle_s == pytest.approx(0.2)
    loop.shutdown()


OPENMP_POOLS = """
import os, sys, threading
import torch
sys.path.insert(0, os.getcwd())
from pipeline.engine.loop import EngineLoop
from tests.unit.engine.scripted_engine import ScriptedEngine
from vllm.sampling_params import SamplingParams

torch.set_num_threads(4)
big = torch.randn(512, 512)

class Computing(ScriptedEngine):
    def step(self):
        big @ big  # a parallel region on whatever thread steps the engine
        return super().step()

def build():
    big @ big  # the engine's start-up computes too (weights, memory profiling, warm-up)
    return Computing()

before = len(os.listdir("/proc/self/task"))
loop = EngineLoop(engine=build()) if sys.argv[1] == "caller" else EngineLoop(build=build)
loop.generate(["steps:3"], [SamplingParams(max_tokens=1)])
print(len(os.listdir("/proc/self/task")) - before)
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_an_engine_built_on_its_loop_thread_leaves_one_openmp_pool():
    """OpenMP keeps a pool of workers per thread that ran a parallel region; more pooled threads than
    cores makes every waiting worker sleep at once instead of spinning (see pipeline.engine.loop)."""
    def new_threads(where: str) -> int:
        done = subprocess.run([sys.executable, "-c", OPENMP_POOLS, where], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).resolve().parents[3])
        return int(done.stdout.split()[-1])

    built_by_caller, built_on_loop = new_threads("caller"), new_threads("loop")
    assert built_on_loop == built_by_caller - 3  # the caller's pool of 3 workers never comes to be
