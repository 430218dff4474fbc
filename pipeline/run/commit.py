"""Shard commits, concurrent and off the driver's loop: on a bounded pool of commit threads, or as Ray tasks.

The driver's loop keeps books only: which keys of which shard have come back from the write stage. Once
all of a shard's keys have, it hands the shard to a commit (`compute.commit_threads` threads in the
driver by default, or `compute.commit_tasks` Ray tasks), which merges this run's fragments of the shard,
checks them against the keys this run's read task recorded, writes the part file and then the marker, and
clears the shard's staging. A commit whose fragments are not exactly the shard's keys writes nothing: its
staging is cleared and the shard goes back to be redone. Results are taken back on the loop's thread, so
the books, the progress and the list of markers are only ever touched there. Shards commit independently,
and a shard is handed to a commit once per pass, so two commits of one run never race on one shard.
bench/bench_machinery.py compares the three ways (loop, threads, tasks).

A commit, step by step (each write fenced: the run's lease must be provably its own right before it):
  1. read the shard's marker (and its version). One of this run's (its holder is the run id) means a
     retried commit got that far: done. One of another config's fingerprint is not done: it is redone.
  2. merge and check this run's fragments (keeping the committed rows a `--retry-errors` redo keeps).
  3. write the part file: a first commit creates `part-<shard>.parquet` only if no file has that name
     (If-None-Match on S3, link() locally), else, and for every redo, it writes `part-<shard>-<run>.parquet`,
     a name only this run writes, so the committed pair is never touched.       [moment after_part_file]
  4. publish the marker naming that part: created if there was none, else replacing exactly the version
     read in step 1 (If-Match on S3; a compare under the output's lock file locally).  [moment after_marker]
  5. remove the part file the old marker named (and a first name taken by someone else's file), then
     the shard's staging.
A kill between any two steps leaves the old pair or the new pair; part files no marker names are removed
by the next run before it starts (ledger.remove_uncommitted_parts). Every storage call is retried on
transient errors (pipeline.io.retry); a commit task that still fails with TransientStorageError is run
again by Ray, which is safe (step 1).

Fences: commit threads share the driver's OutputLease (`check()`: the local clock against its last
renewal). A Ray-task commit runs in another process, so it carries a StoredLeaseFence, which reads the lease
record and checks holder id and expiry against the clock (pipeline.table.lease says why that over a
deadline carried from the driver). A refused fence raises LeaseLostError: nothing more is written and the
run stops in one line.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import RunConfig
from pipeline.config.limits import COMMIT_TASK_RETRIES
from pipeline.engine.metrics import shard_committed
from pipeline.io.fs import TransientStorageError
from pipeline.run.hooks import AFTER_MARKER, AFTER_PART_FILE, NO_HOOKS, RunHooks
from pipeline.run.progress import Progress
from pipeline.table.fragments import IncompleteShardError, merge_shard, parquet_bytes
from pipeline.table.lease import LeaseLostError, OutputLease
from pipeline.table.ledger import NO_FENCE, Fence, Ledger, StoredMarker
from pipeline.table.manifest import RunMetadata
from pipeline.table.names import part_name
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
    run_id: str | None = None  # the run's (its lease's holder id): whose fragments, stamped on the marker
    fence: Fence | None = None  # proves the lease before each write (None: nothing to prove, tests)


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
    fence, fingerprint = request.fence or NO_FENCE, request.metadata.fingerprint
    seen = ledger.read_marker(request.shard)
    if seen is not None and _done_already(seen.marker, request):
        return CommitResult(request.shard, seen.marker)
    if seen is not None and not seen.marker.made_with(fingerprint):
        log.info("shard %s: its marker was written under config fingerprint %s, not this run's %s: not done, "
                 "redone and replaced", request.shard, seen.marker.fingerprint, fingerprint)
    if request.keep_committed and (seen is None or not seen.marker.made_with(fingerprint)):
        raise RuntimeError(f"shard {request.shard}: its committed rows changed while this run redid its error "
                           "rows (another run wrote its marker); nothing written: re-run to redo the shard whole")
    try:
        table = merge_shard(request.output_uri, request.storage_options, request.shard,
                            output_schema(request.mode_names), request.metadata.to_dict(),
                            keep_committed=request.keep_committed, run_id=request.run_id,
                            committed_part=seen.marker.part_file() if request.keep_committed and seen else None)
    except IncompleteShardError as err:
        ledger.clear_staging(request.shard)
        return CommitResult(request.shard, None, str(err))
    name, displaced = _write_part(ledger, request, seen, parquet_bytes(table), fence)
    # The crash tests hold the commit here, a window too short to hit by polling, to kill the run in it.
    request.hooks.at(AFTER_PART_FILE)
    now = time.time()
    marker = Marker.of_table(request.shard, table, request.mode_names, fingerprint=fingerprint, committed_at=now,
                             commit_s=round(now - request.ready_at, 4), holder=request.run_id, part=name)
    ledger.publish_marker(marker, seen, fence)
    request.hooks.at(AFTER_MARKER)
    for old in displaced:
        if old != name:
            ledger.remove_part(old)
    ledger.clear_staging(request.shard)
    return CommitResult(request.shard, marker)


def _done_already(marker: Marker, request: CommitRequest) -> bool:
    """Whether the shard's marker is this commit's own work (a retried task, or a retried commit that got
    as far as its marker). Without a run id (a test's commit) any marker of the config counts, unless the
    commit redoes error rows."""
    if request.run_id is not None:
        return marker.holder == request.run_id
    return not request.keep_committed and marker.made_with(request.metadata.fingerprint)


def _write_part(ledger: Ledger, request: CommitRequest, seen: StoredMarker | None, data: bytes,
                fence: Fence) -> tuple[str, list[str]]:
    """Write the shard's new part file (step 3 of the module docstring); return its name and the names of
    the part files to remove once the marker names the new one."""
    tag = request.run_id or uuid.uuid4().hex
    if seen is None:
        first = part_name(request.shard)
        if ledger.create_part(first, data, fence):
            return first, []
        # Taken: a part file a run that lost the output wrote late, or this commit's own earlier attempt.
        # No marker names it; once ours names our own, it goes.
        log.info("shard %s: %s exists without a marker; writing this run's part under its own name",
                 request.shard, first)
        name = part_name(request.shard, tag)
        ledger.write_part(name, data, fence)
        return name, [first]
    name = part_name(request.shard, tag)
    if name == seen.marker.part_file():  # never write over the committed part (a 48-bit tag collision)
        name = part_name(request.shard, uuid.uuid4().hex)
    ledger.write_part(name, data, fence)
    return name, [seen.marker.part_file()]


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
    run_id: str | None = None  # whose fragments commits merge; default the lease's holder id

    def __post_init__(self) -> None:
        self.mode_names = [mode.name for mode in self.config.modes]
        if self.run_id is None and self.lease is not None:
            self.run_id = self.lease.holder
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

    def _fence(self) -> Fence | None:
        """What a commit proves the lease with: the lease itself on the driver's threads, a fence that reads
        the stored record in a Ray task (another process)."""
        if self.lease is None:
            return None
        return self.lease.fence() if self.tasks else self.lease

    def _submit(self, shard: str) -> None:
        if self.lease is not None:
            self.lease.check()  # never start a commit beside a run that took the output over
        self.handed.add(shard)
        request = CommitRequest(shard, self.config.output.uri, self.config.output.storage_options, self.mode_names,
                                self.metadata, shard in self.retrying, time.time(), self.hooks, self.run_id,
                                self._fence())
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
            # request would queue them behind the read tasks that fill every CPU. Storage trouble that
            # outlived a commit's own retries runs it again (safe: it finds its marker or redoes it whole).
            self._task = ray.remote(num_cpus=0, max_retries=COMMIT_TASK_RETRIES,
                                    retry_exceptions=[TransientStorageError])(commit_shard)
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

            try:
                return ray.get(handle)
            except LeaseLostError as err:  # Ray's wrapper of the task's error: its message is a traceback
                cause = getattr(err, "cause", None)
                raise LeaseLostError(str(cause if isinstance(cause, LeaseLostError) else err)) from None
        return handle.result()

    def drain(self) -> None:
        while self.in_flight:
            self.collect(block=True)

    def close(self) -> None:
        """Wait until every commit this committer started has ended, on threads and as Ray tasks alike, and
        stop the commit threads (every exit path of a run: the driver releases its lease only after this, so
        no commit of this run is still writing when another run may take the output over). Outcomes are not
        taken: on these paths the run is ending with another error."""
        handles, self.in_flight = list(self.in_flight), {}
        if handles and self.tasks:
            import ray

            ray.wait(handles, num_returns=len(handles), timeout=None, fetch_local=False)
        elif handles:
            concurrent.futures.wait(handles)
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
        shard_committed(result.marker.commit_s)  # Ray's metrics endpoint (engine/metrics.py)

    def take_unfinished(self) -> list[str]:
        """Shards of the last pass that did not commit (refused, or rows missing), cleared for a redo."""
        self.drain()
        shards = sorted({*self.refused, *self.arrived})
        for shard in self.arrived:
            self.ledger.clear_staging(shard)
        self.handed.difference_update(shards)
        self.refused, self.arrived, self.sizes = {}, {}, {}
        return shards
