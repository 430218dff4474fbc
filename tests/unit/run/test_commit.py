"""pipeline.run.commit: the driver's books and the self-checking commit (inline, no Ray)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.config import build_config
from pipeline.run.commit import CommitRequest, Committer, commit_shard
from pipeline.run.hooks import AFTER_MARKER, AFTER_PART_FILE, RunHooks
from pipeline.run.progress import Progress
from pipeline.table.fragments import write_expected, write_fragments
from pipeline.table.ledger import Ledger
from pipeline.table.names import part_name, part_path, staging_dir
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
    assert seen == [(AFTER_PART_FILE, True, False), (AFTER_MARKER, True, True)] and committer.committed


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
    original = Ledger.publish_marker

    def publish_marker(ledger: Ledger, marker, seen, fence) -> None:  # records which thread committed, then commits
        seen_threads.add(threading.current_thread().name)
        original(ledger, marker, seen, fence)

    monkeypatch.setattr(Ledger, "publish_marker", publish_marker)
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

    def full_disk(_ledger: Ledger, _marker, _seen, _fence=None) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(Ledger, "publish_marker", full_disk)
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


# Fenced, run-owned, replaced as a pair -------------------------------------------------------------------
RUN_A, RUN_B = "a" * 32, "b" * 32


def _request(out: Path, shard: str, run_id: str | None, keep: bool = False, hooks: RunHooks | None = None,
             fence=None, storage_options: dict | None = None) -> CommitRequest:
    return CommitRequest(shard, str(out), storage_options or {}, ["tags"], _committer(Path("/out")).metadata, keep,
                         0.0, hooks or RunHooks(), run_id, fence)


def _stage(out: Path, shard: str, rows: dict[str, str], run_id: str | None, expected: list[str] | None = None,
           storage_options: dict | None = None) -> None:
    """`rows` (key -> status) as run `run_id`'s fragments of `shard`, and the keys its read task recorded."""
    keys = sorted(rows)
    write_expected(str(out), storage_options or {}, shard, expected or keys, run_id)
    table = to_table({"key": keys, "shard": [shard] * len(keys), "status": [rows[key] for key in keys],
                      "tags": ["a cat" if rows[key] == "ok" else None for key in keys],
                      "error": [None if rows[key] == "ok" else "not an image" for key in keys],
                      "shard_size": [None] * (len(keys) - 1) + [len(keys)]}, in_flight_schema(["tags"]))
    write_fragments(table, str(out), storage_options or {}, run_id)


def _table_state(out: Path) -> dict[str, tuple[str, int, list[str]]]:
    """shard -> (part its marker names, rows the marker counts, keys in that part); fails on a marker whose
    part is missing."""
    state = {}
    for marker in Ledger(str(out)).markers():
        keys = pq.read_table(part_path(str(out), marker.shard, marker.part_file())).column("key").to_pylist()
        state[marker.shard] = (marker.part_file(), marker.rows, keys)
    return state


def _part_files(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "data").glob("*.parquet"))


def test_a_commit_refuses_to_write_once_its_lease_is_within_the_margin(tmp_path: Path):
    import pytest

    from pipeline.table.lease import LeaseLostError, OutputLease
    from tests.unit.waiting import FakeClock

    out = tmp_path / "out"
    monotonic = FakeClock(100.0)
    lease = OutputLease(str(out), ttl_s=30, monotonic=monotonic)  # no heartbeat: the clock says how old it is
    lease.acquire()
    _stage(out, "000000", {"a": "ok"}, lease.holder)
    monotonic.advance(20.5)  # 30 s lease, 10 s margin: 20 s after its last renewal a write is refused
    with pytest.raises(LeaseLostError, match="could not renew"):
        commit_shard(_request(out, "000000", lease.holder, fence=lease))
    assert not (out / "data").exists() and Ledger(str(out)).marker("000000") is None

    # Refused between the part file and the marker: the part is named by no marker (the next run removes it).
    monotonic.advance(-20.5)
    hold = RunHooks(pause=lambda moment: monotonic.advance(20.5) if moment == AFTER_PART_FILE else None)
    with pytest.raises(LeaseLostError):
        commit_shard(_request(out, "000000", lease.holder, hooks=hold, fence=lease))
    assert Ledger(str(out)).marker("000000") is None and _part_files(out) == [part_name("000000")]
    assert Ledger(str(out)).remove_uncommitted_parts([]) == 1


