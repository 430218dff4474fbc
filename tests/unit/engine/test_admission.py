"""Continuous admission on a scripted engine: retries go in at once, the gate holds the target, faults end
the batch in the errors the actor turns into a replaced actor."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

import pytest
from vllm.sampling_params import SamplingParams

from pipeline.engine.admission import (
    AdmissionGate,
    AdmissionStats,
    EngineFailedError,
    EngineStalledError,
    Job,
    run_batch,
)
from pipeline.engine.loop import EngineLoop
from tests.unit.engine.scripted_engine import ScriptedEngine
from tests.unit.waiting import FakeClock, wait_until


def make_request(steps: dict[tuple[int, int, int], int]):
    """Requests whose prompt says how many steps they take: steps[(image, mode, attempt)], default 3."""

    def make(job: Job) -> tuple[str, SamplingParams]:
        return f"steps:{steps.get((job.image, job.mode, job.attempt), 3)}:{job.image}:{job.mode}:{job.attempt}", \
            SamplingParams(max_tokens=4)

    return make


def judge_retrying(glitching: set[tuple[int, int, int]]):
    """The (image, mode, attempt) in `glitching` glitch and are retried; results name the attempt that won."""

    def judge(job: Job, output: Any, error: BaseException | None) -> tuple[Any, bool]:
        if error is not None:
            return f"refused: {error}", False
        glitch = (job.image, job.mode, job.attempt) in glitching
        return output.prompt, glitch

    return judge


def test_a_glitch_is_retried_at_once_while_the_rest_of_its_batch_still_decodes():
    engine = ScriptedEngine()
    loop = EngineLoop(engine)
    steps = {(0, 0, 0): 2, (0, 0, 1): 2, (1, 0, 0): 60, (2, 0, 0): 60}
    results = run_batch(loop, AdmissionGate(64), images=3, modes=1, make_request=make_request(steps),
                        judge=judge_retrying({(0, 0, 0)}), stall_timeout_s=30)
    assert results == [["steps:2:0:0:1"], ["steps:60:1:0:0"], ["steps:60:2:0:0"]]
    retry_added = next(step for step, prompt in engine.added if prompt.endswith(":0:0:1"))
    last_first_attempt_done = max(step for step, prompt in engine.finished if prompt.startswith("steps:60"))
    # The old code waited for the whole first wave (step 60) before it sent the retry.
    assert retry_added < 10 < last_first_attempt_done
    loop.shutdown()


def test_the_gate_holds_the_target_and_admits_every_mode_of_an_image_together():
    engine = ScriptedEngine()
    loop = EngineLoop(engine)
    gate = AdmissionGate(4)
    results = run_batch(loop, gate, images=7, modes=2, make_request=make_request({}),
                        judge=judge_retrying(set()), stall_timeout_s=30)
    assert [row[0].split(":")[2:4] for row in results] == [[str(i), "0"] for i in range(7)]
    assert engine.most_unfinished == 4 and gate.in_flight == 0
    by_step: dict[int, list[str]] = {}
    for step, prompt in engine.added:
        by_step.setdefault(step, []).append(prompt.split(":")[2])
    assert all(images.count(image) == 2 for images in by_step.values() for image in images)  # modes together
    loop.shutdown()


def test_batches_on_one_engine_share_its_target_and_retries_may_pass_it():
    engine = ScriptedEngine()
    loop = EngineLoop(engine)
    gate = AdmissionGate(6)
    stats = AdmissionStats()
    out: dict[str, list[list[Any]]] = {}

    def batch(name: str, glitching: set[tuple[int, int, int]]) -> None:
        out[name] = run_batch(loop, gate, images=5, modes=2, make_request=make_request({}),
                              judge=judge_retrying(glitching), stall_timeout_s=30, stats=stats)

    threads = [threading.Thread(target=batch, args=("a", {(0, 1, 0)})),
               threading.Thread(target=batch, args=("b", set()))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(out["a"]) == len(out["b"]) == 5 and out["a"][0][1].endswith(":1")
    assert engine.most_unfinished <= 6 + 1 and gate.in_flight == 0 and stats.retries_submitted == 1
    loop.shutdown()


def test_a_refused_request_is_judged_alone_and_the_batch_goes_on():
    loop = EngineLoop(ScriptedEngine())

    def make(job: Job) -> tuple[str, SamplingParams]:
        return ("refuse" if job.image == 1 else "steps:2"), SamplingParams(max_tokens=4)

    results = run_batch(loop, AdmissionGate(8), 3, 1, make, judge_retrying(set()), stall_timeout_s=30)
    assert results[0] == ["steps:2"] and results[1][0].startswith("refused: prompt too long")
    loop.shutdown()


def test_an_engine_failure_ends_the_batch_and_frees_the_gate():
    gate = AdmissionGate(8)
    loop = EngineLoop(ScriptedEngine(fail_at_step=3))
    with pytest.raises(EngineFailedError, match="EngineCore died"):
        run_batch(loop, gate, 4, 2, make_request({}), judge_retrying(set()), stall_timeout_s=30)
    assert gate.in_flight == 0


class Watched:
    """An engine loop whose watchdog readings (`stalled_for`) are counted: a test knows when the batch has looked."""

    def __init__(self, loop: EngineLoop) -> None:
        self.loop, self.looks = loop, 0

    def submit(self, prompts: Sequence[Any], params: Sequence[Any]) -> list[Future[Any]]:
        return self.loop.submit(prompts, params)

    def stalled_for(self) -> float:
        stalled = self.loop.stalled_for()
        self.looks += 1  # after the reading: a look counted after an advance may have read the time before it
        return stalled

    @property
    def failure(self) -> BaseException | None:
        return self.loop.failure


def test_a_hung_engine_step_ends_the_batch_after_the_stall_timeout():
    clock = FakeClock()
    engine = ScriptedEngine(hang_at_step=2)
    loop = Watched(EngineLoop(engine, clock=clock))
    outcome: dict[str, BaseException | None] = {}

    def batch() -> None:
        try:
            run_batch(loop, AdmissionGate(8), 2, 1, make_request({}), judge_retrying(set()), stall_timeout_s=0.4)
            outcome["error"] = None
        except BaseException as error:
            outcome["error"] = error

    threading.Thread(target=batch, daemon=True).start()
    wait_until(lambda: engine.steps == 2, what="the engine step that hangs")
    clock.advance(0.39)  # just under the stall timeout: the batch keeps waiting
    looked = loop.looks
    wait_until(lambda: loop.looks >= looked + 2 or outcome, what="the batch to look at the stalled engine")
    assert outcome == {}, "the watchdog ended the batch before the stall timeout"
    clock.advance(0.02)  # past it
    wait_until(lambda: outcome, what="the watchdog to end the batch")
    assert isinstance(outcome["error"], EngineStalledError) and "no progress" in str(outcome["error"])
