"""The run-wide content index (pipeline.engine.dedup): claims, publishing, waiting, failures, the memory bound."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from pipeline.engine import dedup
from pipeline.engine.dedup import KNOWN, MINE, RESULT, WAIT, ContentIndex, IndexClient, digest

H1, H2, H3 = "11" * 32, "22" * 32, "33" * 32


def test_the_first_claim_owns_the_content_and_the_others_wait_then_reuse():
    index = ContentIndex()
    assert index.claim(H1, "a", "s0") == (MINE,)
    assert index.claim(H1, "b", "s1") == (WAIT, "a")
    assert index.claim(H1, "a", "s0") == (MINE,)  # a redone batch of the owner: its own again
    index.publish(H1, "a", "s0", {"tags": "cat"})
    assert index.claim(H1, "b", "s1") == (RESULT, "a", {"tags": "cat"})
    assert index.claim(H1, "a", "s0") == (MINE,)
    assert index.claim(H2, "c", "s1") == (MINE,)  # another content is its own


def test_a_released_content_is_taken_over_by_the_next_claim():
    index = ContentIndex()
    assert index.claim(H1, "a", "s0") == (MINE,)
    index.release(H1, "b")  # not b's: ignored
    assert index.claim(H1, "b", "s1") == (WAIT, "a")
    index.release(H1, "a")  # a's captioning failed
    assert index.claim(H1, "b", "s1") == (MINE,)
    assert index.claim(H1, "c", "s2") == (WAIT, "b")
    index.publish(H1, "a", "s0", "late")  # a no longer owns it: not published
    assert index.claim(H1, "c", "s2") == (WAIT, "b")
    index.publish(H1, "b", "s1", "captions")
    assert index.claim(H1, "c", "s2") == (RESULT, "b", "captions")


def test_published_results_are_bounded_and_older_contents_keep_their_key():
    index = ContentIndex(max_results=2)
    for n, key in enumerate("abcde"):
        content = f"{n:02x}" * 32
        index.claim(content, key, f"s{n}")
        index.publish(content, key, f"s{n}", "x" * 100)
    assert len(index.results) == 2 and len(index.captioned) == 3 and index.stats.evicted == 3
    assert index.claim("00" * 32, "z", "s9") == (KNOWN, "a", "s0")  # evicted: key and shard only
    assert index.claim("04" * 32, "z", "s9") == (RESULT, "e", "x" * 100)
    assert index.report()["contents"] == 5


def test_lookups_refresh_the_lru():
    index = ContentIndex(max_results=2)
    for content, key in ((H1, "a"), (H2, "b")):
        index.claim(content, key, "s")
        index.publish(content, key, "s", key)
    index.claim(H1, "x", "s")  # a is used again: b is the oldest now
    index.claim(H3, "c", "s")
    index.publish(H3, "c", "s", "c")
    assert index.claim(H2, "y", "s")[0] == KNOWN and index.claim(H1, "y", "s")[0] == RESULT


def test_digests_are_16_bytes_for_any_hash():
    assert digest(H1) == bytes.fromhex(H1)[:16]
    assert len(digest("not hex")) == 16 and digest("not hex") != digest("not hex!")


class LocalClient(IndexClient):
    """The client against an in-process index, as the Ray actor would answer it."""

    def __init__(self, index: ContentIndex, wait_s: float = 5.0) -> None:
        super().__init__(handle=None, wait_s=wait_s)
        self.index, self.lock = index, threading.Lock()

    def _call(self, method: str, *args: Any) -> Any:
        with self.lock:
            if method == "claim_many":
                return [self.index.claim(*item) for item in args[0]]
            published, released, counts = args
            for item in published:
                self.index.publish(*item)
            for content, key in released:
                self.index.release(content, key)
            self.index.note(*counts)
            return None


def engine(log: list[str], fail: set[str] | None = None):
    """A stand-in engine: captions `<key>` as `caption of <key>`, or refuses the keys in `fail`."""
    def caption_for(keys: list[str]):
        def caption(at: list[int]) -> list[Any]:
            log.extend(keys[i] for i in at)
            return [None if keys[i] in (fail or set()) else f"caption of {keys[i]}" for i in at]
        return caption
    return caption_for


def final(result: Any) -> bool:
    return result is not None


def test_a_batch_captions_each_content_once_and_copies_it_to_its_duplicates(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(dedup, "POLL_S", 0.01)
    index, sent = ContentIndex(), []
    keys, hashes = ["a", "b", "c", "d", "e"], [H1, H1, H2, None, H1]
    results, duplicate_of = LocalClient(index).caption(engine(sent)(keys), keys, ["s"] * 5, hashes, final)
    assert sorted(sent) == ["a", "c", "d"]  # b and e are a's content; d has no hash and is captioned
    assert results == ["caption of a", "caption of a", "caption of c", "caption of d", "caption of a"]
    assert duplicate_of == [None, "a", None, None, "a"]
    assert index.report()["captioned"] == 3 and index.report()["reused"] == 2
    # A later batch elsewhere reuses the published captions at once.
    sent.clear()
    results, duplicate_of = LocalClient(index).caption(engine(sent)(["f"]), ["f"], ["t"], [H2], final)
    assert sent == [] and results == ["caption of c"] and duplicate_of == ["c"]


def test_a_failed_original_is_not_shared_and_its_duplicate_is_captioned_itself(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(dedup, "POLL_S", 0.01)
    index, sent = ContentIndex(), []
    keys = ["a", "b"]
    results, duplicate_of = LocalClient(index).caption(engine(sent, fail={"a"})(keys), keys, ["s"] * 2, [H1, H1],
                                                       final)
    assert sent == ["a", "b"] and results == [None, "caption of b"] and duplicate_of == [None, None]
    assert index.claim(H1, "z", "s") == (RESULT, "b", "caption of b")  # b took the content over


def test_an_engine_failure_releases_the_batch_claims(monkeypatch: pytest.MonkeyPatch):
    index = ContentIndex()

    def broken(_at: list[int]) -> list[Any]:
        raise RuntimeError("engine died")

    with pytest.raises(RuntimeError):
        LocalClient(index).caption(broken, ["a"], ["s"], [H1], final)
    assert index.claim(H1, "b", "s") == (MINE,)  # not left waiting on a dead owner


def test_a_waiting_duplicate_gets_the_original_published_by_another_actor(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(dedup, "POLL_S", 0.01)
    index, sent = ContentIndex(), []
    assert index.claim(H1, "a", "s0") == (MINE,)  # being captioned by another actor
    threading.Timer(0.1, lambda: index.publish(H1, "a", "s0", "caption of a")).start()
    results, duplicate_of = LocalClient(index).caption(engine(sent)(["b"]), ["b"], ["s1"], [H1], final)
    assert sent == [] and results == ["caption of a"] and duplicate_of == ["a"]


def test_a_wait_is_bounded_then_the_duplicate_is_captioned_itself(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(dedup, "POLL_S", 0.01)
    index, sent = ContentIndex(), []
    index.claim(H1, "a", "s0")  # its actor was SIGKILLed: never publishes, never releases
    started = time.monotonic()
    results, duplicate_of = LocalClient(index, wait_s=0.2).caption(engine(sent)(["b"]), ["b"], ["s1"], [H1], final)
    assert 0.2 <= time.monotonic() - started < 2
    assert sent == ["b"] and results == ["caption of b"] and duplicate_of == [None]
    assert index.report()["recaptioned"] == 1


def test_an_evicted_content_is_captioned_again_but_still_points_at_its_first_key(monkeypatch: pytest.MonkeyPatch):
    index, sent = ContentIndex(max_results=0), []
    LocalClient(index).caption(engine(sent)(["a"]), ["a"], ["s0"], [H1], final)
    results, duplicate_of = LocalClient(index).caption(engine(sent)(["b"]), ["b"], ["s1"], [H1], final)
    assert sent == ["a", "b"] and results == ["caption of b"] and duplicate_of == ["a"]


def test_an_unreachable_index_captions_the_whole_batch():
    class Gone(IndexClient):
        def _call(self, method: str, *args: Any) -> Any:
            raise TimeoutError("index actor gone")

    sent: list[str] = []
    results, duplicate_of = Gone(None, 1.0).caption(engine(sent)(["a", "b"]), ["a", "b"], ["s"] * 2, [H1, H1],
                                                    final)
    assert sent == ["a", "b"] and results == ["caption of a", "caption of b"] and duplicate_of == [None, None]


def test_the_caption_actor_copies_the_original_generations_and_marks_duplicate_of(monkeypatch: pytest.MonkeyPatch):
    from pipeline.engine.actor import CaptionActor, Generation

    monkeypatch.setattr(dedup, "POLL_S", 0.01)
    actor = CaptionActor.__new__(CaptionActor)  # no engine: `caption` is replaced below
    actor.dedup = LocalClient(ContentIndex())
    sent: list[str] = []

    def caption(keys: list[str], _images: list[Any], _bases: list[int] | None = None) -> list[list[Any]]:
        sent.extend(keys)
        return [[Generation(f"text of {key}", 3, "stop", None, 1, 7, "the prompt", 0, 0.5)] for key in keys]

    actor.caption = caption
    columns: dict[str, list[Any]] = {"key": ["a", "broken", "b"], "shard": ["s"] * 3,
                                     "status": ["ok", "error", "ok"], "content_hash": [H1, None, H1]}
    generations = actor._caption_once_per_content(columns, [0, 2], ["a", "b"], [None, None], [0, 0])
    assert sent == ["a"]
    assert generations[1] == generations[0] and generations[1][0].text == "text of a"
    assert isinstance(generations[1][0], Generation)  # through the index as plain tuples, and back
    assert columns["duplicate_of"] == [None, None, "a"]