def test_a_task_commits_fence_refuses_after_the_records_valid_until(tmp_path: Path):
    """A Ray-task commit carries a StoredLeaseFence: the record, not the driver's object, decides."""
    import dataclasses
    import time

    import pytest

    from pipeline.io.fs import open_fs, write_atomic
    from pipeline.table.lease import LeaseLostError, OutputLease, read_lease
    from pipeline.table.names import lease_path

    out = tmp_path / "out"
    lease = OutputLease(str(out), ttl_s=30)
    lease.acquire()
    _stage(out, "000001", {"a": "ok"}, lease.holder)
    record = dataclasses.replace(read_lease(str(out)), expires_at=time.time() + 9)  # inside the 10 s margin
    fs, root = open_fs(str(out))
    write_atomic(fs, lease_path(root), record.to_bytes())  # as a driver frozen for 21 s would have left it
    with pytest.raises(LeaseLostError, match="not renewed in time"):
        commit_shard(_request(out, "000001", lease.holder, fence=lease.fence()))
    assert not (out / "data").exists() and Ledger(str(out)).marker("000001") is None
    write_atomic(fs, lease_path(root), dataclasses.replace(record, expires_at=time.time() + 30).to_bytes())
    assert commit_shard(_request(out, "000001", lease.holder, fence=lease.fence())).marker is not None


def test_only_the_committing_runs_fragments_are_merged_and_the_marker_names_holder_and_part(tmp_path: Path):
    out = tmp_path / "out"
    _stage(out, "000002", {"a": "ok", "b": "ok"}, RUN_B)
    _stage(out, "000002", {"a": "ok", "z": "ok"}, RUN_A)  # a run that lost the output, still writing
    result = commit_shard(_request(out, "000002", RUN_B))
    assert result.marker is not None and result.marker.holder == RUN_B
    assert result.marker.part == part_name("000002")
    assert result.marker.fingerprint == _committer(Path("/out")).metadata.fingerprint
    assert _table_state(out) == {"000002": (part_name("000002"), 2, ["a", "b"])}
    assert not Path(staging_dir(str(out), "000002")).exists()  # every run's fragments of it cleared
    again = commit_shard(_request(out, "000002", RUN_B))  # a retried task: its own marker, nothing rewritten
    assert again.marker == result.marker


def test_a_first_commit_whose_name_is_taken_writes_under_its_runs_name(tmp_path: Path):
    """A part a frozen run wrote late under the first name is never written over."""
    out = tmp_path / "out"
    (out / "data").mkdir(parents=True)
    Path(part_path(str(out), "000003")).write_bytes(b"a late part of another run")
    _stage(out, "000003", {"a": "ok"}, RUN_B)
    marker = commit_shard(_request(out, "000003", RUN_B)).marker
    assert marker is not None and marker.part == part_name("000003", RUN_B)
    assert _part_files(out) == [part_name("000003", RUN_B)]  # the unnamed one went once the marker was in


@pytest.mark.parametrize("stop_at", [AFTER_PART_FILE, AFTER_MARKER, "removing the old part"])
def test_a_retry_errors_replacement_cut_at_any_step_leaves_the_old_pair_or_the_new(tmp_path: Path, stop_at: str,
                                                                                   monkeypatch):
    out = tmp_path / "out"
    _stage(out, "000004", {"a": "ok", "b": "error"}, RUN_A)
    first = commit_shard(_request(out, "000004", RUN_A)).marker
    old = {"000004": (part_name("000004"), 2, ["a", "b"])}
    assert first is not None and _table_state(out) == old

    class KilledError(Exception):
        pass

    def kill(moment: str) -> None:
        if moment == stop_at:
            raise KilledError(moment)

    if stop_at == "removing the old part":
        def remove_part(_ledger: Ledger, _name: str) -> None:
            raise KilledError("removing")

        monkeypatch.setattr(Ledger, "remove_part", remove_part)
    _stage(out, "000004", {"b": "ok"}, RUN_B)  # --retry-errors: only the error row is redone
    with pytest.raises(KilledError):
        commit_shard(_request(out, "000004", RUN_B, keep=True, hooks=RunHooks(pause=kill)))
    new = {"000004": (part_name("000004", RUN_B), 2, ["a", "b"])}
    assert _table_state(out) == (old if stop_at == AFTER_PART_FILE else new)  # a whole pair, old or new
    assert _part_files(out) == sorted([part_name("000004"), part_name("000004", RUN_B)])
    monkeypatch.undo()
    ledger = Ledger(str(out))
    assert ledger.remove_uncommitted_parts(ledger.markers()) == 1  # what the next run does first
    assert _part_files(out) == [_table_state(out)["000004"][0]]
    if stop_at == AFTER_PART_FILE:  # the shard is still to redo: it commits on the next try
        _stage(out, "000004", {"b": "ok"}, RUN_B)
        assert commit_shard(_request(out, "000004", RUN_B, keep=True)).marker is not None
        assert _table_state(out) == new and _part_files(out) == [part_name("000004", RUN_B)]
    statuses = pq.read_table(part_path(str(out), "000004", _table_state(out)["000004"][0])).column("status")
    assert statuses.to_pylist() == ["ok", "ok"]


