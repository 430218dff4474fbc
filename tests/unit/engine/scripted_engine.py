"""A scripted stand-in with vLLM's `LLMEngine` surface (`add_request`, `step`, `has_unfinished_requests`),
for the orderings and faults a real engine cannot be made to produce on cue."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from vllm.sampling_params import SamplingParams


@dataclass
class Output:
    request_id: str
    prompt: str
    finished: bool = True


class ScriptedEngine:
    """A request's prompt says how many steps it needs ("steps:3"); "refuse" is rejected on add.

    `pause_at_step`: that step sets `paused` and waits for `resume` before it makes progress, so a test can
    line things up with the engine mid-batch; `hang_at_step` never returns."""

    def __init__(self, fail_at_step: int | None = None, hang_at_step: int | None = None,
                 pause_at_step: int | None = None) -> None:
        self.remaining: dict[str, tuple[str, int]] = {}
        self.steps = 0
        self.most_unfinished = 0
        self.fail_at_step = fail_at_step
        self.hang_at_step = hang_at_step
        self.pause_at_step = pause_at_step
        self.paused, self.resume = threading.Event(), threading.Event()
        self.added: list[tuple[int, str]] = []  # (engine step when added, prompt)
        self.finished: list[tuple[int, str]] = []  # (engine step when finished, prompt)
        self.kinds: list[object] = []
        self.lock = threading.Lock()

    def add_request(self, request_id: str, prompt: str, params: SamplingParams) -> None:
        if prompt == "refuse":
            raise ValueError("prompt too long")
        self.kinds.append(params.output_kind)
        self.added.append((self.steps, prompt))
        with self.lock:
            self.remaining[request_id] = (prompt, int(prompt.split(":")[1]))

    def has_unfinished_requests(self) -> bool:
        return bool(self.remaining)

    def step(self) -> list[Output]:
        self.steps += 1
        if self.fail_at_step == self.steps:
            raise RuntimeError("EngineCore died")
        if self.hang_at_step == self.steps:
            threading.Event().wait()
        if self.pause_at_step == self.steps:
            self.paused.set()
            if not self.resume.wait(60):
                raise RuntimeError("the test never resumed the paused engine")
        time.sleep(0.002)
        self.most_unfinished = max(self.most_unfinished, len(self.remaining))
        done = []
        for request_id, (prompt, left) in list(self.remaining.items()):
            if left <= 1:
                del self.remaining[request_id]
                done.append(Output(request_id, prompt))
                self.finished.append((self.steps, prompt))
            else:
                self.remaining[request_id] = (prompt, left - 1)
        return done


