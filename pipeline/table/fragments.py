"""Per-shard fragments, and the merged part file of a shard.

Caption batches are written as fragments under `_staging/<shard>/` by a write stage off the caption
actor's hot loop. The read task that read a shard records the keys it yielded in
`_staging/<shard>/_expected.json`. When every image of a shard has arrived, the driver merges its
fragments into `data/part-<shard>.parquet` (atomically) and only then writes the shard's marker (see
ledger.py). Fragments are named by the keys they hold, so a retried task rewrites the same file instead
of adding a duplicate, and the merge keeps one row per key. A merge checks itself: unless its rows are
exactly the expected keys, once each, nothing is written and the shard is redone.
"""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.io.fs import join, list_names, open_fs, read_bytes, write_atomic
from pipeline.table.names import expected_path, part_path, staging_dir
from pipeline.table.schema import METADATA_KEY


class IncompleteShardError(RuntimeError):
    """A shard's fragments do not hold exactly its keys; its part file is not written."""


def _parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def write_fragments(table: pa.Table, output_uri: str, storage_options: dict[str, Any]) -> list[dict[str, Any]]:
    """Write one fragment per shard present in `table`; report what each holds to the committer."""
    fs, root = open_fs(output_uri, storage_options)
    reports = []
    for shard in sorted(set(table.column("shard").to_pylist())):
        part = table.filter(pc.equal(table.column("shard"), shard))
        # Only a shard's last row carries its size (the read task learns it at the end of the shard).
        size = pc.max(part.column("shard_size")).as_py()
        part = part.drop_columns(["shard_size"])
        keys = sorted(part.column("key").to_pylist())
        name = hashlib.sha1("\x00".join(keys).encode()).hexdigest()[:20] + ".parquet"
        write_atomic(fs, join(staging_dir(root, shard), name), _parquet_bytes(part))
        reports.append({"shard": shard, "shard_size": size, "keys": keys})
    return reports


def _read_parquet(fs: Any, path: str, schema: pa.Schema) -> pa.Table:
    return conform(pq.read_table(io.BytesIO(read_bytes(fs, path))), schema)


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` in `schema`'s columns and order; columns it lacks are null, columns the schema lacks an error
    (as before). A part file committed before a column existed (`<mode>_raw`) then merges with new rows when
    a resumed run redoes its error rows."""
    for field in schema:
        if field.name not in table.column_names:
            table = table.append_column(field, pa.nulls(table.num_rows, field.type))
    extra = [name for name in table.column_names if name not in schema.names]
    return table.select([*schema.names, *extra]).cast(schema)


def write_expected(output_uri: str, storage_options: dict[str, Any], shard: str, keys: list[str]) -> None:
    """Record the keys a read task yielded for `shard`: what its part file must hold."""
    fs, root = open_fs(output_uri, storage_options)
    write_atomic(fs, expected_path(root, shard), json.dumps(sorted(keys)).encode())


def _expected_keys(fs: Any, root: str, shard: str) -> list[str]:
    try:
        return json.loads(read_bytes(fs, expected_path(root, shard)))
    except FileNotFoundError:
        raise IncompleteShardError(f"shard {shard}: no record of its keys in staging") from None


def key_mismatch(found: list[str], expected: list[str]) -> str | None:
    """Why rows with keys `found` (sorted, unique) are not exactly `expected`; None when they are."""
    if found == expected:
        return None
    wanted, got = set(expected), set(found)
    missing, extra = sorted(wanted - got), sorted(got - wanted)
    parts = [f"{len(missing)} missing (e.g. {missing[:3]})"] if missing else []
    parts += [f"{len(extra)} unexpected (e.g. {extra[:3]})"] if extra else []
    if len(expected) != len(wanted):
        parts.append(f"{len(expected) - len(wanted)} repeated in the shard's key list")
    return ", ".join(parts) or "keys differ"


def merge_shard(output_uri: str, storage_options: dict[str, Any], shard: str, schema: pa.Schema,
                run_metadata: dict[str, Any], keep_committed: bool = False) -> pa.Table:
    """Merge a shard's fragments into its part file (one row per key, sorted) and return the table.

    The fragments must hold exactly the keys the read task recorded (IncompleteShardError otherwise, and
    nothing is written). With `keep_committed` (re-captioning error rows), rows of the committed part
    file whose keys the fragments do not hold are kept; the fragments' rows replace the others.
    """
    fs, root = open_fs(output_uri, storage_options)
    directory = staging_dir(root, shard)
    expected = _expected_keys(fs, root, shard)
    fresh = [_read_parquet(fs, join(directory, name), schema) for name in list_names(fs, directory)
             if name.endswith(".parquet") and not name.startswith(".")]
    merged = _one_row_per_key(pa.concat_tables(fresh)) if fresh else schema.empty_table()
    mismatch = key_mismatch(merged.column("key").to_pylist(), expected)
    if mismatch:
        raise IncompleteShardError(f"shard {shard}: fragments hold {merged.num_rows} of {len(expected)} "
                                   f"expected rows: {mismatch}")
    if keep_committed:
        committed = _read_parquet(fs, part_path(root, shard), schema)
        kept = committed.filter(pc.invert(pc.is_in(committed.column("key"), value_set=merged.column("key"))))
        merged = _one_row_per_key(pa.concat_tables([merged, kept]))
    metadata = {**(schema.metadata or {}), METADATA_KEY: json.dumps(run_metadata, ensure_ascii=False).encode()}
    merged = merged.replace_schema_metadata(metadata)
    write_atomic(fs, part_path(root, shard), _parquet_bytes(merged))
    return merged


def _one_row_per_key(table: pa.Table) -> pa.Table:
    """Sorted by key, the first row of each key kept (a retried batch may have written a key twice)."""
    table = table.sort_by("key")
    keys = table.column("key").to_pylist()
    keep = [i for i, key in enumerate(keys) if i == 0 or keys[i - 1] != key]
    return table.take(keep) if len(keep) != len(keys) else table


def error_keys(output_uri: str, storage_options: dict[str, Any], shard: str) -> list[str]:
    """Keys of a committed shard's error rows."""
    fs, root = open_fs(output_uri, storage_options)
    table = pq.read_table(io.BytesIO(read_bytes(fs, part_path(root, shard))), columns=["key", "status"])
    return table.filter(pc.equal(table.column("status"), "error")).column("key").to_pylist()
