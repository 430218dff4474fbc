"""The client of an OpenAI-compatible server (`vllm serve`, a fleet behind a load balancer, a hosted endpoint).

`RemoteLoop` sends requests from one asyncio loop on a thread of its own (httpx); caption batches on Ray Data's
threads submit requests to it and wait on futures, exactly as they do with pipeline.engine.loop.EngineLoop.
The server's state is handled here, not by error rows: requests in flight adapt to it
(pipeline/engine/concurrency.py: grow on success, halve on 429/503/5xx and on latency rising), a transient
failure (429, 5xx, connection error, timeout) is retried with backoff, and a server that answers nothing
usable for `unreachable_s` fails every waiting request with RemoteServerDownError.

Two users: the `openai` engine kind's caption actor (pipeline/engine/remote.py), and `NamedEngine`, a server
of the run's `engines:` that single modes send their requests to from any caption actor.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import logging
import os
import random
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from pipeline.captioning.modes import ResolvedMode, derive_seed
from pipeline.captioning.prompts import IMAGE_PLACEHOLDER
from pipeline.config import RunConfig
from pipeline.config.engines import EngineConfig
from pipeline.engine.admission import AdmissionGate
from pipeline.engine.concurrency import AdaptiveLimit

log = logging.getLogger("pipeline.engine.client")

TRANSIENT_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
OVERLOAD_STATUS = frozenset({429, 503})
FATAL_STATUS = frozenset({401, 403, 404})  # wrong key or model name: every request would fail alike
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 10.0


class RemoteServerDownError(RuntimeError):
    """The server answered nothing usable for longer than `engine.unreachable_s`; the run fails."""


class RemoteServerRefusedError(RuntimeError):
    """The server refuses every request (bad API key, unknown model); the run fails."""


class RemoteRequestRefusedError(RuntimeError):
    """The server refused one request for what it holds (too long, bad image): that image is an error row."""


@dataclass
class RemoteCompletion:
    """The parts of vLLM's CompletionOutput the caption actor reads."""

    text: str
    token_ids: Sequence[int]
    finish_reason: str | None
    logprobs: Any = None
    cumulative_logprob: float | None = None


@dataclass
class RemoteOutput:
    """The parts of vLLM's RequestOutput the caption actor reads."""

    outputs: list[RemoteCompletion]
    num_cached_tokens: int | None = None
    prompt_token_ids: list[int] | None = None
    finished: bool = True


def parse_response(data: dict[str, Any]) -> RemoteOutput:
    """A chat completion response as the engine output the actor's judge reads."""
    choice = data["choices"][0]
    usage = data.get("usage") or {}
    completion_tokens = int(usage.get("completion_tokens") or 0)
    token_ids = choice.get("token_ids")
    if token_ids is None:  # a server without vLLM's return_token_ids: the count is what the row records
        token_ids = range(completion_tokens)
    details = usage.get("prompt_tokens_details") or {}
    text = (choice.get("message") or {}).get("content") or ""
    return RemoteOutput([RemoteCompletion(text, token_ids, choice.get("finish_reason"))],
                        details.get("cached_tokens"), data.get("prompt_token_ids"))


