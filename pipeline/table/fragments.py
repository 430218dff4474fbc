"""Per-shard fragments, and the merged table of a shard.

Caption batches are written as fragments under `_staging/<shard>/<run>/` by a write stage off the caption
actor's hot loop; `<run>` is the id of the run whose workers wrote them (its lease's holder id). The read
task that read a shard records the keys it yielded in `_staging/<shard>/<run>/_expected.json`. When every
image of a shard has arrived, a commit merges that run's fragments, and only that run's, into the shard's
table (`merge_shard`), and then writes the part file and the marker (run/commit.py, ledger.py). Fragments
another run left (a frozen run's workers that kept writing after the output was taken over) are never
read, so they can neither mix another config's rows into a part nor break its schema; they are removed
with the shard's staging when it commits or when a run clears staging.

Fragments are named by the keys they hold, so a retried task rewrites the same file instead of adding a
duplicate, and the merge keeps one row per key. A merge checks itself: unless its rows are exactly the
expected keys, once each, it raises IncompleteShardError and the shard is redone. Every storage call is
retried on transient errors (pipeline.io.retry).
"""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.io.fs import join, list_names, open_fs, read_bytes, retrying, write_atomic
from pipeline.table.names import EXPECTED, expected_path, part_path, staging_dir
from pipeline.table.schema import METADATA_KEY


class IncompleteShardError(RuntimeError):
    """A shard's fragments do not hold exactly its keys; its part file is not written."""


def parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def write_fragments(table: pa.Table, output_uri: str, storage_options: dict[str, Any],
                    run_id: str | None = None) -> list[dict[str, Any]]:
    """Write one fragment per shard present in `table`, in run `run_id`'s staging folder of the shard; report
    what each holds to the committer."""
    fs, root = open_fs(output_uri, storage_options)
    reports = []
    for shard in sorted(set(table.column("shard").to_pylist())):
        part = table.filter(pc.equal(table.column("shard"), shard))
        # Only a shard's last row carries its size (the read task learns it at the end of the shard).
        size = pc.max(part.column("shard_size")).as_py()
        part = part.drop_columns(["shard_size"])
        keys = sorted(part.column("key").to_pylist())
        name = hashlib.sha1("\x00".join(keys).encode()).hexdigest()[:20] + ".parquet"
        retrying(write_atomic, fs, join(staging_dir(root, shard, run_id), name), parquet_bytes(part))
        reports.append({"shard": shard, "shard_size": size, "keys": keys})
    return reports


def _read_parquet(fs: Any, path: str, schema: pa.Schema) -> pa.Table:
    return conform(pq.read_table(io.BytesIO(retrying(read_bytes, fs, path))), schema)


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` in `schema`'s columns and order; columns it lacks are null, columns the schema lacks an error
    (as before). A part file committed before a column existed (`<mode>_raw`) then merges with new rows when
    a resumed run redoes its error rows."""
    for field in schema:
        if field.name not in table.column_names:
            table = table.append_column(field, pa.nulls(table.num_rows, field.type))
    extra = [name for name in table.column_names if name not in schema.names]
    return table.select([*schema.names, *extra]).cast(schema)


def write_expected(output_uri: str, storage_options: dict[str, Any], shard: str, keys: list[str],
                   run_id: str | None = None) -> None:
    """Record the keys a read task of run `run_id` yielded for `shard`: what its part file must hold."""
    fs, root = open_fs(output_uri, storage_options)
    retrying(write_atomic, fs, expected_path(root, shard, run_id), json.dumps(sorted(keys)).encode())


def _expected_keys(fs: Any, root: str, shard: str, run_id: str | None) -> list[str]:
    try:
        return json.loads(retrying(read_bytes, fs, expected_path(root, shard, run_id)))
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
                run_metadata: dict[str, Any], keep_committed: bool = False, *, run_id: str | None = None,
                committed_part: str | None = None) -> pa.Table:
    """Merge run `run_id`'s fragments of a shard (one row per key, sorted) and return the table, stamped
    with `run_metadata`; writing it is the commit's (run/commit.py: fenced, conditional).

    The fragments must hold exactly the keys that run's read task recorded (IncompleteShardError otherwise).
    Fragments of other runs are never read. With `keep_committed` (re-captioning error rows), rows of the
    committed part file (`committed_part`, the name its marker gives; default `part-<shard>.parquet`)
    whose keys the fragments do not hold are kept; the fragments' rows replace the others.
    """
    fs, root = open_fs(output_uri, storage_options)
    directory = staging_dir(root, shard, run_id)
    expected = _expected_keys(fs, root, shard, run_id)
    fresh = [_read_parquet(fs, join(directory, name), schema) for name in retrying(list_names, fs, directory)
             if name.endswith(".parquet") and not name.startswith(".") and name != EXPECTED]
    merged = _one_row_per_key(pa.concat_tables(fresh)) if fresh else schema.empty_table()
    mismatch = key_mismatch(merged.column("key").to_pylist(), expected)
    if mismatch:
        raise IncompleteShardError(f"shard {shard}: fragments hold {merged.num_rows} of {len(expected)} "
                                   f"expected rows: {mismatch}")
    if keep_committed:
        committed = _read_parquet(fs, part_path(root, shard, committed_part), schema)
        kept = committed.filter(pc.invert(pc.is_in(committed.column("key"), value_set=merged.column("key"))))
        merged = _one_row_per_key(pa.concat_tables([merged, kept]))
    metadata = {**(schema.metadata or {}), METADATA_KEY: json.dumps(run_metadata, ensure_ascii=False).encode()}
    return merged.replace_schema_metadata(metadata)


def _one_row_per_key(table: pa.Table) -> pa.Table:
    """Sorted by key, the first row of each key kept (a retried batch may have written a key twice)."""
    table = table.sort_by("key")
    keys = table.column("key").to_pylist()
    keep = [i for i, key in enumerate(keys) if i == 0 or keys[i - 1] != key]
    return table.take(keep) if len(keep) != len(keys) else table


def error_keys(output_uri: str, storage_options: dict[str, Any], shard: str, part: str | None = None) -> list[str]:
    """Keys of a committed shard's error rows (`part`: its part file's name, as its marker gives it)."""
    fs, root = open_fs(output_uri, storage_options)
    table = pq.read_table(io.BytesIO(retrying(read_bytes, fs, part_path(root, shard, part))), columns=["key", "status"])
    return table.filter(pc.equal(table.column("status"), "error")).column("key").to_pylist()
