"""The output's file names: pinned, since outputs written by earlier versions must still resume and export."""

from __future__ import annotations

from pipeline.io.fs import temporary_beside
from pipeline.table import names


def test_the_layout_of_an_output() -> None:
    root = "/out"
    assert names.manifest_path(root) == "/out/_manifest.json"
    assert names.lease_path(root) == "/out/_lease.json" and names.LEASE_LOCK == ".lease.lock"
    assert names.plan_path(root, "000042") == "/out/_plan/000042.json"
    assert names.plan_done_path(root) == "/out/_plan/_complete.json"
    run = "0123456789abcdef" * 2  # a run's id: its lease's holder id
    assert names.staging_dir(root, "000042") == "/out/_staging/000042"  # every run's fragments of the shard
    assert names.staging_dir(root, "000042", run) == f"/out/_staging/000042/{run}"
    assert names.expected_path(root, "000042", run) == f"/out/_staging/000042/{run}/_expected.json"
    assert names.part_path(root, "000042") == "/out/data/part-000042.parquet"  # a first commit's
    assert names.part_name("000042", run) == "part-000042-0123456789ab.parquet"  # a redone shard's, by run
    assert names.part_path(root, "000042", "part-000042-0123456789ab.parquet") == \
        "/out/data/part-000042-0123456789ab.parquet"
    assert names.marker_path(root, "000042") == "/out/_markers/000042.json"
    assert names.RESERVED == ("_manifest.json", "_plan", "_staging", "_markers", "data")
    assert names.plan_path("", "000042") == "_plan/000042.json"  # relative to the output, for messages


def test_shard_files_and_part_files_are_recognised() -> None:
    assert names.SHARD_FILE.match(names.shard_file("000042"))
    assert names.shard_of_file(names.shard_file("1234567")) == "1234567"
    assert not any(names.SHARD_FILE.match(name) for name in ("_complete.json", "42.json", "000042.json.bak"))
    match = names.PART_FILE.match(names.part_name("000042"))
    assert match and match.group(1) == "000042" and match.group(2) is None
    match = names.PART_FILE.match(names.part_name("000042", "abcdef012345" * 3))
    assert match and match.groups() == ("000042", "abcdef012345")
    leftover = temporary_beside(names.part_path("/out", "000042")).rsplit("/", 1)[1]  # a killed local write's
    match = names.PART_FILE.match(leftover)
    assert match and match.group(1) == "000042"
    assert not any(names.PART_FILE.match(name) for name in ("part-42.parquet", "mine.parquet",
                                                            ".tmp-xyz-part-000042.parquet",
                                                            "part-000042-mine.parquet"))
    assert names.SHARD_ID.fullmatch("000042") and not names.SHARD_ID.fullmatch("00042a")
