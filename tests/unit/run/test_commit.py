"""pipeline.run.commit: the driver's books and the self-checking commit (inline, no Ray)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.config import build_config
from pipeline.run.commit import CommitRequest, Committer, commit_shard
from pipeline.run.hooks import AFTER_PART_FILE, RunHooks
from pipeline.run.progress import Progress
from pipeline.table.fragments import write_expected, write_fragments
from pipeline.table.ledger import Ledger
from pipeline.table.names import part_path, staging_dir
from pipeline.table.records import WriteReport
from pipeline.table.schema import in_flight_schema, to_table


def _committer(out: Path, threads: int = 0) -> Committer:
    config = build_config({"input": {"uri": str(out.parent / "in")}, "output": {"uri": str(out)},
                           "model": {"path": "m"}, "modes": [{"name": "tags", "type": "booru_like"}],
                           "compute": {"commit_tasks": 0, "commit_threads": threads}})
    progress = Progress(total_shards=2, done_shards=0, images_known=4, mode_names=["tags"], interval=3600)
    return Committer(config, Ledger(str(out)), progress)


def _arrive(committer: Committer, out: Path, shard: str, keys: list[str], size: int | None) -> None:
    rows = len(keys)
    table = to_table({"key": keys, "shard": [shard] * rows, "status": ["ok"] * rows, "tags": ["a cat"] * rows,
                      "shard_size": [None] * (rows - 1) + [size]}, in_flight_schema(["tags"]))
    for row in write_fragments(table, str(out), {}):
        report = WriteReport.from_row(row)  # as the driver reads the write stage's rows back
        committer.add(report.shard, report.shard_size, report.keys)


def test_a_shard_commits_once_its_last_row_says_how_many_keys_it_has(tmp_path: Path):
    out = tmp_path / "out"
    committer = _committer(out)
    write_expected(str(out), {}, "000000", ["a", "b", "c"])
    _arrive(committer, out, "000000", ["a", "b"], None)
    assert not committer.committed and committer.arrived == {"000000": {"a", "b"}}
    _arrive(committer, out, "000000", ["c"], 3)
    [marker] = committer.committed
    assert (marker.shard, marker.rows, marker.ok, marker.modes["tags"].captions) == ("000000", 3, 3, 3)
    assert marker.commit_s is not None and marker.commit_s >= 0
    assert pq.read_table(part_path(str(out), "000000")).column("key").to_pylist() == ["a", "b", "c"]
    assert Ledger(str(out)).marker("000000") == marker
    assert not Path(staging_dir(str(out), "000000")).exists()


def test_a_shard_whose_fragments_are_short_is_refused_and_handed_back(tmp_path: Path):
    out = tmp_path / "out"
    committer = _committer(out)
    write_expected(str(out), {}, "000001", ["a", "b", "c"])
    _arrive(committer, out, "000001", ["a"], None)
    for fragment in Path(staging_dir(str(out), "000001")).glob("*.parquet"):
        fragment.unlink()  # lost: what a second run's clean-up did to the first run before leases
    _arrive(committer, out, "000001", ["b", "c"], 3)
    assert not committer.committed and "1 missing" in committer.refused["000001"]
    assert not Path(part_path(str(out), "000001")).exists() and Ledger(str(out)).marker("000001") is None
    assert committer.take_unfinished() == ["000001"]
    assert not Path(staging_dir(str(out), "000001")).exists() and not committer.refused


def test_a_report_that_undercounts_the_shard_never_commits_it_short(tmp_path: Path):
    out = tmp_path / "out"
    committer = _committer(out)
    write_expected(str(out), {}, "000003", ["a", "b", "c", "d"])  # what the read task read
    _arrive(committer, out, "000003", ["a", "b", "c"], 3)
    assert not committer.committed and "1 missing (e.g. ['d'])" in committer.refused["000003"]
    assert not Path(part_path(str(out), "000003")).exists()


def test_a_commit_calls_its_pause_hook_between_the_part_file_and_the_marker(tmp_path: Path):
    out = tmp_path / "out"
    committer = _committer(out)
    seen: list[tuple[str, bool, bool]] = []  # (moment, part file written, marker written)

    def pause(moment: str) -> None:
        marker = Ledger(str(out)).marker("000004")
        seen.append((moment, Path(part_path(str(out), "000004")).exists(), marker is not None))

    committer.hooks = RunHooks(pause=pause)
    write_expected(str(out), {}, "000004", ["a"])
    _arrive(committer, out, "000004", ["a"], 1)
    assert seen == [(AFTER_PART_FILE, True, False)] and committer.committed


def test_commit_shard_is_safe_to_run_twice(tmp_path: Path):
    out = tmp_path / "out"
    write_expected(str(out), {}, "000002", ["a"])
    committer = _committer(out)
    _arrive(committer, out, "000002", ["a"], 1)
    first = Ledger(str(out)).marker("000002")
    request = CommitRequest("000002", str(out), {}, ["tags"], committer.metadata, False, 0.0)
    again = commit_shard(request)  # staging is gone: a retried task finds the marker and stops there
    assert again.marker == first and again.refused is None


def test_commit_threads_commit_many_shards_at_once_and_a_repeated_report_is_ignored(tmp_path: Path, monkeypatch):
    import threading

    out = tmp_path / "out"
    committer = _committer(out, threads=4)
    shards = [f"{index:06d}" for index in range(12)]
    for shard in shards:
        write_expected(str(out), {}, shard, [f"{shard}-a", f"{shard}-b"])
    seen_threads: set[str] = set()
    original = Ledger.write_marker

    def write_marker(ledger: Ledger, marker) -> None:  # records which thread committed, then commits
        seen_threads.add(threading.current_thread().name)
        original(ledger, marker)

    monkeypatch.setattr(Ledger, "write_marker", write_marker)
    try:
        for shard in shards:
            _arrive(committer, out, shard, [f"{shard}-a", f"{shard}-b"], 2)
        _arrive(committer, out, shards[0], [f"{shards[0]}-a"], 2)  # a retried task's report, after the commit
        committer.drain()
    finally:
        committer.close()
    assert sorted(marker.shard for marker in committer.committed) == shards
    assert all(name.startswith("commit") for name in seen_threads)  # off the loop's thread
    assert not committer.arrived and committer.take_unfinished() == []
    assert committer.commit_cpu_s > 0
    assert all(Ledger(str(out)).marker(shard) is not None for shard in shards)


def test_a_commit_that_raises_raises_on_the_loops_thread(tmp_path: Path, monkeypatch):
    import pytest

    out = tmp_path / "out"
    committer = _committer(out, threads=2)
    write_expected(str(out), {}, "000009", ["a"])

    def full_disk(_ledger: Ledger, _marker) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(Ledger, "write_marker", full_disk)
    try:
        _arrive(committer, out, "000009", ["a"], 1)
        with pytest.raises(OSError, match="disk full"):
            committer.drain()
    finally:
        committer.close()
    assert Ledger(str(out)).marker("000009") is None


def test_error_reasons_are_counted_by_kind_and_the_verdict_names_them():
    import pytest

    from pipeline.run.driver import UnhealthyOutputError, check_health
    from pipeline.run.records import RunSummary
    from pipeline.table.records import Marker, Totals, reason_kind

    assert reason_kind("empty file (0 bytes)") == "empty file"
    assert reason_kind("corrupt image (OSError: broken)") == "corrupt image"
    assert reason_kind("unreadable row group 12: OSError: bad") == "unreadable row group N"
    assert reason_kind(None) == "unknown"
    totals = Totals.of([Marker.of("000000", {"rows": 4, "ok": 1, "errors": 3,
                                             "error_reasons": {"not an image": 2, "empty file": 1}}),
                        Marker.of("000001", {"rows": 2, "ok": 2, "errors": 0})])
    assert totals.error_share == 0.5 and list(totals.error_reasons) == ["not an image", "empty file"]
    summary = RunSummary(output="out", images=totals.rows, ok=totals.ok, errors=totals.errors,
                         error_reasons=totals.error_reasons)
    check_health(summary, 0.5)  # at the limit: fine
    with pytest.raises(UnhealthyOutputError, match=r"50% of the rows are errors.*not an image \(2\)"):
        check_health(summary, 0.4)
    with pytest.raises(UnhealthyOutputError, match="no image was captioned"):
        check_health(dataclasses.replace(summary, ok=0), 1.0)
    check_health(RunSummary(output="out"), 0.5)  # nothing planned
