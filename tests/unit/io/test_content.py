"""The content hash that decides which images are the same (pipeline.io.content)."""

from __future__ import annotations

import hashlib
import json

from pipeline.io.content import content_hash, recorded_sha256

RECORDED = "AB" * 32


def test_the_bytes_sha256_without_a_recorded_one():
    assert content_hash(b"image", None) == hashlib.sha256(b"image").hexdigest()
    assert content_hash(b"image", json.dumps({"url": "http://x", "caption": "a cat"})) == \
        hashlib.sha256(b"image").hexdigest()


def test_img2dataset_sha256_is_used_when_present():
    meta = json.dumps({"url": "http://x", "sha256": RECORDED, "json": {"sha256": RECORDED}})
    assert content_hash(b"image", meta) == RECORDED.lower()  # taken as is, lowercase: the bytes are not hashed
    assert content_hash(None, {"sha256": RECORDED}) == RECORDED.lower()
    assert content_hash(b"a", meta) == content_hash(b"b", meta)  # same recorded content: same hash


def test_a_recorded_hash_matches_the_same_bytes_hashed_here():
    data = b"the very same stored bytes"
    recorded = json.dumps({"sha256": hashlib.sha256(data).hexdigest()})
    assert content_hash(data, recorded) == content_hash(data, None)


def test_invalid_recorded_values_fall_back_to_the_bytes():
    for meta in ['{"sha256": "not-a-hash"}', '{"sha256": 12}', '{"sha256": null}', '{"sha256": "ab"}', "not json",
                 '{"sha256"', json.dumps({"sha256": "g" * 64})]:
        assert recorded_sha256(meta) is None
        assert content_hash(b"x", meta) == hashlib.sha256(b"x").hexdigest()
    assert content_hash(None, None) is None
