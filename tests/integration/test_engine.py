"""The caption actor's engine requests, checked on the token ids vLLM actually received."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
from PIL import Image

from pipeline.captioning.images import pixels_to_image, prepare_image
from pipeline.captioning.prompts import DEFAULT_SYSTEM_PROMPT
from pipeline.config import build_config
from pipeline.testing.tiny_model import BOS_ID, IMAGE_TOKEN_ID

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def actor(tiny_model: Path):
    from pipeline.engine.actor import CaptionActor

    config = build_config({
        "input": {"uri": "unused"}, "output": {"uri": "unused"},
        "model": {"path": str(tiny_model), "dtype": "float32", "max_model_len": 2048},
        "modes": [{"name": "tags", "type": "booru_like", "length": 50, "max_tokens": 24},
                  {"name": "description", "type": "straightforward", "length": 160, "max_tokens": 24},
                  {"name": "custom", "prompt": "Name one colour you see.", "max_tokens": 24}],
    })
    engine = CaptionActor(config.model_dump_json())
    yield engine
    engine.shutdown()


def _image(samples: Path, name: str) -> Image.Image:
    prepared = prepare_image((samples / name).read_bytes(), name)
    assert prepared.pixels is not None
    return pixels_to_image(prepared.pixels)


def test_engine_receives_one_bos_and_729_image_tokens_before_the_instruction(actor, samples: Path):
    images = {name: _image(samples, name) for name in ("astronaut.jpg", "coffee.jpg")}
    requests, params = [], []
    for key, image in images.items():
        for mode in actor.modes:
            request, param = actor.request(key, image, mode)
            requests.append(request)
            params.append(param)
    outputs = actor.llm.generate(requests, params, use_tqdm=False)
    tokenizer = actor.tokenizer
    for output, mode in zip(outputs, [m for _ in images for m in actor.modes], strict=True):
        ids = list(output.prompt_token_ids)
        assert ids.count(BOS_ID) == 1 and ids[0] == BOS_ID
        assert ids.count(IMAGE_TOKEN_ID) == 729
        first, last = ids.index(IMAGE_TOKEN_ID), len(ids) - 1 - ids[::-1].index(IMAGE_TOKEN_ID)
        assert last - first == 728  # one contiguous run
        before, after = tokenizer.decode(ids[:first]), tokenizer.decode(ids[last + 1:])
        assert DEFAULT_SYSTEM_PROMPT in before
        assert after.startswith(mode.instructions[0]) and "<|start_header_id|>assistant" in after


def test_same_seed_same_caption_and_glitches_do_not_stop_the_batch(actor, samples: Path):
    images = [_image(samples, "rocket.jpg"), _image(samples, "logo.png")]
    first = actor.caption(["rocket.jpg", "logo.png"], images)
    second = actor.caption(["rocket.jpg", "logo.png"], images)
    assert [[g.text for g in row] for row in first] == [[g.text for g in row] for row in second]
    assert all(len(row) == 3 and all(g.tokens >= 1 for g in row) for row in first)
    # A different key is a different seed: a different caption for the same pixels.
    other = actor.caption(["rocket-copy.jpg"], images[:1])
    assert [g.seed for g in other[0]] != [g.seed for g in first[0]]


def test_the_actor_logs_how_busy_its_engine_was(actor, samples: Path, caplog: pytest.LogCaptureFixture):
    actor.caption(["rocket.jpg"], [_image(samples, "rocket.jpg")])
    with caplog.at_level(logging.INFO, logger="pipeline.engine.actor"):
        actor._report_engine_use(every_s=0)
    line = re.search(r"engine use: (\d+) steps, idle ([0-9.]+)% of ([0-9.]+) s since ready", caplog.text)
    assert line is not None, caplog.text
    steps, idle, since = int(line.group(1)), float(line.group(2)), float(line.group(3))
    assert steps >= 24 and 0 <= idle <= 100 and since > 0  # 24 tokens a mode: at least that many steps
