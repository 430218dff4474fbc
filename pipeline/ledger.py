"""What is done: the run manifest, the shard plan, and one commit marker per shard.

Layout of an output folder:
    _manifest.json            resolved config, fingerprint, model and engine versions
    _plan/<shard>.json        the fixed shard plan written before any work (and _plan/_complete.json)
    _staging/<shard>/...      caption fragments of shards in progress (never read as output)
    data/part-<shard>.parquet the table, one file per committed shard
    _markers/<shard>.json     written last: the shard is done only once its marker exists

Resume skips shards with markers before anything is read, and clears staging of the others. Names
that start with `_` or `.` are ignored by Parquet readers, so `data/` reads as the table.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pipeline.io.fs import join, list_names, open_fs, read_bytes, remove_tree, write_atomic
from pipeline.io.sources import Shard
from pipeline.sink import part_path

MANIFEST = "_manifest.json"
PLAN_DONE = "_complete.json"


class FingerprintMismatchError(RuntimeError):
    """The output was made with a different config."""


class Ledger:
    def __init__(self, output_uri: str, storage_options: dict[str, Any] | None = None) -> None:
        self.fs, self.root = open_fs(output_uri, storage_options)

    def _path(self, *parts: str) -> str:
        return join(self.root, *parts)

    def _write_json(self, path: str, value: dict[str, Any]) -> None:
        write_atomic(self.fs, path, json.dumps(value, indent=1, ensure_ascii=False).encode())

    def _read_json(self, path: str) -> dict[str, Any] | None:
        try:
            return json.loads(read_bytes(self.fs, path))
        except FileNotFoundError:
            return None

    # Manifest and fingerprint -------------------------------------------------------------
    def manifest(self) -> dict[str, Any] | None:
        return self._read_json(self._path(MANIFEST))

    def check_fingerprint(self, fingerprint: str) -> bool:
        """True if resuming; raise FingerprintMismatchError if the output belongs to another config."""
        manifest = self.manifest()
        if manifest is None:
            return False
        if manifest.get("fingerprint") != fingerprint:
            raise FingerprintMismatchError(
                f"{self.fs.unstrip_protocol(self.root)} was made with config fingerprint {manifest.get('fingerprint')}"
                f", this config's is {fingerprint} (model, modes, prompts, sampling, input or seed changed). "
                "Use --overwrite to start over, or write to another output.")
        return True

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        self._write_json(self._path(MANIFEST), manifest)

    def wipe(self) -> None:
        """Remove everything a run writes (for --overwrite)."""
        for name in (MANIFEST, "_plan", "_staging", "_markers", "data"):
            remove_tree(self.fs, self._path(name))

    # Plan ------------------------------------------------------------------------------------
    def plan_complete(self) -> dict[str, Any] | None:
        return self._read_json(self._path("_plan", PLAN_DONE))

    def write_plan(self, shards: Iterable[Shard], workers: int = 16) -> dict[str, Any]:
        """Store every shard's plan (in parallel, a bounded window at a time), then the completion file."""
        remove_tree(self.fs, self._path("_plan"))
        count, images, window = 0, 0, []
        with ThreadPoolExecutor(workers) as pool:
            for shard in shards:
                window.append(pool.submit(write_atomic, self.fs, self._path("_plan", f"{shard.id}.json"),
                                          shard.to_json().encode()))
                count, images = count + 1, images + (shard.size or 0)
                if len(window) >= 4 * workers:
                    for future in window:
                        future.result()
                    window = []
            for future in window:
                future.result()
        summary = {"shards": count, "images_known": images, "planned_at": time.time()}
        self._write_json(self._path("_plan", PLAN_DONE), summary)
        return summary

    def planned_ids(self) -> Iterator[str]:
        for name in list_names(self.fs, self._path("_plan")):
            if name.endswith(".json") and not name.startswith("_"):
                yield name.removesuffix(".json")

    def plan_path(self, shard_id: str) -> str:
        return self._path("_plan", f"{shard_id}.json")

    # Markers ---------------------------------------------------------------------------------
    def committed_ids(self) -> set[str]:
        return {name.removesuffix(".json") for name in list_names(self.fs, self._path("_markers"))
                if name.endswith(".json") and not name.startswith(".")}

    def write_marker(self, shard_id: str, stats: dict[str, Any]) -> None:
        self._write_json(self._path("_markers", f"{shard_id}.json"), {"shard": shard_id, **stats})

    def markers(self) -> list[dict[str, Any]]:
        paths = [self._path("_markers", f"{shard}.json") for shard in sorted(self.committed_ids())]
        contents = self.fs.cat(paths) if paths else {}
        return [json.loads(contents[path]) for path in paths if path in contents]

    def uncommit(self, shard_id: str) -> None:
        """Make a committed shard pending again: marker first, then its part file, so that a run killed
        in between leaves a shard with no marker (redone) rather than a marker with no rows."""
        for path in (self._path("_markers", f"{shard_id}.json"), part_path(self.root, shard_id)):
            remove_tree(self.fs, path)

    def remove_partial_writes(self) -> int:
        """Delete temporary files a killed local write left in `data/` (readers skip them anyway)."""
        leftovers = [name for name in list_names(self.fs, self._path("data")) if name.startswith(".tmp-")]
        for name in leftovers:
            remove_tree(self.fs, self._path("data", name))
        return len(leftovers)

    def clear_staging(self, shard_id: str | None = None) -> None:
        remove_tree(self.fs, self._path("_staging", shard_id) if shard_id else self._path("_staging"))
