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

import logging
import time
from typing import Any, NoReturn

from pipeline.captioning.modes import ResolvedMode
from pipeline.config import RunConfig
from pipeline.engine.actor import CaptionActor, EngineStartError
from pipeline.engine.admission import AdmissionGate, AdmissionStats, EngineFailedError
from pipeline.engine.client import (
    RemoteServerDownError,
    RemoteServerRefusedError,
    connect,
    image_data_uri,
    mode_request,
    named_engine_failure,
    start_named_engines,
)
from pipeline.engine.dedup import IndexClient
from pipeline.engine.metrics import EngineGauges
from pipeline.engine.options import engine_id
from pipeline.table.schema import in_flight_schema

log = logging.getLogger("pipeline.engine.remote")


class RemoteCaptionActor(CaptionActor):
    """`map_batches` UDF like CaptionActor, with requests to an OpenAI-compatible server instead of an engine."""

    def __init__(self, config_json: str, engine_hook: Any = None) -> None:
        self.config = RunConfig.model_validate_json(config_json)
        self.modes = self.config.resolved_modes()
        self.schema = in_flight_schema([mode.name for mode in self.modes])
        settings = self.config.engine
        self.model_name = settings.model or self.config.model.path
        started = time.monotonic()
        try:
            self.loop = connect(settings, self.model_name, "engine.model")  # type: ignore[assignment]
        except (RemoteServerDownError, RemoteServerRefusedError) as err:
            # Fails the run in one line, as an in-process engine that cannot start does.
            raise EngineStartError(f"engine failed to start: {err}") from None
        self.gate = AdmissionGate(settings.max_concurrency)
        self.admission_stats = AdmissionStats()
        try:
            self.named_engines = start_named_engines(self.config, self.modes)
        except (RemoteServerDownError, RemoteServerRefusedError) as err:
            self.loop.shutdown()
            raise EngineStartError(f"engine failed to start: {err}") from None
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
        return mode_request(self.config, self.config.engine, self.model_name, key, image, mode, attempt,
                            instruction), None

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
        cause = named_engine_failure(self.named_engines) or self.loop.failure
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
