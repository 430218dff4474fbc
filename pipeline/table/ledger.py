"""What is done: the run manifest, the shard plan, and one commit marker per shard.

Layout of an output folder (every name the pipeline writes, all of them in names.py; it touches nothing else):
    _lease.json               the single-writer lease of the run writing now (lease.py)
    _manifest.json            resolved config, fingerprint, model and engine versions
    _plan/<shard>.json        the shard plan written before any work (and _plan/_complete.json)
    _staging/<shard>/...      caption fragments of shards in progress (never read as output)
    data/part-<shard>.parquet the table, one file per committed shard
    _markers/<shard>.json     written last: the shard is done only once its marker exists

Resume skips shards with markers before anything is read, and clears staging and part files of the
others. Names that start with `_` or `.` are ignored by Parquet readers, so `data/` reads as the table.
A folder that is not a pipeline output is refused unless the user allows writing beside other files,
and even then a folder whose own `data/`, `_plan/`, ... would be mixed with the pipeline's is refused.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pipeline.io.fs import (
    TEMPORARY_PREFIX,
    is_local,
    join,
    list_names,
    open_fs,
    read_bytes,
    remove_tree,
    to_uri,
    write_atomic,
)
from pipeline.io.sources import Shard
from pipeline.table.names import (
    DATA,
    FOLDERS,
    LEASE,
    MARKERS,
    PART_FILE,
    PLAN,
    RESERVED,
    SHARD_FILE,
    SHARD_ID,
    STAGING,
    manifest_path,
    marker_path,
    part_path,
    plan_done_path,
    plan_path,
    shard_of_file,
    staging_dir,
)
from pipeline.table.records import Marker


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
        write_atomic(self.fs, path, json.dumps(value, indent=1, ensure_ascii=False).encode())

    def _read_json(self, path: str) -> dict[str, Any] | None:
        try:
            return json.loads(read_bytes(self.fs, path))
        except FileNotFoundError:
            return None

    # Ownership -------------------------------------------------------------------------------
    def check_target(self, allow_existing: bool = False) -> None:
        """Refuse a folder that is not a pipeline output and holds anything but our lease."""
        if self.manifest() is not None:
            return
        # Hidden names (.DS_Store, a run's temporary files, the lease lock) are nobody's data.
        names = [name for name in list_names(self.fs, self.root) if name != LEASE and not name.startswith(".")]
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
        remove_tree(self.fs, manifest_path(self.root))
        self._remove_empty_folders()

    def _remove_matching(self, folder: str, pattern: re.Pattern[str]) -> int:
        names = [name for name in list_names(self.fs, self._path(folder)) if pattern.match(name)]
        for name in names:
            remove_tree(self.fs, self._path(folder, name))
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
        remove_tree(self.fs, plan_done_path(self.root))
        self._remove_matching(PLAN, SHARD_FILE)

    def write_plan(self, shards: Iterable[Shard], workers: int = 16, grown_from: dict[str, Any] | None = None,
                   **facts: Any) -> dict[str, Any]:
        """Store every shard's plan (in parallel, a bounded window at a time), then the completion file.

        `grown_from` is the completion summary of the plan these shards extend (a grown input)."""
        count, images, window = 0, 0, []
        with ThreadPoolExecutor(workers) as pool:
            for shard in shards:
                window.append(pool.submit(write_atomic, self.fs, self.plan_path(shard.id),
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
        for name in list_names(self.fs, self._path(PLAN)):
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
                for text in pool.map(lambda path: read_bytes(self.fs, path), paths):
                    yield Shard.from_json(text.decode())

    # Markers ---------------------------------------------------------------------------------
    def committed_ids(self) -> set[str]:
        return {shard_of_file(name) for name in list_names(self.fs, self._path(MARKERS)) if SHARD_FILE.match(name)}

    def write_marker(self, marker: Marker) -> None:
        self._write_json(marker_path(self.root, marker.shard), marker.to_dict())

    def marker(self, shard_id: str) -> Marker | None:
        found = self._read_json(marker_path(self.root, shard_id))
        return None if found is None else Marker.from_dict(found)

    def markers(self) -> list[Marker]:
        paths = [marker_path(self.root, shard) for shard in sorted(self.committed_ids())]
        contents = self.fs.cat(paths) if paths else {}
        return [Marker.from_dict(json.loads(contents[path])) for path in paths if path in contents]

    def uncommit(self, shard_id: str) -> None:
        """Make a committed shard pending again: marker first, then its part file, so that a run killed
        in between leaves a shard with no marker (redone) rather than a marker with no rows."""
        for path in (marker_path(self.root, shard_id), part_path(self.root, shard_id)):
            remove_tree(self.fs, path)

    def remove_uncommitted_parts(self, committed: set[str]) -> int:
        """Delete part files with no marker (a run killed between part and marker) and temporary files a
        killed local write left in `data/`, so that `data/` holds committed shards only."""
        stale = []
        for name in list_names(self.fs, self._path(DATA)):
            match = PART_FILE.match(name)
            if match and (name.startswith(TEMPORARY_PREFIX) or match.group(1) not in committed):
                stale.append(name)
        for name in stale:
            remove_tree(self.fs, self._path(DATA, name))
        return len(stale)

    def clear_staging(self, shard_id: str | None = None) -> None:
        if shard_id is not None:
            remove_tree(self.fs, staging_dir(self.root, shard_id))
            return
        for name in list_names(self.fs, self._path(STAGING)):
            if SHARD_ID.fullmatch(name):
                remove_tree(self.fs, staging_dir(self.root, name))
