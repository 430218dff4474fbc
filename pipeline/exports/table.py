"""Committed rows of an output, read shard by shard and batch by batch.

A shard is output only once its marker exists (ledger.py) and was written under the output's config
fingerprint; its rows are in the part file the marker names (a redone shard's part has its run's name). A
part file no marker names belongs to a commit cut short or to a replaced pair, and `_staging/` holds
fragments that may still change. Part files are read one record batch at a time, so exporting tens of
millions of rows keeps one batch in memory.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.io.fs import to_uri
from pipeline.table.ledger import Ledger
from pipeline.table.names import MANIFEST, part_path

log = logging.getLogger("pipeline.exports")
BATCH_ROWS = 512


@dataclass(frozen=True)
class Output:
    """An output folder as exports see it: its storage, its manifest and its committed shards."""

    ledger: Ledger
    manifest: dict[str, Any]
    shards: tuple[str, ...]
    parts: dict[str, str] = field(default_factory=dict)  # shard -> its part file's name, as its marker gives it

    def part_path(self, shard: str) -> str:
        """The path of a committed shard's part file (the one its marker names)."""
        return part_path(self.ledger.root, shard, self.parts.get(shard))

    @property
    def uri(self) -> str:
        return to_uri(self.ledger.fs, self.ledger.root)

    @property
    def mode_names(self) -> list[str]:
        """Mode names in the order the run defined them (the order of the sidecar lines)."""
        return [str(mode["name"]) for mode in self.manifest.get("modes", [])]

    @property
    def input_uri(self) -> str | None:
        return ((self.manifest.get("config") or {}).get("input") or {}).get("uri")


def open_output(output_uri: str, storage_options: dict[str, Any] | None = None) -> Output:
    """Open an output for reading; fail clearly when the folder holds no run."""
    ledger = Ledger(output_uri, storage_options)
    manifest = ledger.manifest()
    if manifest is None:
        raise FileNotFoundError(f"{output_uri} has no {MANIFEST}: not a pipeline output, or its run has not started")
    markers = ledger.markers(manifest.get("fingerprint"))  # a marker of another config is not committed
    return Output(ledger, manifest, tuple(marker.shard for marker in markers),
                  {marker.shard: marker.part_file() for marker in markers})


def committed_files(output_uri: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """URIs of the part files of committed shards: exactly the committed table, for any Parquet reader
    (`pyarrow.dataset.dataset(files)`, `duckdb.read_parquet(files)`, `datasets.load_dataset("parquet",
    data_files=files)`), even while a run is writing or after one was killed between part and marker."""
    output = open_output(output_uri, storage_options)
    return [to_uri(output.ledger.fs, output.part_path(shard)) for shard in output.shards]


def check_modes(output: Output, modes: list[str] | None) -> list[str]:
    """The requested modes (default: all, in run order); unknown names fail before anything is written."""
    known = output.mode_names
    if modes is None:
        return known
    unknown = [name for name in modes if name not in known]
    if unknown or not modes:
        raise ValueError(f"unknown modes {unknown}; this output has {known}")
    return list(modes)


def shard_batches(output: Output, shard: str, columns: list[str] | None = None,
                  batch_rows: int = BATCH_ROWS) -> Iterator[pa.RecordBatch]:
    """One committed shard's rows, a record batch at a time (nothing if its part file is missing)."""
    fs = output.ledger.fs
    path = output.part_path(shard)
    try:
        handle = fs.open(path, "rb")
    except FileNotFoundError:
        log.warning("shard %s has a marker but no part file %s; skipped", shard, to_uri(fs, path))
        return
    with handle:
        yield from pq.ParquetFile(handle).iter_batches(batch_size=batch_rows, columns=columns)


def iter_batches(output: Output, columns: list[str] | None = None,
                 batch_rows: int = BATCH_ROWS) -> Iterator[pa.RecordBatch]:
    """Every committed row in shard order, then key order (the order part files are sorted in)."""
    for shard in output.shards:
        yield from shard_batches(output, shard, columns, batch_rows)


def iter_rows(output: Output, columns: list[str] | None = None) -> Iterator[dict[str, Any]]:
    for batch in iter_batches(output, columns):
        yield from batch.to_pylist()
