"""The `openai` engine kind's caption actor and named engines (pipeline/engine/remote.py), against HTTP servers on
loopback (tests/unit/engine/test_client.py's)."""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler

import pytest
from PIL import Image

from pipeline.config import ConfigError, build_config
from tests.unit.engine.test_client import TREE, _FakeServer


def _serving(fake: _FakeServer, name: str) -> _FakeServer:
    """`fake` answering GET /models with `name`, as a server of that model does."""

    def do_get(handler: BaseHTTPRequestHandler) -> None:
        data = json.dumps({"data": [{"id": name}]}).encode()
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    fake.http.RequestHandlerClass.do_GET = do_get  # type: ignore[attr-defined]
    return fake

def test_remote_actor_captions_every_mode_of_every_image_through_the_admission_code(monkeypatch: pytest.MonkeyPatch):
    from pipeline.engine.remote import RemoteCaptionActor

    fake = _serving(_FakeServer([503]), "served")
    monkeypatch.setattr("pipeline.engine.client.BACKOFF_BASE_S", 0.01)
    tree = {**TREE, "modes": [*TREE["modes"], {"name": "description", "type": "straightforward", "max_tokens": 9}],
            "engine": {"kind": "openai", "base_url": fake.url, "model": "served"}}
    actor = RemoteCaptionActor(build_config(tree).model_dump_json())
    try:
        images = [Image.new("RGB", (384, 384), (i, 0, 0)) for i in range(3)]
        results = actor.caption(["a", "b", "c"], images)
        assert [[g.attempts for g in row] for row in results] == [[1, 1]] * 3
        assert all(g.text.startswith("caption ") and g.tokens == 3 for row in results for g in row)
        assert len(fake.bodies) == 7  # six requests, one of them sent twice after a 503
        assert {body["model"] for body in fake.bodies} == {"served"}
    finally:
        actor.shutdown()
        fake.close()


def test_remote_actor_runs_a_chain_stage_by_stage_and_sends_a_text_only_mode_without_its_image(
        monkeypatch: pytest.MonkeyPatch):
    from pipeline.engine.remote import RemoteCaptionActor

    fake = _serving(_FakeServer([]), "m")
    tree = {**TREE, "modes": [*TREE["modes"], {"name": "short", "prompt": "Shorten: {tags}", "requires": ["tags"],
                                                "image": False}],
            "engine": {"kind": "openai", "base_url": fake.url, "model": "m"}}
    actor = RemoteCaptionActor(build_config(tree).model_dump_json())
    try:
        [[tags, short]] = actor.caption(["a"], [Image.new("RGB", (384, 384))])
        first, second = fake.bodies
        assert isinstance(first["messages"][1]["content"], list)  # the image, then the instruction
        assert second["messages"][1]["content"] == f"Shorten: {tags.text}" == short.prompt
    finally:
        actor.shutdown()
        fake.close()


def test_a_mode_naming_another_engine_sends_its_requests_there_with_its_model_and_system_prompt():
    from pipeline.engine.remote import RemoteCaptionActor

    main, side = _serving(_FakeServer([]), "m"), _serving(_FakeServer([]), "writer")
    tree = {**TREE, "modes": [*TREE["modes"], {"name": "short", "prompt": "Shorten: {tags}", "requires": ["tags"],
                                                "image": False, "engine": "rewriter",
                                                "system_prompt": "You rewrite captions."}],
            "engine": {"kind": "openai", "base_url": main.url, "model": "m"},
            "engines": {"rewriter": {"kind": "openai", "base_url": side.url, "model": "writer"}}}
    actor = RemoteCaptionActor(build_config(tree).model_dump_json())
    try:
        [[tags, short]] = actor.caption(["a"], [Image.new("RGB", (384, 384))])
        [to_main], [to_side] = main.bodies, side.bodies
        assert to_main["model"] == "m" and to_side["model"] == "writer"
        assert to_side["messages"] == [{"role": "system", "content": "You rewrite captions."},
                                       {"role": "user", "content": f"Shorten: {tags.text}"}]
        assert short.prompt == f"Shorten: {tags.text}"
    finally:
        actor.shutdown()
        main.close()
        side.close()


def test_named_engines_are_checked_at_load_and_their_model_is_in_the_fingerprint():
    def config(**changes: object):
        rewrite = {"name": "short", "prompt": "Shorten: {tags}", "requires": ["tags"], "image": False,
                   "engine": "rewriter"}
        return build_config({**TREE, "modes": [*TREE["modes"], rewrite],
                             "engines": {"rewriter": {"base_url": "http://h:1/v1", "model": "a", **changes}}})

    assert config().engines["rewriter"].kind == "openai"  # may be left out: a named engine is a server
    assert config().fingerprint() != config(model="b").fingerprint()
    assert config().fingerprint() == config(base_url="http://elsewhere:2/v1").fingerprint()  # same model, same rows
    with pytest.raises(ConfigError, match=r"engines\.rewriter\.kind: a named engine is an OpenAI-compatible"):
        config(kind="vllm")
    with pytest.raises(ConfigError, match=r"engines\.rewriter\.model: required"):
        config(model=None)
    with pytest.raises(ConfigError, match=r"modes\.1\.engine: 'nope' is not an engine of this run"):
        build_config({**TREE, "modes": [*TREE["modes"], {"name": "x", "prompt": "y", "engine": "nope"}]})


def test_remote_actor_fails_to_start_naming_a_model_the_server_does_not_serve():
    from pipeline.engine.actor import EngineStartError
    from pipeline.engine.remote import RemoteCaptionActor

    fake = _serving(_FakeServer([]), "other")
    tree = {**TREE, "engine": {"kind": "openai", "base_url": fake.url, "model": "served"}}
    try:
        with pytest.raises(EngineStartError, match=r"engine failed to start: server at .* does not serve model "
                                                     r"'served'"):
            RemoteCaptionActor(build_config(tree).model_dump_json())
    finally:
        fake.close()
