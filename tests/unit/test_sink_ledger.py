"""Shard commits: fragments merge to one row per key, markers come last, resume state is read back."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.io.sources import Shard
from pipeline.ledger import FingerprintMismatchError, Ledger
from pipeline.sink import in_flight_schema, merge_shard, output_schema, part_path, to_table, write_fragments

MODES = ["tags"]


def _batch(shard: str, keys: list[str], caption: str, size: int, status: str = "ok"):
    rows = len(keys)
    return to_table({"key": keys, "shard": [shard] * rows, "status": [status] * rows, "tags": [caption] * rows,
                     "shard_size": [size] * rows}, in_flight_schema(MODES))


def test_fragments_are_idempotent_and_merge_to_one_row_per_key(tmp_path: Path):
    out = str(tmp_path)
    reports = write_fragments(_batch("000001", ["b", "a"], "first", 3), out, {})
    assert reports == [{"shard": "000001", "shard_size": 3, "keys": ["a", "b"]}]
    write_fragments(_batch("000001", ["b", "a"], "first", 3), out, {})  # a retried task: same file again
    write_fragments(_batch("000001", ["c"], "second", 3), out, {})
    assert len(list((tmp_path / "_staging" / "000001").glob("*.parquet"))) == 2
    table = merge_shard(out, {}, "000001", output_schema(MODES), {"fingerprint": "f"})
    assert table.column("key").to_pylist() == ["a", "b", "c"]
    written = pq.read_table(part_path(out, "000001"))
    assert written.column("key").to_pylist() == ["a", "b", "c"]
    assert b"joycaption_pipeline" in written.schema.metadata


def test_keep_committed_replaces_only_the_redone_rows(tmp_path: Path):
    out = str(tmp_path)
    write_fragments(_batch("000002", ["a", "b"], "old", 2), out, {})
    merge_shard(out, {}, "000002", output_schema(MODES), {})
    Ledger(out).clear_staging("000002")
    write_fragments(_batch("000002", ["b"], "new", 1), out, {})
    table = merge_shard(out, {}, "000002", output_schema(MODES), {}, keep_committed=True)
    assert dict(zip(table.column("key").to_pylist(), table.column("tags").to_pylist(), strict=True)) == {
        "a": "old", "b": "new"}


def test_ledger_plan_markers_fingerprint_and_leftovers(tmp_path: Path):
    ledger = Ledger(str(tmp_path))
    assert ledger.check_fingerprint("abc") is False
    ledger.write_manifest({"fingerprint": "abc"})
    assert ledger.check_fingerprint("abc") is True
    with pytest.raises(FingerprintMismatchError, match="--overwrite"):
        ledger.check_fingerprint("def")

    summary = ledger.write_plan(Shard(f"{i:06d}", "files", "/in", [f"{i}.jpg"], 1) for i in range(70))
    assert summary["shards"] == 70 and ledger.plan_complete()["images_known"] == 70
    assert list(ledger.planned_ids()) == [f"{i:06d}" for i in range(70)]
    ledger.write_marker("000003", {"rows": 1, "ok": 1, "errors": 0})
    assert ledger.committed_ids() == {"000003"}
    assert ledger.markers()[0]["shard"] == "000003"

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / ".tmp-123-part-000004.parquet").write_bytes(b"half")
    assert ledger.remove_partial_writes() == 1
    (tmp_path / "data" / "part-000003.parquet").write_bytes(b"rows")
    (tmp_path / "data" / "part-000005.parquet").write_bytes(b"rows")
    ledger.uncommit("000003")  # back to pending: no marker, no part file; others untouched
    assert ledger.committed_ids() == set()
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["part-000005.parquet"]
    ledger.wipe()
    assert not list(tmp_path.iterdir())
