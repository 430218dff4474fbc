"""The OpenAI-compatible client (pipeline/engine/client.py): request bodies, responses, adaptive concurrency,
retries and a server that stays down, against a real HTTP server on loopback."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from PIL import Image

from pipeline.config import ConfigError, build_config
from pipeline.config.engines import EngineConfig
from pipeline.engine.client import (
    RemoteLoop,
    RemoteRequestRefusedError,
    RemoteServerDownError,
    image_data_uri,
    parse_response,
    request_body,
)
from pipeline.engine.concurrency import AdaptiveLimit

TREE = {"input": {"uri": "/tmp/in"}, "output": {"uri": "/tmp/out"}, "model": {"path": "org/model"},
        "modes": [{"name": "tags", "type": "booru_like", "length": 50, "max_tokens": 48, "top_k": 20}]}


def test_engine_section_defaults_to_the_in_process_engine_and_openai_needs_a_url():
    assert build_config(TREE).engine.kind == "vllm"
    with pytest.raises(ConfigError, match=r"engine\.base_url"):
        build_config({**TREE, "engine": {"kind": "openai"}})
    with pytest.raises(ConfigError, match=r"engine\.timeout_s"):
        build_config({**TREE, "engine": {"kind": "openai", "base_url": "http://h/v1", "timeout_s": 0}})
    config = build_config({**TREE, "engine": {"kind": "openai", "base_url": "http://h:8000/v1"}})
    assert config.engine.max_concurrency == 64
    assert config.fingerprint() == build_config(TREE).fingerprint()  # how rows are made, not what they hold


def test_request_body_carries_the_prompt_image_and_sampling():
    config = build_config({**TREE, "defaults": {"fixed_length": True}})
    mode = config.resolved_modes()[0]
    body = request_body(config, mode, mode.instructions[0], "data:image/png;base64,AAAA", 7, "served")
    system, user = body["messages"]
    assert system == {"role": "system", "content": config.defaults.system_prompt.strip()}
    assert user["content"][0] == {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    assert user["content"][1]["text"] == "<image>" + mode.instructions[0]
    assert body["seed"] == 7 and body["top_k"] == 20 and body["max_tokens"] == 48 and body["model"] == "served"
    assert body["ignore_eos"] is True and body["min_tokens"] == 48
    assert body["temperature"] == mode.temperature and body["top_p"] == mode.top_p


def test_image_is_sent_losslessly_as_png():
    image = Image.new("RGB", (384, 384), (10, 20, 30))
    assert image_data_uri(image).startswith("data:image/png;base64,")


def test_response_parsing_takes_usage_and_finish_reason():
    output = parse_response({"choices": [{"message": {"content": " a cat "}, "finish_reason": "length"}],
                             "usage": {"completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 640}}})
    assert output.outputs[0].text == " a cat " and len(output.outputs[0].token_ids) == 5
    assert output.outputs[0].finish_reason == "length" and output.num_cached_tokens == 640


def test_aimd_grows_on_success_and_halves_on_overload_or_rising_latency():
    now = [0.0]
    limit = AdaptiveLimit(16, start=4, clock=lambda: now[0])
    for _ in range(200):
        limit.success(1.0)
    assert limit.current == 16  # additive growth, capped by the maximum
    limit.overloaded()
    assert limit.current == 8
    limit.overloaded()  # within the cool-down: one burst is one signal
    assert limit.current == 8
    now[0] = 5.0
    limit.success(10.0)  # latency ten times the best: queueing on the server
    assert limit.current == 4
    for _ in range(100):
        now[0] += 5
        limit.overloaded()
    assert limit.current == 1


class _FakeServer:
    """Answers chat completions: `plan` is a list of status codes to answer first, then 200s."""

    def __init__(self, plan: list[int]) -> None:
        self.plan, self.bodies = list(plan), []
        lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    fake.bodies.append(body)
                    status = fake.plan.pop(0) if fake.plan else 200
                payload = {"error": "busy"} if status != 200 else {
                    "choices": [{"message": {"content": f"caption {body['seed']}"}, "finish_reason": "stop"}],
                    "usage": {"completion_tokens": 3}}
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/v1"

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


def test_client_retries_transient_errors_and_refuses_bad_requests_alone(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr("pipeline.engine.client.BACKOFF_BASE_S", 0.01)
    fake = _FakeServer([429, 503, 500, 400])
    loop = RemoteLoop(EngineConfig(kind="openai", base_url=fake.url, max_concurrency=1), "m")
    try:
        futures = loop.submit([{"seed": i} for i in range(4)], [None] * 4)
        results = []
        for future in futures:
            try:
                results.append(future.result(timeout=20).outputs[0].text)
            except RemoteRequestRefusedError:
                results.append("refused")
        # transient failures are sent again until answered; the 400 is that request's own answer
        assert results.count("refused") == 1
        assert all(text in ("refused", f"caption {i}") for i, text in enumerate(results))
        assert loop.retries == 3 and loop.limit.decreases >= 1 and loop.failure is None
    finally:
        loop.shutdown()
        fake.close()


def test_a_server_that_stays_down_fails_every_request_naming_it(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr("pipeline.engine.client.BACKOFF_BASE_S", 0.01)
    monkeypatch.setattr("pipeline.engine.client.BACKOFF_MAX_S", 0.05)
    fake = _FakeServer([])
    url = fake.url
    fake.close()  # nothing listens there any more
    loop = RemoteLoop(EngineConfig(kind="openai", base_url=url, unreachable_s=0.5), "m")
    try:
        (future,) = loop.submit([{"seed": 1}], [None])
        with pytest.raises(RemoteServerDownError, match=r"server at http://127\.0\.0\.1:\d+/v1 unreachable for \d+ s"):
            future.result(timeout=20)
        assert isinstance(loop.failure, RemoteServerDownError)
    finally:
        loop.shutdown()
