"""The run layer's records: work items as Ray Data rows, and the run summary as `run --json` and the manifest
hold it (same keys as ever, read back whole)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa

from pipeline.config import build_config
from pipeline.run.driver import format_summary, summarise
from pipeline.run.planning import WorkList
from pipeline.run.records import CommitStats, RunSummary, WorkItem
from pipeline.table.ledger import Ledger
from pipeline.table.records import Marker, ModeReport

# The keys `run --json` prints and the manifest's `last_summary` holds, in order: scripts read them.
SUMMARY_KEYS = ["output", "shards", "shards_committed_this_run", "images", "ok", "errors", "error_reasons", "modes",
                "seconds", "fingerprint", "commits", "duplicates", "engines", "nodes_lost"]
COMMITS_KEYS = ["per_s", "latency_p50_s", "latency_p99_s", "driver_loop_cpu_ms_per_1000_images",
                "commit_cpu_ms_per_1000_images", "where"]


def test_work_items_cross_ray_data_as_the_rows_they_always_were():
    items = WorkList(pending=["000000"], retry={"000001": ["b.jpg"]}, plan={}).items()
    assert items == [WorkItem("000000"), WorkItem("000001", ["b.jpg"])]
    rows = [item.to_row() for item in items]
    assert rows == [{"shard": "000000", "only": None}, {"shard": "000001", "only": ["b.jpg"]}]
    # read_and_prepare gets them back from an Arrow batch, as Ray Data hands it over.
    assert [WorkItem.from_row(row) for row in pa.Table.from_pylist(rows).to_pylist()] == items


def _summary() -> RunSummary:
    return RunSummary(output="/out", shards=2, shards_committed_this_run=1, images=20, ok=18, errors=2,
                      error_reasons={"empty file": 2}, modes={"tags": ModeReport(18, 1, 180, 1, 0.0556)},
                      seconds=12.5, fingerprint="fp",
                      commits=CommitStats(per_s=0.08, latency_p50_s=0.01, latency_p99_s=0.02,
                                          driver_loop_cpu_ms_per_1000_images=1.5,
                                          commit_cpu_ms_per_1000_images=2.5, where="the driver's loop"))


def test_the_summary_has_the_json_keys_and_reads_back_from_them():
    summary = _summary()
    printed = json.loads(json.dumps(summary.to_dict()))
    assert list(printed) == SUMMARY_KEYS and list(printed["commits"]) == COMMITS_KEYS
    assert printed["modes"]["tags"] == {"captions": 18, "glitched": 1, "tokens": 180, "retries": 1,
                                        "glitch_rate": 0.0556}
    assert RunSummary.from_dict(printed) == summary
    # A summary stored before `commits` existed, or with a key added since, still reads.
    older = {key: value for key, value in printed.items() if key != "commits"}
    assert RunSummary.from_dict({**older, "added_later": 1}).commits == CommitStats()


def test_the_summary_text():
    text = format_summary(_summary())
    assert "images      20 (18 captioned, 2 errors) in 2 shards (1 committed this run)" in text
    assert "mode tags         18 captions, 180 tokens, glitch rate 5.6% (1 retries)" in text
    assert "errors      empty file: 2" in text
    assert "commits     0.08 shards/s, latency p50 0.010 s, p99 0.020 s, on the driver's loop" in text
    assert "commits" not in format_summary(RunSummary(output="/out"))  # nothing committed: no commit line
    assert "nodes" not in text
    lost = format_summary(RunSummary(output="/out", nodes_lost=["node 10.0.0.7 (id 8b054846)"]))
    assert "nodes       1 lost mid-run (node 10.0.0.7 (id 8b054846)): its work in flight was redone" in lost


def test_summarise_counts_every_committed_shard_and_this_runs_commits(tmp_path: Path):
    config = build_config({"input": {"uri": str(tmp_path / "in")}, "output": {"uri": str(tmp_path / "out")},
                           "model": {"path": "m"}, "modes": [{"name": "tags", "type": "booru_like"}]})
    ledger = Ledger(str(tmp_path / "out"))
    earlier = Marker.of("000000", {"rows": 10, "ok": 10, "modes": {"tags": {"captions": 10, "tokens": 100}}})
    now = Marker.of("000001", {"rows": 10, "ok": 8, "errors": 2, "commit_s": 0.5, "error_reasons": {"empty file": 2},
                               "modes": {"tags": {"captions": 8, "glitched": 2, "tokens": 80}}})
    for marker in (earlier, now):
        ledger.write_marker(marker)
    committer = SimpleNamespace(committed=[now], commit_cpu_s=0.01, where="2 threads")
    summary = summarise(ledger, config, 4.0, committer, loop_cpu_s=0.02)  # type: ignore[arg-type]
    assert (summary.shards, summary.shards_committed_this_run, summary.images, summary.ok) == (2, 1, 20, 18)
    assert summary.modes == {"tags": ModeReport(18, 2, 180, 0, round(2 / 18, 4))}
    assert summary.commits == CommitStats(per_s=0.25, latency_p50_s=0.5, latency_p99_s=0.5,
                                          driver_loop_cpu_ms_per_1000_images=2000.0,
                                          commit_cpu_ms_per_1000_images=1000.0, where="2 threads")
    assert summary.fingerprint == config.fingerprint() and summary.error_reasons == {"empty file": 2}
