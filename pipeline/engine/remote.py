"""The `openai` engine kind: a caption actor that is a client of an OpenAI-compatible server.

With `engine.kind: openai` the caption actor builds no vLLM engine and needs no GPU: it sends every
mode of an image as chat completion requests to `engine.base_url` at once (so the server's prefix
cache shares the system prompt and the 729 image tokens between them), and judges the answers with
the same code as the in-process engine (pipeline/engine/admission.py: glitch retries go straight back,
error rows only for requests the server refuses alone). Typically the server is `vllm serve` of
JoyCaption with `--enable-prefix-caching`, or a fleet of them behind a load balancer.

What is sent matches the in-process engine: the image as JoyCaption expects it (the 384 x 384 RGB
pixels the read stage prepared, PNG-encoded as a data URI), the run's system prompt, and the
`<image>` placeholder written right before the instruction (vLLM's server keeps a placeholder it
finds in the text where it is), so with the model's chat template the server tokenises the very
string `chat_string` builds: one `<|begin_of_text|>`, then 729 image tokens. Sampling is per request:
`seed` (the same derived seed as in-process), temperature, top_p, vLLM's `top_k`, max_tokens, and
`ignore_eos` + `min_tokens` for `defaults.fixed_length`. Token counts and cached prompt tokens come
from the response's `usage`, the finish reason from the response.

The server's state is handled here, not by error rows: requests in flight adapt to it
(pipeline/engine/concurrency.py: grow on success, halve on 429/503/5xx and on latency rising), a
transient failure (429, 5xx, connection error, timeout) is retried with backoff, and a server that
answers nothing usable for `engine.unreachable_s` fails the run in one line.

One asyncio loop on a thread of its own does the HTTP (httpx); caption batches on Ray Data's threads
submit requests to it and wait on futures, exactly as they do with pipeline.engine.loop.EngineLoop.
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
from typing import Any, NoReturn

from pipeline.captioning.modes import ResolvedMode, derive_seed
from pipeline.captioning.prompts import IMAGE_PLACEHOLDER
from pipeline.config import RunConfig
from pipeline.config.engines import EngineConfig
from pipeline.engine.actor import CaptionActor, EngineStartError
from pipeline.engine.admission import AdmissionGate, AdmissionStats, EngineFailedError
from pipeline.engine.concurrency import AdaptiveLimit
from pipeline.engine.dedup import IndexClient
from pipeline.engine.metrics import EngineGauges
from pipeline.engine.options import engine_id
from pipeline.table.schema import in_flight_schema

log = logging.getLogger("pipeline.engine.remote")

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
                 model_name: str) -> dict[str, Any]:
    """One chat completion request, with vLLM's extra sampling parameters."""
    body: dict[str, Any] = {
        "model": model_name,
        "messages": chat_messages(config.defaults.system_prompt, instruction, image_uri,
                                  config.engine.inline_image_placeholder),
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


class RemoteCaptionActor(CaptionActor):
    """`map_batches` UDF like CaptionActor, with requests to an OpenAI-compatible server instead of an engine."""

    def __init__(self, config_json: str, engine_hook: Any = None) -> None:
        self.config = RunConfig.model_validate_json(config_json)
        self.modes = self.config.resolved_modes()
        self.schema = in_flight_schema([mode.name for mode in self.modes])
        settings = self.config.engine
        self.model_name = settings.model or self.config.model.path
        started = time.monotonic()
        self.loop = RemoteLoop(settings, self.model_name)  # type: ignore[assignment]
        try:
            served = self.loop.wait_ready()
            if served and self.model_name not in served:
                raise RemoteServerRefusedError(f"server at {self.loop.base_url} does not serve model "
                                               f"{self.model_name!r} (engine.model); it serves {served}")
        except (RemoteServerDownError, RemoteServerRefusedError) as err:
            self.loop.shutdown()
            # Fails the run in one line, as an in-process engine that cannot start does.
            raise EngineStartError(f"engine failed to start: {err}") from None
        self.gate = AdmissionGate(settings.max_concurrency)
        self.admission_stats = AdmissionStats()
        self.dedup = IndexClient.connect(self.config.output.uri, self.config.compute.dedup_wait_s) \
            if self.config.compute.dedup else None  # the run's content index, as for the in-process engine
        self._ready_at = time.monotonic()
        self._reported_at = -float("inf")
        self.engine_id = engine_id()
        self.gauges = EngineGauges(self.engine_id, self._gauge_sample).start()
        log.info("OpenAI-compatible server at %s ready in %.1fs (model %s); %d requests in flight at most",
                 self.loop.base_url, time.monotonic() - started, self.model_name, self.gate.target)

    def request(self, key: str, image: Any, mode: ResolvedMode, attempt: int = 0,
                instruction: str | None = None) -> tuple[dict[str, Any], Any]:
        """The chat completion body for one (image, mode, attempt); `image` is the image's data URI."""
        if instruction is None:
            instruction = mode.instruction_for(self.config.seed, key)
        seed = derive_seed(self.config.seed, key, mode.name, attempt)
        return request_body(self.config, mode, instruction, image, seed, self.model_name), None

    def caption(self, keys: list[str], images: list[Any], *args: Any, **kwargs: Any) -> list[list[Any]]:
        # PNG-encoded once per image, not once per mode and attempt; the rest as the in-process actor takes it.
        return super().caption(keys, [image_data_uri(image) for image in images], *args, **kwargs)

    def _report_engine_use(self, every_s: float | None = None) -> None:
        now = time.monotonic()
        if now - self._reported_at < (self.config.compute.engine_report_s if every_s is None else every_s):
            return
        self._reported_at = now
        limit = self.loop.limit
        log.info("server use: %d responses, %d transient failures retried, concurrency %d (max %d, %d decreases), "
                 "%d glitch retries submitted at once", self.loop.steps, self.loop.retries, limit.current,
                 limit.maximum, limit.decreases, self.admission_stats.retries_submitted)

    def die(self, err: BaseException) -> NoReturn:
        """A server down or refusing everything fails the run (one line); no actor restart would help."""
        cause = self.loop.failure
        self.shutdown()
        if isinstance(cause, RemoteServerDownError | RemoteServerRefusedError):
            raise type(cause)(str(cause)) from None
        raise EngineFailedError(str(err)) from None


def remote_captioner(captioner: type) -> type:
    """The caption actor class for `engine.kind: openai`: RemoteCaptionActor in place of the in-process one
    (a stand-in captioner, the benchmarks', is kept)."""
    return RemoteCaptionActor if captioner is CaptionActor else captioner


def remote_batches_in_flight(config: RunConfig) -> int:
    """Batches each client actor works on at once: enough to keep `engine.max_concurrency` requests in
    flight, plus one (the server, not the actor, is the limit)."""
    per_batch = config.compute.batch_size * len(config.modes)
    return -(-config.engine.max_concurrency // per_batch) + 1
