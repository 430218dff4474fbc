"""Shard commits, concurrent and off the driver's loop: on a bounded pool of commit threads, or as Ray tasks.

The driver's loop keeps books only: which keys of which shard have come back from the write stage. Once
all of a shard's keys have, it hands the shard to a commit (`compute.commit_threads` threads in the
driver by default, or `compute.commit_tasks` Ray tasks), which merges the shard's fragments, checks them
against the keys the read task recorded, writes the part file and then the marker, and clears the
shard's staging. A commit whose fragments are not exactly the shard's keys writes nothing: its staging is
cleared and the shard goes back to be redone. Results are taken back on the loop's thread, so the books,
the progress and the list of markers are only ever touched there. Shards commit independently, and a
shard is handed to a commit once per pass, so two commits never race on one shard.
bench/bench_machinery.py compares the three ways (loop, threads, tasks).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import RunConfig
from pipeline.config.limits import COMMIT_TASK_RETRIES
from pipeline.run.hooks import AFTER_PART_FILE, NO_HOOKS, RunHooks
from pipeline.run.progress import Progress
from pipeline.table.fragments import IncompleteShardError, merge_shard
from pipeline.table.lease import OutputLease
from pipeline.table.ledger import Ledger
from pipeline.table.manifest import RunMetadata
from pipeline.table.records import Marker
from pipeline.table.schema import output_schema

log = logging.getLogger("pipeline.run.commit")


@dataclass(frozen=True)
class CommitRequest:
    """Everything a commit task needs: which shard, where, and what to stamp on it."""

    shard: str
    output_uri: str
    storage_options: dict[str, Any]
    mode_names: list[str]
    metadata: RunMetadata  # the run's: stamped on the part file, its fingerprint on the marker
    keep_committed: bool  # re-captioning a committed shard's error rows: its other rows stay
    ready_at: float  # wall time the shard's last key reached the driver
    hooks: RunHooks = NO_HOOKS  # shipped with the request: a commit task calls them in its own process


@dataclass(frozen=True)
class CommitResult:
    shard: str
    marker: Marker | None
    refused: str | None = None  # why the fragments were not the shard's keys
    cpu_s: float = 0.0  # CPU the commit's own thread spent (merge, encode, write)


def commit_shard(request: CommitRequest) -> CommitResult:
    """Merge, check, write the part file, then the marker. Safe to run twice (a retried task)."""
    mark = time.thread_time()
    return dataclasses.replace(_commit(request), cpu_s=time.thread_time() - mark)


def _commit(request: CommitRequest) -> CommitResult:
    ledger = Ledger(request.output_uri, request.storage_options)
    if not request.keep_committed:
        done = ledger.marker(request.shard)  # a first attempt of this task got that far already
        if done is not None:
            return CommitResult(request.shard, done)
    schema = output_schema(request.mode_names)
    try:
        table = merge_shard(request.output_uri, request.storage_options, request.shard, schema,
                            request.metadata.to_dict(), keep_committed=request.keep_committed)
    except IncompleteShardError as err:
        ledger.clear_staging(request.shard)
        return CommitResult(request.shard, None, str(err))
    # The crash tests hold the commit here, a window too short to hit by polling, to kill the run in it.
    request.hooks.at(AFTER_PART_FILE)
    now = time.time()
    marker = Marker.of_table(request.shard, table, request.mode_names, fingerprint=request.metadata.fingerprint,
                             committed_at=now, commit_s=round(now - request.ready_at, 4))
    ledger.write_marker(marker)
    ledger.clear_staging(request.shard)
    return CommitResult(request.shard, marker)


@dataclass
class Committer:
    """The driver's books: keys arrived per shard; complete shards handed to commits running concurrently.

    A shard's size is learnt from its last row (the read task knows it only at the end of the shard)."""

    config: RunConfig
    ledger: Ledger
    progress: Progress
    lease: OutputLease | None = None
    retrying: set[str] = field(default_factory=set)  # committed shards whose error rows are redone
    arrived: dict[str, set[str]] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    committed: list[Marker] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)  # shard -> why its commit did not verify
    in_flight: dict[Any, str] = field(default_factory=dict)  # commit (thread future or Ray ref) -> shard
    handed: set[str] = field(default_factory=set)  # shards handed to a commit this pass
    commit_cpu_s: float = 0.0  # CPU the commits spent, wherever they ran
    hooks: RunHooks = NO_HOOKS  # handed to every commit (tests hold one at a named moment)
    metadata: RunMetadata | None = None  # the run's, made once by the driver; made here when not given

    def __post_init__(self) -> None:
        self.mode_names = [mode.name for mode in self.config.modes]
        if self.metadata is None:
            self.metadata = RunMetadata.of(self.config)
        self.tasks = self.config.compute.commit_tasks
        self.threads = 0 if self.tasks else self.config.compute.commit_threads
        self.limit = self.tasks or self.threads
        self._task: Any = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    @property
    def where(self) -> str:
        """Where commits run, in words (the summary says it)."""
        if self.tasks:
            return f"{self.tasks} Ray tasks"
        return f"{self.threads} driver threads" if self.threads else "the driver's loop"

    def add(self, shard: str, shard_size: int | None, keys: list[str]) -> None:
        if shard in self.handed:  # a repeated report of a shard already handed over (a retried task)
            log.debug("shard %s: %d keys reported again after its commit started; ignored", shard, len(keys))
            return
        seen = self.arrived.setdefault(shard, set())
        before = len(seen)
        seen.update(keys)
        self.progress.images_arrived(len(seen) - before)
        if shard_size is not None:
            self.sizes[shard] = shard_size
        if shard in self.sizes and len(seen) >= self.sizes[shard]:
            del self.arrived[shard], self.sizes[shard]
            self._submit(shard)
        if self.in_flight:
            self.collect(block=False)

    def _submit(self, shard: str) -> None:
        if self.lease is not None:
            self.lease.check()  # never start a commit beside a run that took the output over
        self.handed.add(shard)
        request = CommitRequest(shard, self.config.output.uri, self.config.output.storage_options, self.mode_names,
                                self.metadata, shard in self.retrying, time.time(), self.hooks)
        if self.limit == 0:
            self._done(commit_shard(request))
            return
        while len(self.in_flight) >= self.limit:
            self.collect(block=True)
        if self.tasks:
            self.in_flight[self._remote().remote(request)] = shard
        else:
            self.in_flight[self._threads().submit(commit_shard, request)] = shard

    def _remote(self) -> Any:
        if self._task is None:
            import ray

            # No CPU reserved: commits are short and mostly I/O, and `commit_tasks` bounds them; a CPU
            # request would queue them behind the read tasks that fill every CPU.
            self._task = ray.remote(num_cpus=0, max_retries=COMMIT_TASK_RETRIES)(commit_shard)
        return self._task

    def _threads(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(self.threads, thread_name_prefix="commit")
        return self._pool

    def collect(self, block: bool) -> None:
        """Take the results of commits that have finished (with `block`, wait for at least one). A commit
        that raised raises here, on the loop's thread, and ends the run as it would inline."""
        if not self.in_flight:
            return
        for handle in self._finished(list(self.in_flight), block):
            del self.in_flight[handle]
            self._done(self._result(handle))

    def _finished(self, handles: list[Any], block: bool) -> list[Any]:
        if self.tasks:
            import ray

            ready, _ = ray.wait(handles, num_returns=1 if block else len(handles), timeout=None if block else 0)
            return list(ready)
        if block:
            done, _ = concurrent.futures.wait(handles, return_when=concurrent.futures.FIRST_COMPLETED)
            return [handle for handle in handles if handle in done]  # in the order they were handed over
        return [handle for handle in handles if handle.done()]

    def _result(self, handle: Any) -> CommitResult:
        if self.tasks:
            import ray

            return ray.get(handle)
        return handle.result()

    def drain(self) -> None:
        while self.in_flight:
            self.collect(block=True)

    def close(self) -> None:
        """Wait for the commits in flight and stop the commit threads (every exit path of a run)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _done(self, result: CommitResult) -> None:
        self.commit_cpu_s += result.cpu_s
        if result.marker is None:
            log.warning("%s; not committed, it will be redone", result.refused)
            self.refused[result.shard] = result.refused or "refused"
            return
        log.debug("committed shard %s in %.3f s", result.shard, result.marker.commit_s or 0.0)
        self.committed.append(result.marker)
        self.progress.shard_done(result.marker)

    def take_unfinished(self) -> list[str]:
        """Shards of the last pass that did not commit (refused, or rows missing), cleared for a redo."""
        self.drain()
        shards = sorted({*self.refused, *self.arrived})
        for shard in self.arrived:
            self.ledger.clear_staging(shard)
        self.handed.difference_update(shards)
        self.refused, self.arrived, self.sizes = {}, {}, {}
        return shards
