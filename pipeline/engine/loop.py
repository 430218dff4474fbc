"""One thread drives a vLLM engine; caption batches on other threads add requests and wait for theirs.

`LLM.generate` runs one batch to completion: towards its end the engine's running batch shrinks
(the short mode finishes first, then the long mode's stragglers), and between two calls it is
empty. On a GPU that tail is paid on every batch. Here the caption actor runs two batches at once
(Ray Data calls it from two threads): the next batch's requests are queued while the last one
drains, so the engine always has a full batch to schedule.

Only the loop thread touches the engine (`LLMEngine` is not thread-safe): callers put their
requests on a queue that the loop drains between engine steps. It uses the engine API that
`LLM.generate` itself is built on (`add_request`, `step`, `has_unfinished_requests`), the same
from vLLM 0.26 to 0.32. Where the engine has a renderer (vLLM 0.32), a prompt is rendered with it
first and the engine gets the rendered input, as `LLM.generate` does: passing the raw prompt dict
is deprecated there. vLLM 0.26 takes the raw prompt.

Why not vLLM's async engine (`AsyncLLM`): it always runs the engine core in a process of its own
(`make_async_mp_client`). On a CPU node that is the layout that halves throughput (a core spent
busy-waiting); on a GPU it is what `LLMEngine` does anyway. One thread on `LLMEngine` works the same
in-process on CPU and with the engine-core process on CUDA.

The loop thread may also build its engine (`EngineLoop(build=...)`): on CPU every torch op should run on
that one thread. OpenMP (libgomp) keeps a pool of worker threads per thread that ever ran a parallel
region, and once a process manages more OpenMP threads than it has cores, every waiting worker spins
for a hundred iterations instead of about 3 ms before it sleeps. An engine built on the actor's main
thread (model load, memory profiling, warm-up) and stepped on this one leaves two pools, so the
workers sleep and are woken between the many small parallel regions of each step: measured on 2
cores, raw `generate` stepped from a second thread kept 1.83 cores busy against 1.97 on the thread
that built it.

The loop also says whether the engine still makes progress (`stalled_for`): the caption actor's
watchdog ends an actor whose engine step has not returned for too long while requests wait.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

log = logging.getLogger("pipeline.engine.loop")


class EngineLoopStoppedError(RuntimeError):
    """The loop was shut down before these requests finished."""


class EngineLoop:
    """Feeds one `vllm.LLMEngine` from any number of threads; finished outputs resolve futures."""

    def __init__(self, engine: Any = None, *, build: Callable[[], Any] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """Drive `engine`, or the engine `build()` returns when called on the loop's own thread (it returns
        once the engine is built, and raises what `build` raised). `clock` times idling and stalls (tests
        drive a fake one)."""
        from vllm.sampling_params import RequestOutputKind

        if (engine is None) == (build is None):
            raise ValueError("EngineLoop needs an engine or a build function, not both")
        self._engine = engine
        self._clock = clock
        self._final_only = RequestOutputKind.FINAL_ONLY
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._incoming: deque[tuple[str, Any, Any, Future[Any]]] = deque()
        self._waiting: dict[str, Future[Any]] = {}
        self._failure: BaseException | None = None
        self._stopping = False
        self._step_started: float | None = None  # monotonic start of the step in progress, if any
        self.steps = 0
        self.idle_s = 0.0  # time the loop waited with no request at all (the engine starved of work)
        self._render: Callable[[Any], Any] | None = None
        self._built = threading.Event()
        self._build_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(build,), name="vllm-engine-loop", daemon=True)
        self._thread.start()
        self._built.wait()
        if self._build_error is not None:
            raise self._build_error

    def generate(self, prompts: Sequence[Any], params: Sequence[Any]) -> list[Any]:
        """Outputs for `prompts`, in order; blocks until all are finished (others' requests share the engine)."""
        futures = self.submit(prompts, params)
        return [future.result() for future in futures]

    def submit(self, prompts: Sequence[Any], params: Sequence[Any]) -> list[Future[Any]]:
        futures: list[Future[Any]] = []
        with self._lock:
            self._raise_if_unusable()
            for prompt, param in zip(prompts, params, strict=True):
                # Only the finished output is wanted: vLLM then skips building partial outputs.
                param.output_kind = self._final_only
                future: Future[Any] = Future()
                self._incoming.append((str(next(self._ids)), prompt, param, future))
                futures.append(future)
            self._wake.notify()
        return futures

    def in_flight(self) -> int:
        with self._lock:
            return len(self._incoming) + len(self._waiting)

    @property
    def failure(self) -> BaseException | None:
        """What ended the loop when the engine failed (not set by a plain shutdown or a refused request)."""
        return self._failure

    def stalled_for(self) -> float:
        """Seconds the engine step in progress has run (0 between steps or when idle). A healthy engine step
        takes milliseconds on a GPU and seconds on a CPU; minutes mean the engine hangs."""
        started = self._step_started
        return 0.0 if started is None else self._clock() - started

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the loop thread; requests still waiting fail with EngineLoopStoppedError."""
        with self._lock:
            self._stopping = True
            self._wake.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _raise_if_unusable(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self._stopping:
            raise EngineLoopStoppedError("the engine loop is shut down")

    def _run(self, build: Callable[[], Any] | None) -> None:
        try:
            if build is not None:
                self._engine = build()
            self._render = _renderer_of(self._engine)
        except BaseException as err:  # the constructor re-raises it on its own thread
            self._build_error = err
            self._stopping = True
            return
        finally:
            self._built.set()
        try:
            while self._next_step():
                pass
        except BaseException as err:  # every waiter must hear of it, whatever it is
            log.error("vLLM engine loop failed: %s: %s", type(err).__name__, err)
            self._fail_all(err)
            return
        self._fail_all(EngineLoopStoppedError("the engine loop is shut down"))

    def _next_step(self) -> bool:
        """Add queued requests, run one engine step, resolve finished requests. False when stopping."""
        with self._lock:
            if not self._stopping and not self._incoming and not self._waiting:
                idle_from = self._clock()
                while not self._stopping and not self._incoming and not self._waiting:
                    self._wake.wait()
                self.idle_s += self._clock() - idle_from
            if self._stopping:
                return False
            incoming, self._incoming = self._incoming, deque()
        for request_id, prompt, param, future in incoming:
            try:
                self._engine.add_request(request_id, self._render(prompt) if self._render else prompt, param)
            except Exception as err:  # a request the engine refuses (too long, bad input) fails alone
                future.set_exception(err)
                continue
            with self._lock:
                self._waiting[request_id] = future
        if not self._engine.has_unfinished_requests():
            self._fail_orphans()
            return True
        self._step_started = self._clock()
        outputs = self._engine.step()
        self._step_started = None
        self.steps += 1
        for output in outputs:
            if output.finished:
                with self._lock:
                    future = self._waiting.pop(output.request_id, None)
                if future is not None:
                    future.set_result(output)
        return True

    def _fail_orphans(self) -> None:
        """Waiters whose requests the engine no longer has (it never reported them finished) fail now
        rather than hang the batch forever."""
        with self._lock:
            orphans, self._waiting = self._waiting, {}
        for request_id, future in orphans.items():
            future.set_exception(RuntimeError(f"vLLM dropped request {request_id} without finishing it"))

    def _fail_all(self, err: BaseException) -> None:
        with self._lock:
            if not isinstance(err, EngineLoopStoppedError):
                self._failure = err
            self._stopping = True
            pending = list(self._waiting.values()) + [entry[3] for entry in self._incoming]
            self._waiting.clear()
            self._incoming.clear()
        for future in pending:
            if not future.done():
                future.set_exception(err)


def _renderer_of(engine: Any) -> Any:
    """A function rendering a prompt dict into the engine's input the way `LLM.generate` does, or None
    where the engine takes prompt dicts as they are (vLLM before the renderers, and test engines)."""
    renderer = getattr(engine, "renderer", None)
    if renderer is None or not hasattr(renderer, "render_cmpl"):
        return None
    from vllm.renderers.inputs.preprocess import parse_model_prompt

    model_config, params = engine.model_config, renderer.default_cmpl_tok_params

    def render(prompt: Any) -> Any:
        (rendered,) = renderer.render_cmpl([parse_model_prompt(model_config, prompt)], params)
        return rendered

    return render
