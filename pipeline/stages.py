"""The Ray Data stages around the caption actors: read + decode + prepare a shard, and write fragments.

    read_and_prepare   [CPU tasks, generator UDF]: shard ids in, prepared image rows out, a bounded batch
                       at a time; every record of the shard becomes exactly one row (an image or an error)
    write_stage        [CPU tasks]: captioned rows out to `_staging/<shard>/` fragments, and a report of
                       which keys each fragment holds for the committer
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from pipeline.config import RunConfig
from pipeline.images import prepare_image
from pipeline.io.fs import read_bytes
from pipeline.io.sources import Shard, read_shard
from pipeline.ledger import Ledger
from pipeline.sink import read_schema, to_table, write_expected, write_fragments

READ_BATCH = 16  # prepared images per block leaving a read task (~7 MB)


def _records_as_rows(shard: Shard, config: RunConfig, only: list[str] | None) -> Iterator[dict[str, Any]]:
    _size, records = read_shard(shard, config.input)
    wanted = set(only) if only is not None else None  # re-captioning a committed shard's error rows
    for record in records:
        if wanted is not None and record.key not in wanted:
            continue
        row = {"key": record.key, "source": record.source, "member": record.member, "shard": shard.id,
               "meta": record.meta}
        if record.error is None:
            prepared = prepare_image(record.data, record.member or record.key, config.input.max_pixels)
            row.update(width=prepared.width, height=prepared.height, format=prepared.format,
                       pixels=prepared.pixels, error=prepared.error)
        else:
            row["error"] = record.error
        row["status"] = "ok" if row.get("error") is None else "error"
        yield row


def _rows_of(shard: Shard, config: RunConfig, only: list[str] | None = None) -> Iterator[dict[str, Any]]:
    """A shard's rows; the last one carries `shard_size`, the count of rows (and keys) the shard yielded.

    The count is known only at the end (a tar is read in one pass), so every row is held back until the
    next one arrives, and before the last one leaves, the shard's keys are recorded in staging for the
    commit to check against (sink.merge_shard)."""
    keys: list[str] = []
    previous: dict[str, Any] | None = None
    for row in _records_as_rows(shard, config, only):
        if previous is not None:
            yield previous
        keys.append(row["key"])
        previous = row
    if previous is None:
        previous = {"key": shard.id, "source": shard.uri, "shard": shard.id, "status": "error",
                    "error": "no images in this shard"}
        keys = [shard.id]
    write_expected(config.output.uri, config.output.storage_options, shard.id, keys)
    previous["shard_size"] = len(keys)
    yield previous


def read_and_prepare(batch: dict[str, Any], config_json: str, output_uri: str) -> Iterator[pa.Table]:
    """Generator UDF: shard ids in, prepared image rows out, a small batch at a time."""
    config = RunConfig.model_validate_json(config_json)
    ledger = Ledger(output_uri, config.output.storage_options)
    schema = read_schema()
    for shard_id, only in zip(batch["shard"].to_pylist(), batch["only"].to_pylist(), strict=True):
        shard = Shard.from_json(read_bytes(ledger.fs, ledger.plan_path(shard_id)).decode())
        chunk: list[dict[str, Any]] = []
        for row in _rows_of(shard, config, only):
            chunk.append(row)
            if len(chunk) == READ_BATCH:
                yield _rows_to_table(chunk, schema)
                chunk = []
        if chunk:
            yield _rows_to_table(chunk, schema)


def _rows_to_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    return to_table({name: [row.get(name) for row in rows] for name in schema.names}, schema)


def write_stage(batch: pa.Table, output_uri: str, storage_options: dict[str, Any]) -> pa.Table:
    reports = write_fragments(batch, output_uri, storage_options)
    return pa.Table.from_pylist(reports, schema=pa.schema([("shard", pa.string()), ("shard_size", pa.int64()),
                                                           ("keys", pa.list_(pa.string()))]))
