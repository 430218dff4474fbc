"""Glitch detection on texts shaped like JoyCaption's real failures."""

from __future__ import annotations

import pytest

from pipeline.captioning.quality import detect_glitch
from pipeline.config import QualityConfig

QUALITY = QualityConfig()


@pytest.mark.parametrize("text, finish, expected", [
    ("A tabby cat sits on a red cushion beside a window.", "stop", None),
    ("1girl, solo, long hair, smile, outdoors, tree", "stop", None),
    ("very very good", "stop", None),
    ("a dog, a dog, a dog, a dog, a dog, a dog, a dog, a dog", "stop", "repetition"),
    ("masterpiece, best quality, cat, masterpiece, tree, masterpiece, sky, masterpiece, cloud, grass", "stop",
     "repetition"),
    ("the light the light the light the light the light", "length", "repetition"),
    ("I'm sorry, but I can't help with that.", "stop", "refusal"),
    ("I cannot describe this image.", "stop", "refusal"),
    ("A long description that never ended", "length", "truncated"),
    ("", "stop", "empty"),
    ("  \n", "length", "empty"),
])
def test_glitches(text: str, finish: str, expected: str | None):
    assert detect_glitch(text, finish, QUALITY) == expected