def image_data_uri(image: Any) -> str:
    """The prepared image (384 x 384 RGB) as a PNG data URI: lossless, so the server sees the same pixels."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def chat_messages(system_prompt: str, instruction: str, image_uri: str | None,
                  inline_placeholder: bool = True) -> list[dict[str, Any]]:
    """System prompt, then the user turn: the image, then the instruction (the placeholder written right
    before it, as `chat_string` does, when `inline_placeholder`). `image_uri` None: a text-only turn."""
    user: Any = instruction.strip()
    if image_uri is not None:
        text = (IMAGE_PLACEHOLDER if inline_placeholder else "") + instruction.strip()
        user = [{"type": "image_url", "image_url": {"url": image_uri}}, {"type": "text", "text": text}]
    return [{"role": "system", "content": system_prompt.strip()}, {"role": "user", "content": user}]


def request_body(config: RunConfig, mode: ResolvedMode, instruction: str, image_uri: str | None, seed: int,
                 model_name: str, settings: EngineConfig | None = None) -> dict[str, Any]:
    """One chat completion request, with vLLM's extra sampling parameters; `settings`: the engine it goes to
    (default the run's `engine`)."""
    settings = settings or config.engine
    body: dict[str, Any] = {
        "model": model_name,
        "messages": chat_messages(mode.system_prompt or config.defaults.system_prompt, instruction, image_uri,
                                  settings.inline_image_placeholder),
        "max_tokens": mode.max_tokens, "temperature": mode.temperature, "top_p": mode.top_p, "seed": seed,
        "skip_special_tokens": True, "return_token_ids": True,
    }
    if mode.top_k:
        body["top_k"] = mode.top_k
    if config.defaults.fixed_length:
        body.update(ignore_eos=True, min_tokens=mode.max_tokens)
    return body


def backoff_s(attempt: int) -> float:
    return min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** attempt) * (0.5 + random.random() / 2)


@dataclass
class _Pending:
    body: dict[str, Any]
    future: Future[Any]
    attempt: int = 0


