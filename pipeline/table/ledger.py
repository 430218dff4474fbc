"""What is done: the run manifest, the shard plan, and one commit marker per shard.

Layout of an output folder (every name the pipeline writes, all of them in names.py; it touches nothing else):
    _lease.json               the single-writer lease of the run writing now (lease.py)
    _manifest.json            resolved config, fingerprint, model and engine versions
    _plan/<shard>.json        the shard plan written before any work (and _plan/_complete.json)
    _staging/<shard>/<run>/.. caption fragments of shards in progress, per run (never read as output)
    data/part-<shard>[-<run>].parquet the table, one file per committed shard, named by its marker
    _markers/<shard>.json     written last: the shard is done only once its marker exists

Resume skips shards with markers of the run's fingerprint before anything is read, and clears staging and
the part files no marker names. Names that start with `_` or `.` are ignored by Parquet readers, so `data/`
reads as the table once a run has finished (while one runs, or after a kill, readers go by the markers).
A folder that is not a pipeline output is refused unless the user allows writing beside other files,
and even then a folder whose own `data/`, `_plan/`, ... would be mixed with the pipeline's is refused.

Commits (run/commit.py) write through `create_part`, `write_part` and `publish_marker`: each is fenced (the
caller's lease must still be provably its own right before the write, pipeline.table.lease) and
conditional where two writers could meet: a part's first name is created only if absent, and a marker is
created only if absent or replaced only if it is still the version the commit read (If-None-Match /
If-Match on S3, link() and a compare under the output's lock file locally). Every storage call here is
retried on transient errors with the read path's policy (pipeline.io.retry); one that never clears raises
TransientStorageError and leaves nothing half-committed.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from pipeline.io.conditional import conditional_file
from pipeline.io.fs import (
    TEMPORARY_PREFIX,
    is_local,
    join,
    list_names,
    open_fs,
    read_bytes,
    remove_tree,
    retrying,
    to_uri,
    write_atomic,
)
from pipeline.io.sources import Shard
from pipeline.table.names import (
    DATA,
    FOLDERS,
    LEASE,
    LEASE_LOCK,
    MARKERS,
    PART_FILE,
    PLAN,
    RESERVED,
    SHARD_FILE,
    SHARD_ID,
    STAGING,
    manifest_path,
    marker_path,
    plan_done_path,
    plan_path,
    shard_of_file,
    staging_dir,
)
from pipeline.table.records import Marker

log = logging.getLogger("pipeline.table.ledger")
MARKER_ROUNDS = 5  # compare-and-swap rounds a marker write tries when the marker changed under it


class Fence(Protocol):
    """Proves, right before a write, that the writer still holds the output's lease (pipeline.table.lease:
    OutputLease, StoredLeaseFence); raises LeaseLostError otherwise."""

    def check(self) -> None: ...


class NoFence:
    """No lease to prove (a test's commit, with no run around it)."""

    def check(self) -> None:
        return None


NO_FENCE = NoFence()


@dataclass(frozen=True)
class StoredMarker:
    """A marker as read, with the version a conditional replace of it must name (S3: its ETag)."""

    marker: Marker
    version: Any


class FingerprintMismatchError(RuntimeError):
    """The output was made with a different config."""


class ForeignOutputError(RuntimeError):
    """The output folder holds files the pipeline did not write."""


class Ledger:
    def __init__(self, output_uri: str, storage_options: dict[str, Any] | None = None) -> None:
        self.fs, self.root = open_fs(output_uri, storage_options)

    @property
    def uri(self) -> str:
        return to_uri(self.fs, self.root)

    def _path(self, *parts: str) -> str:
        return join(self.root, *parts)

    def _write_json(self, path: str, value: dict[str, Any]) -> None:
        retrying(write_atomic, self.fs, path, _json_bytes(value))

    def _read_json(self, path: str) -> dict[str, Any] | None:
        try:
            return json.loads(retrying(read_bytes, self.fs, path))
        except FileNotFoundError:
            return None

    def _list(self, *parts: str) -> list[str]:
        return retrying(list_names, self.fs, self._path(*parts))

    def _remove(self, path: str) -> None:
        retrying(remove_tree, self.fs, path)

    # Ownership -------------------------------------------------------------------------------
    def check_target(self, allow_existing: bool = False) -> None:
        """Refuse a folder that is not a pipeline output and holds anything but our lease."""
        if self.manifest() is not None:
            return
        # Hidden names (.DS_Store, a run's temporary files, the lease lock) are nobody's data.
        names = [name for name in self._list() if name != LEASE and not name.startswith(".")]
        clashes = [name for name in names if name in RESERVED]
        if clashes:
            raise ForeignOutputError(
                f"{self.uri} is not a pipeline output but already holds {', '.join(clashes)}, names the "
                "pipeline writes its table and plan under; write the output to another folder")
        if names and not allow_existing:
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            raise ForeignOutputError(
                f"{self.uri} is not empty and not a pipeline output (it holds {shown}). Write to an empty "
                "folder, or pass --allow-existing to write beside those files (the pipeline only ever "
                "touches the files it writes)")

    # Manifest and fingerprint -------------------------------------------------------------
    def manifest(self) -> dict[str, Any] | None:
        return self._read_json(manifest_path(self.root))

    def check_fingerprint(self, fingerprint: str) -> bool:
        """True if resuming; raise FingerprintMismatchError if the output belongs to another config."""
        manifest = self.manifest()
        if manifest is None:
            return False
        if manifest.get("fingerprint") != fingerprint:
            raise FingerprintMismatchError(
                f"{self.uri} was made with config fingerprint {manifest.get('fingerprint')}, this config's is "
                f"{fingerprint} (model, modes, prompts, sampling, input or seed changed). Write to another "
                f"output, or use --overwrite to start over: it would delete {self.describe_contents()}, and "
                "nothing else in the folder.")
        return True

    def describe_contents(self) -> str:
        markers = self.markers()
        rows = sum(marker.rows for marker in markers)
        return (f"{len(markers)} committed shards ({rows} rows) under data/, with the run's plan, markers, "
                "staging and manifest")

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        self._write_json(manifest_path(self.root), manifest)

    def wipe(self) -> None:
        """Remove what runs wrote here (for --overwrite): markers first, so that a wipe cut short leaves
        nothing that counts as done, the manifest last, so that it still reads as an output."""
        self._remove_matching(MARKERS, SHARD_FILE)
        self._remove_matching(DATA, PART_FILE)
        self.clear_staging()
        self.remove_plan()
        self._remove(manifest_path(self.root))
        self._remove_empty_folders()

    def _remove_matching(self, folder: str, pattern: re.Pattern[str]) -> int:
        names = [name for name in self._list(folder) if pattern.match(name)]
        for name in names:
            self._remove(self._path(folder, name))
        return len(names)

    def _remove_empty_folders(self) -> None:
        if not is_local(self.fs):
            return  # object stores have no folders
        for folder in FOLDERS:
            path = self._path(folder)
            if self.fs.isdir(path) and not list_names(self.fs, path):
                remove_tree(self.fs, path)

    # Plan ------------------------------------------------------------------------------------
    def plan_complete(self) -> dict[str, Any] | None:
        return self._read_json(plan_done_path(self.root))

    def remove_plan(self) -> None:
        self._remove(plan_done_path(self.root))
        self._remove_matching(PLAN, SHARD_FILE)

    def write_plan(self, shards: Iterable[Shard], workers: int = 16, grown_from: dict[str, Any] | None = None,
                   **facts: Any) -> dict[str, Any]:
        """Store every shard's plan (in parallel, a bounded window at a time), then the completion file.

        `grown_from` is the completion summary of the plan these shards extend (a grown input)."""
        count, images, window = 0, 0, []
        with ThreadPoolExecutor(workers) as pool:
            for shard in shards:
                window.append(pool.submit(retrying, write_atomic, self.fs, self.plan_path(shard.id),
                                          shard.to_json().encode()))
                count, images = count + 1, images + (shard.size or 0)
                if len(window) >= 4 * workers:
                    for future in window:
                        future.result()
                    window = []
            for future in window:
                future.result()
        base = grown_from or {"shards": 0, "images_known": 0}
        summary = {**base, **facts, "shards": base["shards"] + count, "images_known": base["images_known"] + images,
                   "planned_at": time.time()}
        if grown_from is not None:
            summary["grown"] = [*grown_from.get("grown", []), {"at": summary["planned_at"], "shards": count,
                                                               "images_known": images, **facts}]
        self._write_json(plan_done_path(self.root), summary)
        return summary

    def planned_ids(self) -> Iterator[str]:
        for name in self._list(PLAN):
            if SHARD_FILE.match(name):
                yield shard_of_file(name)

    def plan_path(self, shard_id: str) -> str:
        return plan_path(self.root, shard_id)

    def planned_shards(self, workers: int = 16) -> Iterator[Shard]:
        """Every planned shard in id order, read a bounded window at a time."""
        ids = list(self.planned_ids())
        window = 4 * workers
        with ThreadPoolExecutor(workers) as pool:
            for start in range(0, len(ids), window):
                paths = [self.plan_path(shard_id) for shard_id in ids[start:start + window]]
                for text in pool.map(lambda path: retrying(read_bytes, self.fs, path), paths):
                    yield Shard.from_json(text.decode())

    # Markers ---------------------------------------------------------------------------------
    def committed_ids(self) -> set[str]:
        """Shards with a marker, whatever its fingerprint (a listing only; `markers(fingerprint)` to judge them)."""
        return {shard_of_file(name) for name in self._list(MARKERS) if SHARD_FILE.match(name)}

    def write_marker(self, marker: Marker) -> None:
        """Write a marker unconditionally (tests and tools; commits use `publish_marker`)."""
        self._write_json(marker_path(self.root, marker.shard), marker.to_dict())

    def marker(self, shard_id: str) -> Marker | None:
        found = self._read_json(marker_path(self.root, shard_id))
        return None if found is None else Marker.from_dict(found)

    def read_marker(self, shard_id: str) -> StoredMarker | None:
        """A shard's marker with its version, for a conditional replace (`publish_marker`)."""
        found = retrying(self._marker_file(shard_id).read, what=marker_path(self.root, shard_id))
        return None if found is None else StoredMarker(Marker.from_dict(json.loads(found[0])), found[1])

    def markers(self, fingerprint: str | None = None) -> list[Marker]:
        """Every marker in shard order; with `fingerprint`, only those that count as done for that config
        (`Marker.made_with`: a marker of another fingerprint does not)."""
        paths = [marker_path(self.root, shard) for shard in sorted(self.committed_ids())]
        try:  # one batched read (concurrent on S3)
            contents = self.fs.cat(paths, on_error="return") if paths else {}
        except OSError:  # read one by one below, each retried
            contents = {}
        markers = []
        for path in paths:
            data = contents.get(path) if isinstance(contents, dict) else None
            if isinstance(data, BaseException) or data is None:
                try:  # a transient error in the batch read: read it again, retried; gone meanwhile: skipped
                    data = retrying(read_bytes, self.fs, path)
                except FileNotFoundError:
                    continue
            markers.append(Marker.from_dict(json.loads(data)))
        return [marker for marker in markers if marker.made_with(fingerprint)]

    def judge_markers(self, fingerprint: str) -> tuple[list[Marker], list[Marker]]:
        """Every marker, split into those that count as done for config `fingerprint` and those of another
        config (each of those named in the log)."""
        every = self.markers()
        foreign = [marker for marker in every if not marker.made_with(fingerprint)]
        for marker in foreign:
            log.info("shard %s: its marker was written under config fingerprint %s (holder %s), not %s: it does "
                     "not count as committed", marker.shard, marker.fingerprint, marker.holder, fingerprint)
        return [marker for marker in every if marker.made_with(fingerprint)], foreign

    def _marker_file(self, shard_id: str) -> Any:
        return conditional_file(self.fs, marker_path(self.root, shard_id), lock=self._path(LEASE_LOCK))

    def part_path(self, name: str) -> str:
        return self._path(DATA, name)

    def create_part(self, name: str, data: bytes, fence: Fence = NO_FENCE) -> bool:
        """Write part file `name` only if no file has that name (fenced); False if one has. A retried write
        whose first attempt landed also reads as False: the caller then writes under its run's own name."""
        target = conditional_file(self.fs, self.part_path(name))

        def attempt() -> Any:
            fence.check()
            return target.create_exclusive(data)

        return retrying(attempt, what=self.part_path(name)) is not None

    def write_part(self, name: str, data: bytes, fence: Fence = NO_FENCE) -> None:
        """Write part file `name`, replacing one there (fenced): for names only one run ever writes."""

        def attempt() -> None:
            fence.check()
            write_atomic(self.fs, self.part_path(name), data)

        retrying(attempt, what=self.part_path(name))

    def publish_marker(self, marker: Marker, seen: StoredMarker | None, fence: Fence = NO_FENCE) -> None:
        """Make `marker` the shard's marker: created if `seen` is None, else replacing exactly the version
        `seen` read (so a marker written meanwhile under another holder is never overwritten blindly). Each
        attempt is fenced after the version it names was read. If the marker changed meanwhile, it is read
        again and the swap retried against what is there; one that is already `marker` (a retried write
        that had landed) counts as written."""
        target = self._marker_file(marker.shard)
        data, where = _json_bytes(marker.to_dict()), marker_path(self.root, marker.shard)
        version = None if seen is None else seen.version
        for _ in range(MARKER_ROUNDS):
            fence.check()
            if version is None:
                written = retrying(target.create_exclusive, data, what=where)
            else:
                written = retrying(target.replace_if, version, data, what=where)
            if written is not None:
                return
            current = retrying(target.read, what=where)
            if current is not None and _same_commit(Marker.from_dict(json.loads(current[0])), marker):
                return
            if current is not None:
                log.info("shard %s: its marker changed during the commit (now %s); replacing it",
                         marker.shard, Marker.from_dict(json.loads(current[0])).holder)
            version = None if current is None else current[1]
        raise RuntimeError(f"{to_uri(self.fs, where)} kept changing while this run committed shard {marker.shard}")

    def remove_part(self, name: str) -> None:
        self._remove(self.part_path(name))

    def uncommit(self, shard_id: str) -> None:
        """Make a committed shard pending again: marker first, then the part file it names, so that a run
        killed in between leaves a shard with no marker (redone) rather than a marker with no rows."""
        found = self.marker(shard_id)
        self._remove(marker_path(self.root, shard_id))
        self.remove_part(found.part_file() if found is not None else Marker(shard_id).part_file())

    def remove_uncommitted_parts(self, markers: Iterable[Marker]) -> int:
        """Delete part files no marker in `markers` names (a run killed between part and marker, a replaced
        pair's old part, a part a frozen run wrote late) and temporary files a killed local write left in
        `data/`, so that `data/` holds committed shards only."""
        named = {marker.part_file() for marker in markers}
        stale = [name for name in self._list(DATA)
                 if PART_FILE.match(name) and (name.startswith(TEMPORARY_PREFIX) or name not in named)]
        for name in stale:
            self.remove_part(name)
        return len(stale)

    def clear_staging(self, shard_id: str | None = None) -> None:
        """Remove a shard's staging (every run's fragments of it), or all staging."""
        if shard_id is not None:
            self._remove(staging_dir(self.root, shard_id))
            return
        for name in self._list(STAGING):
            if SHARD_ID.fullmatch(name):
                self._remove(staging_dir(self.root, name))


def _json_bytes(value: dict[str, Any]) -> bytes:
    return json.dumps(value, indent=1, ensure_ascii=False).encode()


def _same_commit(found: Marker, ours: Marker) -> bool:
    """Whether the stored marker `found` is `ours` (a retried write of it landed)."""
    if ours.holder is not None:
        return found.holder == ours.holder and found.part_file() == ours.part_file()
    return found == ours
