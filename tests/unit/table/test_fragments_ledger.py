"""Shard commits: fragments merge to one row per key and check themselves, markers come last, resume state is
read back, and nothing the pipeline did not write is ever deleted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.io.fs import temporary_beside
from pipeline.io.sources import Shard
from pipeline.table.fragments import (
    IncompleteShardError,
    merge_shard,
    parquet_bytes,
    write_expected,
    write_fragments,
)
from pipeline.table.ledger import FingerprintMismatchError, ForeignOutputError, Ledger
from pipeline.table.names import DATA, PLAN, expected_path, part_name, part_path, staging_dir
from pipeline.table.records import Marker
from pipeline.table.schema import in_flight_schema, output_schema, to_table

MODES = ["tags"]
RUN, OTHER = "a" * 32, "b" * 32  # two runs' ids (their leases' holder ids)


def _batch(shard: str, keys: list[str], caption: str, size: int | None, status: str = "ok"):
    rows = len(keys)
    return to_table({"key": keys, "shard": [shard] * rows, "status": [status] * rows, "tags": [caption] * rows,
                     "shard_size": [None] * (rows - 1) + [size]}, in_flight_schema(MODES))


def test_fragments_are_idempotent_and_merge_to_one_row_per_key(tmp_path: Path):
    out = str(tmp_path)
    write_expected(out, {}, "000001", ["c", "a", "b"], RUN)
    reports = write_fragments(_batch("000001", ["b", "a"], "first", 3), out, {}, RUN)
    assert reports == [{"shard": "000001", "shard_size": 3, "keys": ["a", "b"]}]
    write_fragments(_batch("000001", ["b", "a"], "first", 3), out, {}, RUN)  # a retried task: same file again
    write_fragments(_batch("000001", ["c"], "second", 3), out, {}, RUN)
    assert len(list(Path(staging_dir(out, "000001", RUN)).glob("*.parquet"))) == 2
    table = merge_shard(out, {}, "000001", output_schema(MODES), {"fingerprint": "f"}, run_id=RUN)
    assert table.column("key").to_pylist() == ["a", "b", "c"]
    assert b"joycaption_pipeline" in table.schema.metadata
    assert not Path(part_path(out, "000001")).exists()  # writing it is the commit's (fenced, conditional)


def test_fragments_of_another_run_are_never_merged(tmp_path: Path):
    """A frozen run's workers kept writing after the output was taken over, with another config's columns:
    the new owner's merge reads only its own run's folder, so neither rows nor schema leak in."""
    out = str(tmp_path)
    write_expected(out, {}, "000003", ["a", "b"], RUN)
    write_fragments(_batch("000003", ["a", "b"], "ours", 2), out, {}, RUN)
    write_expected(out, {}, "000003", ["a", "b", "z"], OTHER)  # the other run's own record of the shard
    stranger = to_table({"key": ["a", "z"], "shard": ["000003"] * 2, "status": ["ok"] * 2, "other": ["x", "y"],
                         "shard_size": [None, 3]}, in_flight_schema(["other"]))
    write_fragments(stranger, out, {}, OTHER)
    table = merge_shard(out, {}, "000003", output_schema(MODES), {}, run_id=RUN)
    assert table.column("key").to_pylist() == ["a", "b"] and table.column("tags").to_pylist() == ["ours"] * 2
    assert table.schema.names == output_schema(MODES).names
    Ledger(out).clear_staging("000003")  # a commit clears every run's fragments of its shard
    assert not Path(staging_dir(out, "000003")).exists()


def test_keep_committed_replaces_only_the_redone_rows(tmp_path: Path):
    out = str(tmp_path)
    write_expected(out, {}, "000002", ["a", "b"], RUN)
    write_fragments(_batch("000002", ["a", "b"], "old", 2), out, {}, RUN)
    old = merge_shard(out, {}, "000002", output_schema(MODES), {}, run_id=RUN)
    ledger = Ledger(out)
    assert ledger.create_part(part_name("000002", RUN), parquet_bytes(old))  # committed under its run's name
    ledger.clear_staging("000002")
    write_expected(out, {}, "000002", ["b"], OTHER)
    write_fragments(_batch("000002", ["b"], "new", 1), out, {}, OTHER)
    table = merge_shard(out, {}, "000002", output_schema(MODES), {}, keep_committed=True, run_id=OTHER,
                        committed_part=part_name("000002", RUN))
    assert dict(zip(table.column("key").to_pylist(), table.column("tags").to_pylist(), strict=True)) == {
        "a": "old", "b": "new"}


def test_size_is_reported_from_the_last_row_only(tmp_path: Path):
    reports = write_fragments(_batch("000001", ["a", "b"], "x", None), str(tmp_path), {})
    assert reports == [{"shard": "000001", "shard_size": None, "keys": ["a", "b"]}]


@pytest.mark.parametrize("expected, fragments, reason", [
    (["a", "b", "c"], [["a"], ["b"]], "1 missing"),  # a fragment lost (deleted by another run)
    (["a", "b"], [["a", "b", "z"]], "1 unexpected"),  # a row that is not the shard's
    (["a", "a", "b"], [["a", "b"]], "repeated"),  # a key list with a duplicate can never be a shard
    (["a"], [], "0 of 1"),  # no fragments at all
])
def test_a_commit_that_is_not_exactly_the_shards_keys_writes_nothing(tmp_path: Path, expected, fragments, reason):
    out = str(tmp_path)
    json_keys = list(expected)
    Path(staging_dir(out, "000007")).mkdir(parents=True)
    Path(expected_path(out, "000007")).write_text(json.dumps(json_keys))
    for keys in fragments:
        write_fragments(_batch("000007", keys, "x", len(expected)), out, {})
    with pytest.raises(IncompleteShardError, match=reason):
        merge_shard(out, {}, "000007", output_schema(MODES), {})
    assert not Path(part_path(out, "000007")).exists()


def test_a_commit_without_a_record_of_the_keys_writes_nothing(tmp_path: Path):
    write_fragments(_batch("000008", ["a"], "x", 1), str(tmp_path), {})
    with pytest.raises(IncompleteShardError, match="no record of its keys"):
        merge_shard(str(tmp_path), {}, "000008", output_schema(MODES), {})
    assert not Path(part_path(str(tmp_path), "000008")).exists()


def _users_files(root: Path) -> dict[str, bytes]:
    files = {"photos/cat.jpg": b"cat", "notes.txt": b"mine", "data-old/part-000001.parquet": b"theirs",
             "_markers-backup/x.json": b"{}"}
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


def test_a_foreign_folder_is_refused_unless_allowed(tmp_path: Path):
    files = _users_files(tmp_path)
    with pytest.raises(ForeignOutputError, match=r"not empty and not a pipeline output.*--allow-existing"):
        Ledger(str(tmp_path)).check_target()
    Ledger(str(tmp_path)).check_target(allow_existing=True)
    (tmp_path / DATA).mkdir()
    (tmp_path / DATA / "photo.jpg").write_bytes(b"jpg")
    with pytest.raises(ForeignOutputError, match="already holds data"):
        Ledger(str(tmp_path)).check_target(allow_existing=True)
    assert all((tmp_path / name).read_bytes() == data for name, data in files.items())


def test_wipe_removes_only_what_the_pipeline_wrote(tmp_path: Path):
    files = _users_files(tmp_path)
    ledger = Ledger(str(tmp_path))
    ledger.write_manifest({"fingerprint": "abc"})
    ledger.write_plan(Shard(f"{i:06d}", "files", "/in", [f"{i}.jpg"], 1) for i in range(3))
    write_expected(str(tmp_path), {}, "000000", ["0.jpg"])
    write_fragments(_batch("000000", ["0.jpg"], "x", 1), str(tmp_path), {})
    table = merge_shard(str(tmp_path), {}, "000000", output_schema(MODES), {})
    ledger.create_part(part_name("000000"), parquet_bytes(table))
    ledger.write_part(part_name("000000", RUN), parquet_bytes(table))  # a redone pair's new part
    ledger.write_marker(Marker.of("000000", {"rows": 1}))
    write_expected(str(tmp_path), {}, "000001", ["1.jpg"])  # a shard in flight
    (tmp_path / DATA / "mine.parquet").write_bytes(b"a user's file beside the table")
    (tmp_path / PLAN / "notes.md").write_bytes(b"a user's note")
    assert "1 committed shards (1 rows)" in ledger.describe_contents()
    ledger.wipe()
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert left == sorted([*files, f"{DATA}/mine.parquet", f"{PLAN}/notes.md"])
    assert all((tmp_path / name).read_bytes() == data for name, data in files.items())


def test_ledger_plan_markers_fingerprint_and_leftovers(tmp_path: Path):
    ledger = Ledger(str(tmp_path))
    assert ledger.check_fingerprint("abc") is False
    ledger.write_manifest({"fingerprint": "abc"})
    assert ledger.check_fingerprint("abc") is True
    with pytest.raises(FingerprintMismatchError, match=r"--overwrite.*would delete 0 committed shards"):
        ledger.check_fingerprint("def")

    summary = ledger.write_plan(Shard(f"{i:06d}", "files", "/in", [f"{i}.jpg"], 1) for i in range(70))
    assert summary["shards"] == 70 and ledger.plan_complete()["images_known"] == 70
    assert list(ledger.planned_ids()) == [f"{i:06d}" for i in range(70)]
    ledger.write_marker(Marker.of("000003", {"rows": 1, "ok": 1, "errors": 0}))
    assert ledger.committed_ids() == {"000003"}
    assert ledger.markers()[0].shard == "000003"

    data = tmp_path / DATA
    data.mkdir()
    Path(temporary_beside(part_path(str(tmp_path), "000004"))).write_bytes(b"half")  # a killed local write's
    Path(part_path(str(tmp_path), "000003")).write_bytes(b"rows")
    Path(part_path(str(tmp_path), "000005")).write_bytes(b"rows")
    Path(part_path(str(tmp_path), "000006")).write_bytes(b"killed between part file and marker")
    # A redone pair: the marker names the new part; the old one (killed before its removal) is named by none.
    Path(part_path(str(tmp_path), "000007")).write_bytes(b"the old part")
    Path(part_path(str(tmp_path), "000007", part_name("000007", RUN))).write_bytes(b"the new part")
    ledger.write_marker(Marker.of("000005", {"rows": 1, "ok": 1, "errors": 0}))
    ledger.write_marker(Marker.of("000007", {"rows": 1, "part": part_name("000007", RUN), "holder": RUN}))
    assert ledger.remove_uncommitted_parts(ledger.markers()) == 3
    assert sorted(p.name for p in data.iterdir()) == sorted([part_name("000003"), part_name("000005"),
                                                             part_name("000007", RUN)])
    ledger.uncommit("000003")  # back to pending: no marker, no part file; others untouched
    ledger.uncommit("000007")  # the part its marker names goes with it
    assert ledger.committed_ids() == {"000005"}
    assert sorted(p.name for p in data.iterdir()) == [part_name("000005")]
    ledger.wipe()
    assert not list(p for p in tmp_path.iterdir() if p.name != ".lease.lock")


@pytest.fixture(params=["local", "s3"])
def output(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "out")
    return f"s3://{request.getfixturevalue('s3_bucket')}/out"


class RefusesAfter:
    """A fence that lets `passes` writes through, then refuses (a run that has lost the output meanwhile)."""

    def __init__(self, passes: int) -> None:
        self.passes = passes

    def check(self) -> None:
        from pipeline.table.lease import LeaseLostError

        if self.passes <= 0:
            raise LeaseLostError("taken over")
        self.passes -= 1


def test_markers_and_first_part_names_are_written_only_against_what_was_read(output: str):
    """The store enforces it (moto enforces If-None-Match and If-Match; locally link() and the lock): a commit
    that read "no marker" never replaces one another holder wrote meanwhile unless its fence still passes
    when it has read that one, and a part's first name is never written over."""
    from pipeline.table.lease import LeaseLostError

    ledger = Ledger(output)
    theirs = Marker.of("000001", {"rows": 1, "fingerprint": "f", "holder": OTHER, "part": part_name("000001")})
    ours = Marker.of("000001", {"rows": 2, "fingerprint": "f", "holder": RUN, "part": part_name("000001", RUN)})
    ledger.publish_marker(theirs, None)
    seen = ledger.read_marker("000001")
    assert seen is not None and seen.marker == theirs
    # The primitives: create refuses an existing marker, replace refuses a version that is no longer there.
    target = ledger._marker_file("000001")
    assert target.create_exclusive(b"{}") is None and target.replace_if(b"stale" if "://" not in output
                                                                         else '"stale"', b"{}") is None
    # A run whose fence fails once it has seen the other holder's marker writes nothing over it.
    with pytest.raises(LeaseLostError):
        ledger.publish_marker(ours, None, RefusesAfter(1))
    assert ledger.marker("000001") == theirs
    # The lease holder (its fence passes) replaces exactly what it read, and a retried write that had landed
    # counts as written.
    ledger.publish_marker(ours, seen)
    assert ledger.marker("000001") == ours
    ledger.publish_marker(ours, seen)  # as a retry whose first attempt landed: the swap fails, the read is ours
    assert ledger.marker("000001") == ours
    # A part file's first name is created only if no file has it.
    assert ledger.create_part(part_name("000002"), b"first")
    assert not ledger.create_part(part_name("000002"), b"second")
    assert ledger.fs.cat_file(ledger.part_path(part_name("000002"))) == b"first"
    with pytest.raises(LeaseLostError):
        ledger.write_part(part_name("000002", RUN), b"late", RefusesAfter(0))
    assert not ledger.fs.exists(ledger.part_path(part_name("000002", RUN)))