def test_a_marker_of_another_fingerprint_is_redone_and_its_pair_replaced(tmp_path: Path):
    from pipeline.table.records import Marker

    out = tmp_path / "out"
    (out / "data").mkdir(parents=True)
    Path(part_path(str(out), "000005")).write_bytes(b"another config's rows")
    Ledger(str(out)).write_marker(Marker.of("000005", {"rows": 7, "fingerprint": "another", "holder": RUN_A}))
    _stage(out, "000005", {"a": "ok"}, RUN_B)
    marker = commit_shard(_request(out, "000005", RUN_B)).marker
    assert marker is not None and marker.holder == RUN_B and marker.fingerprint != "another"
    assert _table_state(out) == {"000005": (part_name("000005", RUN_B), 1, ["a"])}
    assert _part_files(out) == [part_name("000005", RUN_B)]


def test_close_waits_for_every_task_commit_in_flight(tmp_path: Path, monkeypatch):
    """Committer.close() returns only once the commits it started as Ray tasks have ended (a fake Ray here:
    its tasks are futures on a thread pool, slow to finish)."""
    import concurrent.futures
    import threading
    import time

    import ray

    out = tmp_path / "out"
    config = build_config({"input": {"uri": str(tmp_path / "in")}, "output": {"uri": str(out)},
                           "model": {"path": "m"}, "modes": [{"name": "tags", "type": "booru_like"}],
                           "compute": {"commit_tasks": 2}})
    progress = Progress(total_shards=2, done_shards=0, images_known=2, mode_names=["tags"], interval=3600)
    committer = Committer(config, Ledger(str(out)), progress, run_id=RUN_A)
    pool = concurrent.futures.ThreadPoolExecutor(2)
    release = threading.Event()

    class SlowTask:
        def remote(self, request: CommitRequest) -> concurrent.futures.Future:
            return pool.submit(lambda: (release.wait(10), time.sleep(0.2), commit_shard(request))[-1])

    def wait(refs, num_returns=1, timeout=None, fetch_local=True):
        everything = num_returns >= len(refs)
        done, _ = concurrent.futures.wait(refs, timeout=timeout, return_when=concurrent.futures.ALL_COMPLETED
                                          if everything else concurrent.futures.FIRST_COMPLETED)
        ready = [ref for ref in refs if ref in done][:num_returns]
        return ready, [ref for ref in refs if ref not in ready]

    monkeypatch.setattr(committer, "_remote", lambda: SlowTask())
    monkeypatch.setattr(ray, "wait", wait)
    for shard in ("000006", "000007"):
        _stage(out, shard, {"a": "ok"}, RUN_A)
        committer.add(shard, 1, ["a"])
    assert len(committer.in_flight) == 2
    handles = list(committer.in_flight)
    release.set()
    committer.close()  # as on a run's error path, before the lease is released
    assert all(handle.done() for handle in handles) and not committer.in_flight
    assert {marker.shard for marker in Ledger(str(out)).markers()} == {"000006", "000007"}
    pool.shutdown()


def test_a_commit_rides_out_storage_faults_on_s3_and_one_that_never_clears_commits_nothing(
        tmp_path: Path, s3_server: str, s3_bucket: str, monkeypatch):
    """SlowDown, 500s and dropped connections on the part's and marker's PUTs and the staging reads are retried
    (the read path's policy); a fault that never clears raises TransientStorageError and leaves no marker."""
    from pipeline.io.fs import RETRY, TransientStorageError
    from tests.faults import Fault, FaultProxy

    monkeypatch.setattr(RETRY, "base_delay", 0.01)
    monkeypatch.setattr(RETRY, "max_delay", 0.05)
    with FaultProxy(s3_server) as proxy:
        options = {"endpoint_url": proxy.url, "config_kwargs": {"retries": {"max_attempts": 1}}}
        out = Path(f"{s3_bucket}/out")
        uri = f"s3://{out}"
        _stage(uri, "000008", {"a": "ok", "b": "error"}, RUN_A, storage_options=options)
        faults = [Fault.slow_down(key=r"/data/part-000008", method="PUT", times=3),
                  Fault.drop(key=r"/_markers/000008", method="PUT", times=2),
                  Fault.internal_error(key=r"/_staging/000008/", method="GET", times=2)]
        proxy.add(*faults)
        result = commit_shard(_request(uri, "000008", RUN_A, storage_options=options))
        assert result.marker is not None and result.marker.rows == 2
        assert [fault.injected for fault in faults] == [3, 2, 2]
        ledger = Ledger(uri, options)
        assert [marker.shard for marker in ledger.markers()] == ["000008"]
        assert sorted(ledger.fs.ls(f"{out}/data", refresh=True)) == [f"{out}/data/{part_name('000008')}"]

        _stage(uri, "000009", {"a": "ok"}, RUN_A, storage_options=options)
        proxy.add(Fault.internal_error(key=r"/_markers/000009", method="PUT", times=None))
        with pytest.raises(TransientStorageError, match="storage still failing"):
            commit_shard(_request(uri, "000009", RUN_A, storage_options=options))
        assert ledger.marker("000009") is None  # nothing half-committed: no marker, so not done
        assert ledger.remove_uncommitted_parts(ledger.markers()) == 1  # its part goes with the next run
