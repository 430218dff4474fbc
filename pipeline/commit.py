"""Shard commits: on the driver's thread, or as Ray tasks off it.

The driver keeps books: which keys of which shard have come back from the write stage. Once all of a
shard's keys have, it commits the shard, or hands it to a commit task (a Ray task, `compute.commit_tasks`
of them in flight at most), which merges the shard's fragments, checks them against the keys the read task
recorded, writes the part file and then the marker, and clears the shard's staging. A commit whose
fragments are not exactly the shard's keys writes nothing: its staging is cleared and the shard goes
back to be redone. With `compute.commit_tasks: 0` (the default) the same function runs on the driver's
thread, which measured faster on a small node (bench/bench_machinery.py compares the two).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import RunConfig
from pipeline.lease import OutputLease
from pipeline.ledger import Ledger
from pipeline.manifest import run_metadata
from pipeline.progress import Progress
from pipeline.records import Marker
from pipeline.sink import IncompleteShardError, merge_shard, output_schema

log = logging.getLogger("pipeline.commit")


def _failpoint(name: str) -> None:
    """Hold the commit at a named moment when PIPELINE_FAILPOINT=name:seconds is set: the crash tests use it
    to SIGKILL a run exactly there (between a part file and its marker), a window too short to hit by
    polling. Unset, it costs one dictionary look-up."""
    setting = os.environ.get("PIPELINE_FAILPOINT", "")
    if setting.partition(":")[0] == name:
        time.sleep(float(setting.partition(":")[2] or 1))


@dataclass(frozen=True)
class CommitRequest:
    """Everything a commit task needs: which shard, where, and what to stamp on it."""

    shard: str
    output_uri: str
    storage_options: dict[str, Any]
    mode_names: list[str]
    metadata: dict[str, Any]
    keep_committed: bool  # re-captioning a committed shard's error rows: its other rows stay
    ready_at: float  # wall time the shard's last key reached the driver


@dataclass(frozen=True)
class CommitResult:
    shard: str
    marker: Marker | None
    refused: str | None = None  # why the fragments were not the shard's keys


def commit_shard(request: CommitRequest) -> CommitResult:
    """Merge, check, write the part file, then the marker. Safe to run twice (a retried task)."""
    ledger = Ledger(request.output_uri, request.storage_options)
    if not request.keep_committed:
        done = ledger.marker(request.shard)  # a first attempt of this task got that far already
        if done is not None:
            return CommitResult(request.shard, done)
    schema = output_schema(request.mode_names)
    try:
        table = merge_shard(request.output_uri, request.storage_options, request.shard, schema,
                            request.metadata, keep_committed=request.keep_committed)
    except IncompleteShardError as err:
        ledger.clear_staging(request.shard)
        return CommitResult(request.shard, None, str(err))
    _failpoint("after_part_file")
    now = time.time()
    marker = Marker.of_table(request.shard, table, request.mode_names, fingerprint=request.metadata["fingerprint"],
                             committed_at=now, commit_s=round(now - request.ready_at, 4))
    ledger.write_marker(marker)
    ledger.clear_staging(request.shard)
    return CommitResult(request.shard, marker)


@dataclass
class Committer:
    """The driver's books: keys arrived per shard; complete shards handed to commit tasks.

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
    in_flight: dict[Any, str] = field(default_factory=dict)  # commit task -> shard

    def __post_init__(self) -> None:
        self.mode_names = [mode.name for mode in self.config.modes]
        self.metadata = run_metadata(self.config)
        self.limit = self.config.compute.commit_tasks
        self._task: Any = None

    def add(self, shard: str, shard_size: int | None, keys: list[str]) -> None:
        seen = self.arrived.setdefault(shard, set())
        before = len(seen)
        seen.update(keys)
        self.progress.images_arrived(len(seen) - before)
        if shard_size is not None:
            self.sizes[shard] = shard_size
        if shard in self.sizes and len(seen) >= self.sizes[shard]:
            del self.arrived[shard], self.sizes[shard]
            self._submit(shard)
        elif self.in_flight:
            self.collect(block=False)

    def _submit(self, shard: str) -> None:
        if self.lease is not None:
            self.lease.check()  # never start a commit beside a run that took the output over
        request = CommitRequest(shard, self.config.output.uri, self.config.output.storage_options, self.mode_names,
                                self.metadata, shard in self.retrying, time.time())
        if self.limit == 0:
            self._done(commit_shard(request))
            return
        while len(self.in_flight) >= self.limit:
            self.collect(block=True)
        self.in_flight[self._remote().remote(request)] = shard

    def _remote(self) -> Any:
        if self._task is None:
            import ray

            # No CPU reserved: commits are short and mostly I/O, and `commit_tasks` bounds them; a CPU
            # request would queue them behind the read tasks that fill every CPU.
            self._task = ray.remote(num_cpus=0, max_retries=3)(commit_shard)
        return self._task

    def collect(self, block: bool) -> None:
        """Take the results of commit tasks that have finished (with `block`, wait for at least one)."""
        if not self.in_flight:
            return
        import ray

        refs = list(self.in_flight)
        ready, _ = ray.wait(refs, num_returns=1 if block else len(refs), timeout=None if block else 0)
        for ref in ready:
            del self.in_flight[ref]
            self._done(ray.get(ref))

    def drain(self) -> None:
        while self.in_flight:
            self.collect(block=True)

    def _done(self, result: CommitResult) -> None:
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
        self.refused, self.arrived, self.sizes = {}, {}, {}
        return shards