@dataclass
class RemoteLoop:
    """Sends requests to the server from one asyncio thread; the caption batches wait on futures.

    Has what admission needs of an engine loop (`submit`, `stalled_for`, `failure`) and the counters the
    actor's `engine use` line reads (`steps`: responses, `idle_s`)."""

    settings: EngineConfig
    model_name: str
    limit: AdaptiveLimit = field(init=False)
    steps: int = field(init=False, default=0)
    idle_s: float = field(init=False, default=0.0)
    retries: int = field(init=False, default=0)
    _failure: BaseException | None = field(init=False, default=None)
    _down_since: float | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.base_url = (self.settings.base_url or "").rstrip("/")
        self.limit = AdaptiveLimit(self.settings.max_concurrency, start=min(8, self.settings.max_concurrency))
        key = os.environ.get(self.settings.api_key_env, "") if self.settings.api_key_env else ""
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._queue: deque[_Pending] = deque()
        self._entries: dict[int, _Pending] = {}  # sent, or waiting to be sent again
        self._idle_from: float | None = time.monotonic()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="openai-client", daemon=True)
        self._thread.start()
        self._client = asyncio.run_coroutine_threadsafe(self._make_client(), self._loop).result()

    async def _make_client(self) -> Any:
        import httpx

        limits = httpx.Limits(max_connections=self.settings.max_concurrency + 4,
                              max_keepalive_connections=self.settings.max_concurrency + 4)
        return httpx.AsyncClient(headers=self._headers, limits=limits, timeout=self.settings.timeout_s)

    # -- what the caption actor calls, from any thread --------------------------------------------------------
    @property
    def failure(self) -> BaseException | None:
        return self._failure

    def stalled_for(self) -> float:
        return 0.0  # a slow server is handled by the per-request timeout and engine.unreachable_s

    def submit(self, prompts: Sequence[Any], params: Sequence[Any]) -> list[Future[Any]]:
        if self._failure is not None:
            raise self._failure
        futures: list[Future[Any]] = []
        entries = []
        for body in prompts:
            future: Future[Any] = Future()
            futures.append(future)
            entries.append(_Pending(body, future))
        self._loop.call_soon_threadsafe(self._enqueue, entries)
        return futures

    def wait_ready(self) -> list[str]:
        """Wait until the server lists its models (for at most engine.unreachable_s); the served names."""
        return asyncio.run_coroutine_threadsafe(self._wait_ready(), self._loop).result()

    def shutdown(self, timeout: float = 5.0) -> None:
        if not self._loop.is_running():
            return
        with_timeout = asyncio.run_coroutine_threadsafe(self._close(), self._loop)
        with contextlib.suppress(Exception):  # closing is best effort
            with_timeout.result(timeout)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)

    # -- on the loop's thread ----------------------------------------------------------------------------------
    async def _close(self) -> None:
        self._fail_all(RuntimeError("the OpenAI client was shut down"), record=False)
        await self._client.aclose()

    async def _wait_ready(self) -> list[str]:
        started, attempt = time.monotonic(), 0
        url = f"{self.base_url}/models"
        while True:
            try:
                response = await self._client.get(url, timeout=min(30.0, self.settings.timeout_s))
                if response.status_code in FATAL_STATUS:
                    raise RemoteServerRefusedError(f"server at {self.base_url} refused: HTTP {response.status_code}: "
                                                   f"{response.text[:200]}")
                if response.status_code == 200:
                    return [item.get("id") for item in response.json().get("data", [])]
                problem = f"HTTP {response.status_code}"
            except RemoteServerRefusedError:
                raise
            except Exception as err:
                problem = f"{type(err).__name__}: {err}"
            waited = time.monotonic() - started
            if waited > self.settings.unreachable_s:
                raise RemoteServerDownError(f"server at {self.base_url} unreachable for {waited:.0f} s "
                                            f"(engine.unreachable_s; last: {problem})")
            if attempt % 10 == 0:
                log.warning("waiting for the server at %s (%s)", self.base_url, problem)
            await asyncio.sleep(backoff_s(min(attempt, 3)))
            attempt += 1

    def _enqueue(self, entries: list[_Pending], front: bool = False) -> None:
        if self._failure is not None:
            for entry in entries:
                if not entry.future.done():
                    entry.future.set_exception(self._failure)
            return
        if front:
            self._queue.extendleft(reversed(entries))
        else:
            self._queue.extend(entries)
        self._dispatch()

    def _dispatch(self) -> None:
        while self._queue and self.limit.has_room() and self._failure is None:
            entry = self._queue.popleft()
            if self._idle_from is not None:
                self.idle_s += time.monotonic() - self._idle_from
                self._idle_from = None
            self.limit.started()
            self._entries[id(entry)] = entry
            self._loop.create_task(self._send(entry))

    async def _send(self, entry: _Pending) -> None:
        started = time.monotonic()
        problem: str | None = None
        try:
            response = await self._client.post(f"{self.base_url}/chat/completions", json=entry.body)
        except Exception as err:  # connection refused or cut, timeouts: the server may come back
            problem = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
            response = None
        finally:
            self.limit.finished()
        if response is not None:
            code = response.status_code
            if code == 200:
                try:
                    output = parse_response(response.json())
                except Exception as err:
                    problem = f"unreadable response: {type(err).__name__}: {err}"
                else:
                    self._down_since = None
                    self.steps += 1
                    self.limit.success(time.monotonic() - started, max(1, len(output.outputs[0].token_ids)))
                    self._entries.pop(id(entry), None)
                    if not entry.future.done():
                        entry.future.set_result(output)
                    self._after_request()
                    return
            elif code in FATAL_STATUS:
                self._fail_all(RemoteServerRefusedError(f"server at {self.base_url} refused: HTTP {code}: "
                                                        f"{response.text[:200]}"))
                return
            elif code in TRANSIENT_STATUS:
                problem = f"HTTP {code}"
                if code in OVERLOAD_STATUS:
                    self.limit.overloaded()
            else:  # the server refused this request alone (prompt too long, bad image, ...)
                self._entries.pop(id(entry), None)
                entry.future.set_exception(RemoteRequestRefusedError(f"HTTP {code}: {response.text[:300]}"))
                self._after_request()
                return
        if response is None:
            self.limit.overloaded()
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = started
        down_for = now - self._down_since
        if down_for > self.settings.unreachable_s:
            self._fail_all(RemoteServerDownError(f"server at {self.base_url} unreachable for {down_for:.0f} s "
                                                 f"(engine.unreachable_s; last: {problem})"))
            return
        self.retries += 1
        if entry.attempt % 20 == 0:
            log.warning("server at %s: %s; retrying (attempt %d)", self.base_url, problem, entry.attempt + 1)
        await asyncio.sleep(backoff_s(entry.attempt))
        entry.attempt += 1
        self._enqueue([entry], front=True)
        self._after_request()

    def _after_request(self) -> None:
        self._dispatch()
        if not self._queue and self.limit.in_flight == 0 and self._idle_from is None:
            self._idle_from = time.monotonic()

    def _fail_all(self, err: BaseException, record: bool = True) -> None:
        if record and self._failure is None:
            log.error("%s", err)
            self._failure = err
        failure = self._failure or err
        pending, self._queue = list(self._queue) + list(self._entries.values()), deque()
        self._entries.clear()
        for entry in pending:
            if not entry.future.done():
                entry.future.set_exception(failure)
        for task in asyncio.all_tasks(self._loop):
            if task is not asyncio.current_task(self._loop):
                task.cancel()


