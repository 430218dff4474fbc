"""The run-wide content index: an image whose content was already captioned in this run is not captioned again.

The read stage gives every readable image a `content_hash` (pipeline.io.content). Before a caption actor sends
an image to its engine, it claims the hash in one index shared by the whole run (a named async Ray actor the
driver creates per run and kills at the end):

    claim(hash, key, shard) -> MINE            first claim (or the owner's own again): caption it, then publish
                            -> (RESULT, K, r)   K's finished captions r: copied into this row, duplicate_of = K
                            -> (WAIT, K)        K holds it and is still being captioned: ask again soon
                            -> (KNOWN, K, S)    K (shard S) captioned it, but its captions were evicted: caption
                                                it again, still marked duplicate_of = K
    publish(hash, key, r)   the owner's row is done: r is kept for the next claims
    release(hash, key)      the owner failed (refused request, engine failure): the next claim takes it over

A batch claims all its images in one call, captions what it owns, publishes or releases, and only then asks
again for the images it waits on, every POLL_S, for at most `compute.dedup_wait_s`; what is still held by then
is captioned here (not published: its owner may yet publish). An owner whose actor died without releasing (a
SIGKILL) therefore costs its duplicates one bounded wait, never a row; Ray redoes the owner's batch on a new
actor, where the same key claims MINE again. Nothing here is part of the exactly-once commit: a copied row is
a row like any other, and a resumed run starts with an empty index (its first copy of a content is captioned).

Memory: keys are 16-byte digests of the hash. Published results are kept for the last `compute.dedup_results`
contents (LRU, each a few hundred bytes per mode); older ones shrink to "captioned as key K in shard S"
(pipeline.engine.dedup.ContentIndex.entry_bytes estimates it; README "Duplicates").
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("pipeline.engine.dedup")

MINE, RESULT, WAIT, KNOWN = "mine", "result", "wait", "known"
POLL_S = 0.25  # how often a batch asks again for the contents it waits on
DIGEST_BYTES = 16


def digest(content_hash: str) -> bytes:
    """A fixed-size key for the index: the first 16 bytes of a hex SHA-256, else of the SHA-256 of the text."""
    try:
        raw = bytes.fromhex(content_hash)
    except ValueError:
        raw = b""
    if len(raw) < DIGEST_BYTES:
        raw = hashlib.sha256(content_hash.encode("utf-8", "surrogatepass")).digest()
    return raw[:DIGEST_BYTES]


@dataclass
class IndexStats:
    claims: int = 0
    published: int = 0
    released: int = 0
    evicted: int = 0
    captioned: int = 0  # images the caption actors sent to an engine (reported by them)
    reused: int = 0  # rows that got another key's captions
    recaptioned: int = 0  # duplicates captioned again: evicted result, owner failed or wait ran out


@dataclass
class ContentIndex:
    """The index itself, single-threaded (the Ray actor below serialises calls); unit tests drive it directly."""

    max_results: int = 100_000
    pending: dict[bytes, tuple[str, str]] = field(default_factory=dict)  # digest -> (owner key, shard)
    results: OrderedDict[bytes, tuple[str, str, Any]] = field(default_factory=OrderedDict)  # LRU of published
    # Evicted: digest -> 4-byte shard number + the key's UTF-8 (a bytes object is the smallest Python record).
    captioned: dict[bytes, bytes] = field(default_factory=dict)
    shards: list[str] = field(default_factory=list)
    shard_numbers: dict[str, int] = field(default_factory=dict)
    stats: IndexStats = field(default_factory=IndexStats)

    def claim(self, content_hash: str, key: str, shard: str) -> tuple[Any, ...]:
        self.stats.claims += 1
        d = digest(content_hash)
        if d in self.results:
            self.results.move_to_end(d)
            owner, _shard, result = self.results[d]
            return (MINE,) if owner == key else (RESULT, owner, result)
        if d in self.captioned:
            owner, owner_shard = self._unpack(self.captioned[d])
            return (MINE,) if owner == key else (KNOWN, owner, owner_shard)
        if d in self.pending:
            owner, _shard = self.pending[d]
            return (MINE,) if owner == key else (WAIT, owner)
        self.pending[d] = (key, shard)
        return (MINE,)

    def publish(self, content_hash: str, key: str, shard: str, result: Any) -> None:
        d = digest(content_hash)
        owner = self.pending.get(d)
        if owner is not None and owner[0] != key:
            return  # not this key's to publish (it was released and taken over)
        self.pending.pop(d, None)
        self.captioned.pop(d, None)
        self.results[d] = (key, shard, result)
        self.results.move_to_end(d)
        self.stats.published += 1
        while len(self.results) > self.max_results:
            old, (old_key, old_shard, _result) = self.results.popitem(last=False)
            self.captioned[old] = self._pack(old_key, old_shard)
            self.stats.evicted += 1

    def _pack(self, key: str, shard: str) -> bytes:
        number = self.shard_numbers.get(shard)
        if number is None:
            number = self.shard_numbers[shard] = len(self.shards)
            self.shards.append(shard)
        return number.to_bytes(4, "little") + key.encode("utf-8", "surrogatepass")

    def _unpack(self, packed: bytes) -> tuple[str, str]:
        return packed[4:].decode("utf-8", "surrogatepass"), self.shards[int.from_bytes(packed[:4], "little")]

    def release(self, content_hash: str, key: str) -> None:
        d = digest(content_hash)
        owner = self.pending.get(d)
        if owner is not None and owner[0] == key:
            del self.pending[d]
            self.stats.released += 1

    def note(self, captioned: int, reused: int, recaptioned: int) -> None:
        self.stats.captioned += captioned
        self.stats.reused += reused
        self.stats.recaptioned += recaptioned

    def report(self) -> dict[str, int]:
        return {**self.stats.__dict__, "contents": len(self.pending) + len(self.results) + len(self.captioned),
                "results_held": len(self.results)}


class DedupIndexActor:
    """The index as an async Ray actor: calls run one at a time on its event loop, so no lock is needed, and a
    slow caller never holds the others (every method returns at once; waiting is the caller's)."""

    def __init__(self, max_results: int) -> None:
        self.index = ContentIndex(max_results=max_results)

    async def claim_many(self, items: list[tuple[str, str, str]]) -> list[tuple[Any, ...]]:
        return [self.index.claim(*item) for item in items]

    async def finish(self, published: list[tuple[str, str, str, Any]], released: list[tuple[str, str]],
                     counts: tuple[int, int, int] = (0, 0, 0)) -> None:
        for item in published:
            self.index.publish(*item)
        for content_hash, key in released:
            self.index.release(content_hash, key)
        self.index.note(*counts)

    async def report(self) -> dict[str, int]:
        return self.index.report()


def index_name(output_uri: str) -> str:
    """The index's Ray actor name for a run on `output_uri` (one run at a time holds an output's lease)."""
    return "pipeline-dedup-" + hashlib.sha256(output_uri.encode()).hexdigest()[:16]


def start_index(output_uri: str, max_results: int) -> Any:
    """Create the run's index actor (the driver, once per run); a leftover one of a previous run is replaced."""
    import ray

    name = index_name(output_uri)
    with contextlib.suppress(ValueError):
        ray.kill(ray.get_actor(name))
    actor = ray.remote(DedupIndexActor).options(name=name, num_cpus=0, max_restarts=0, lifetime=None)
    handle = actor.remote(max_results)
    ray.get(handle.report.remote())  # started before the first caption actor looks for it
    return handle


def stop_index(handle: Any) -> dict[str, int] | None:
    """The index's final counts, then the actor killed; None when it could not be asked."""
    import ray

    report = None
    try:
        report = ray.get(handle.report.remote(), timeout=30)
    except Exception as err:  # the counts are a report only
        log.warning("dedup index did not report: %s: %s", type(err).__name__, err)
    with contextlib.suppress(Exception):
        ray.kill(handle)
    return report


class IndexClient:
    """A caption actor's side of the index: claim, caption what is ours, copy what is published, wait (bounded)
    for the rest. Any failure to reach the index turns de-duplication off for the batch: every image is then
    captioned, none lost."""

    def __init__(self, handle: Any, wait_s: float, timeout_s: float = 60.0) -> None:
        self.handle, self.wait_s, self.timeout_s = handle, wait_s, timeout_s
        self.captioned = self.reused = 0

    @classmethod
    def connect(cls, output_uri: str, wait_s: float) -> IndexClient | None:
        import ray

        try:
            return cls(ray.get_actor(index_name(output_uri)), wait_s)
        except Exception:  # no index for this run (dedup off, or an actor used outside a run)
            return None

    def _call(self, method: str, *args: Any) -> Any:
        import ray

        return ray.get(getattr(self.handle, method).remote(*args), timeout=self.timeout_s)

    def caption(self, caption: Callable[[list[int]], list[Any]], keys: Sequence[str], shards: Sequence[str],
                hashes: Sequence[str | None], final: Callable[[Any], bool],
                pack: Callable[[Any], Any] = lambda result: result,
                unpack: Callable[[Any], Any] = lambda packed: packed) -> tuple[list[Any], list[str | None]]:
        """Results for every image (`caption(indices)` gives the engine's for those images), and for each the
        key whose captions it carries (None when captioned here for itself). `final(result)` says whether a
        result may be given to other keys (every mode captioned, none refused); `pack` makes it plain data for
        the index (no class of the caller's to import there), `unpack` turns it back."""
        count = len(keys)
        results: list[Any] = [None] * count
        duplicate_of: list[str | None] = [None] * count
        counts = [0, 0, 0]  # captioned, reused, recaptioned: not yet reported to the index

        def run(indices: list[int], owners: list[int]) -> None:
            if not indices:
                return
            try:
                for i, result in zip(indices, caption(indices), strict=True):
                    results[i] = result
            except BaseException:  # engine failure: waiters elsewhere take the images over
                self._finish([], [(hashes[i], keys[i]) for i in owners], counts)
                raise
            counts[0] += len(indices)
            self.captioned += len(indices)
            self._finish([(hashes[i], keys[i], shards[i], pack(results[i])) for i in owners if final(results[i])],
                         [(hashes[i], keys[i]) for i in owners if not final(results[i])], counts)
            counts[:] = [0, 0, 0]

        def sort(indices: list[int], answers: list[tuple[Any, ...]]) -> tuple[list[int], list[int], list[int]]:
            mine, again, waiting = [], [], []
            for i, answer in zip(indices, answers, strict=True):
                if answer[0] == MINE:
                    mine.append(i)
                elif answer[0] == RESULT:
                    results[i], duplicate_of[i] = unpack(answer[2]), answer[1]
                    counts[1] += 1
                    self.reused += 1
                elif answer[0] == KNOWN:
                    duplicate_of[i] = answer[1]
                    again.append(i)
                else:
                    waiting.append(i)
            counts[2] += len(again)
            return mine, again, waiting

        hashed = [i for i in range(count) if hashes[i]]
        try:
            answers = self._call("claim_many", [(hashes[i], keys[i], shards[i]) for i in hashed])
        except Exception as err:
            log.warning("dedup index unreachable, captioning this batch whole: %s: %s", type(err).__name__, err)
            return caption(list(range(count))), duplicate_of
        mine, again, waiting = sort(hashed, answers)
        run(sorted(mine + again + [i for i in range(count) if not hashes[i]]), mine)
        deadline = time.monotonic() + self.wait_s
        while waiting and time.monotonic() < deadline:
            time.sleep(POLL_S)
            try:
                answers = self._call("claim_many", [(hashes[i], keys[i], shards[i]) for i in waiting])
            except Exception as err:
                log.warning("dedup index unreachable while waiting: %s: %s", type(err).__name__, err)
                break
            mine, again, waiting = sort(waiting, answers)
            run(mine + again, mine)
        if waiting:  # held past the wait: captioned here, for this key alone (the owner may still publish)
            log.warning("dedup: %d duplicates waited %.0f s for their originals; captioning them here",
                        len(waiting), self.wait_s)
            counts[2] += len(waiting)
            run(waiting, [])
        self._finish([], [], counts)
        return results, duplicate_of

    def _finish(self, published: list[tuple[Any, ...]], released: list[tuple[Any, ...]], counts: list[int]) -> None:
        if not (published or released or any(counts)):
            return
        try:
            self._call("finish", published, released, tuple(counts))
        except Exception as err:  # waiters then caption their images themselves after their wait
            log.warning("dedup index unreachable, %d results not shared: %s: %s", len(published),
                        type(err).__name__, err)