def connect(settings: EngineConfig, model_name: str, model_key: str) -> RemoteLoop:
    """A client of the server at `settings.base_url`, once it lists its models (waiting up to `unreachable_s`) and
    serves `model_name`; otherwise RemoteServerDownError / RemoteServerRefusedError naming `model_key` (the
    config key that names the model), with the client shut down."""
    loop = RemoteLoop(settings, model_name)
    try:
        served = loop.wait_ready()
        if served and model_name not in served:
            raise RemoteServerRefusedError(f"server at {loop.base_url} does not serve model {model_name!r} "
                                           f"({model_key}); it serves {served}")
    except BaseException:
        loop.shutdown()
        raise
    return loop


def mode_request(config: RunConfig, settings: EngineConfig, model_name: str, key: str, image: Any,
                 mode: ResolvedMode, attempt: int, instruction: str) -> dict[str, Any]:
    """The chat completion body for one (image, mode, attempt) to a server: `image` is a prepared image or its
    data URI, sent only for a mode that is not text-only; the seed is the one the in-process engine would use."""
    image_uri = None
    if mode.image:
        image_uri = image if isinstance(image, str) else image_data_uri(image)
    seed = derive_seed(config.seed, key, mode.name, attempt)
    return request_body(config, mode, instruction, image_uri, seed, model_name, settings)


@dataclass
class NamedEngine:
    """A server of the run's `engines:` that some modes send their requests to (`modes[].engine`), from any
    caption actor, in-process or remote: its own client loop and admission gate."""

    name: str
    settings: EngineConfig
    loop: RemoteLoop
    gate: AdmissionGate

    @classmethod
    def start(cls, name: str, settings: EngineConfig) -> NamedEngine:
        """Connected and checked (the server lists the model), or the client's error naming the engine."""
        try:
            loop = connect(settings, settings.model or name, f"engines.{name}.model")
        except (RemoteServerDownError, RemoteServerRefusedError) as err:
            raise type(err)(f"engine {name!r}: {err}") from None
        log.info("engine %r: OpenAI-compatible server at %s ready (model %s)", name, loop.base_url, loop.model_name)
        return cls(name, settings, loop, AdmissionGate(settings.max_concurrency))

    def request(self, config: RunConfig, key: str, image: Any, mode: ResolvedMode, attempt: int,
                instruction: str) -> tuple[dict[str, Any], Any]:
        """The request for one (image, mode, attempt), as the admission code takes it (no sampling object)."""
        return mode_request(config, self.settings, self.loop.model_name, key, image, mode, attempt, instruction), None


def start_named_engines(config: RunConfig, modes: Sequence[ResolvedMode]) -> dict[str, NamedEngine]:
    """The named engines the run's modes use, each connected; RemoteServerDownError or RemoteServerRefusedError
    naming the first that cannot start (the caller fails the actor's start with it)."""
    started: dict[str, NamedEngine] = {}
    try:
        for name in sorted({mode.engine for mode in modes if mode.engine is not None}):
            started[name] = NamedEngine.start(name, config.engines[name])
    except BaseException:
        for engine in started.values():
            engine.loop.shutdown()
        raise
    return started


def named_engine_failure(engines: dict[str, NamedEngine]) -> BaseException | None:
    """A named engine's server that is down or refuses everything: the run fails with it, in one line."""
    for engine in engines.values():
        if isinstance(engine.loop.failure, RemoteServerDownError | RemoteServerRefusedError):
            return engine.loop.failure
    return None
