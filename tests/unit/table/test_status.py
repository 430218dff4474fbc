"""Run status from the output folder alone: counts, glitch rates, throughput, liveness and ETA."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from pipeline.cli.main import main
from pipeline.io.sources import Shard
from pipeline.table.lease import OutputLease
from pipeline.table.ledger import Ledger
from pipeline.table.names import LEASE, plan_done_path, staging_dir
from pipeline.table.records import Marker, ModeReport, StatusReport
from pipeline.table.status import format_status, status

T0 = 1_700_000_000.0  # manifest created_at


def _marker(committed_at: float) -> dict:
    return {"rows": 10, "ok": 9, "errors": 1, "fingerprint": "fp", "committed_at": committed_at,
            "modes": {"tags": {"captions": 9, "glitched": 1, "tokens": 90, "retries": 1},
                      "description": {"captions": 9, "glitched": 0, "tokens": 300, "retries": 0}}}


def build(root: Path, staging_mtime: float | None = None, complete_plan: bool = True, live: bool = False) -> str:
    """5 planned shards; 3 committed at T0+900, +930, +960; shard 000003 in staging; `live`: a run (this
    process) holds the output's lease."""
    ledger = Ledger(str(root))
    if live:
        OutputLease(str(root)).acquire(wait=False)
    ledger.write_manifest({"fingerprint": "fp", "created_at": T0, "model": {"path": "tiny"},
                           "modes": [{"name": "tags"}, {"name": "description"}]})
    shards = [Shard(f"{i:06d}", "files", "/in", [f"{i}-{j}.jpg" for j in range(10)], 10) for i in range(5)]
    ledger.write_plan(shards)
    if not complete_plan:
        Path(plan_done_path(str(root))).unlink()
    for index, at in enumerate((T0 + 900, T0 + 930, T0 + 960)):
        ledger.write_marker(Marker.of(f"{index:06d}", _marker(at)))
    fragment = Path(staging_dir(str(root), "000003")) / "abc.parquet"
    fragment.parent.mkdir(parents=True)
    fragment.write_bytes(b"PAR1")
    if staging_mtime is not None:
        os.utime(fragment, (staging_mtime, staging_mtime))
    return str(root)


def test_counts_rates_and_eta_of_a_live_run(tmp_path: Path) -> None:
    report = status(build(tmp_path, staging_mtime=T0 + 1000, live=True), now=T0 + 1010)
    assert (report.shards_planned, report.shards_committed, report.shards_pending) == (5, 3, 2)
    assert report.shards_staging == ["000003"] and report.plan_complete
    assert (report.images_done, report.ok, report.errors, report.images_known) == (30, 27, 3, 50)
    assert list(report.modes) == ["tags", "description"]
    assert report.modes["tags"] == ModeReport(captions=27, glitched=3, tokens=270, retries=3,
                                              glitch_rate=round(3 / 27, 4))
    assert report.throughput_images_per_s == round(30 / 960, 3)
    assert report.live and report.last_activity_at == pytest.approx(T0 + 1000)
    assert report.shard_rate_per_s == pytest.approx(2 / 60, rel=1e-3)  # two intervals in 60 s
    assert report.eta_s == pytest.approx(60.0)  # 2 pending shards at one per 30 s
    text = format_status(report)
    assert "3 committed, 2 pending (1 in progress)" in text
    assert "30 done (27 captioned, 3 errors)" in text
    assert "glitch rate 11.1%" in text and "last write 10 s ago; ETA 1 min 00 s" in text
    assert f"live: host {socket.gethostname()}, pid {os.getpid()}" in text


def test_recent_writes_without_a_lease_are_not_live(tmp_path: Path) -> None:
    """A run stopped by Ctrl-C released its lease: however recent its last write, it is not live."""
    report = status(build(tmp_path, staging_mtime=T0), now=T0 + 1000)
    assert not report.live and report.last_activity_at == T0 + 960 and report.eta_s is None
    text = format_status(report)
    assert "idle, last write 40 s ago" in text
    # Nothing is in progress without a live lease: the staged shard is what the stopped run left.
    assert "in progress" not in text
    assert "3 committed, 2 pending; 1 with fragments left by an interrupted run (cleared at the next run)" in text


def test_the_lease_of_a_killed_run_is_not_live(tmp_path: Path) -> None:
    root = build(tmp_path, staging_mtime=T0)
    child = subprocess.run([sys.executable, "-c", "import sys; from pipeline.table.lease import OutputLease; "
                            "OutputLease(sys.argv[1]).acquire(wait=False)", root], check=True, cwd=Path.cwd())
    assert child.returncode == 0 and (tmp_path / LEASE).exists()  # exited without releasing: as if killed
    report = status(root, now=time.time())
    assert not report.live and report.lease is not None and report.lease.state == "gone"
    assert "its run stopped without finishing" in format_status(report)


def test_an_idle_run_has_no_eta(tmp_path: Path) -> None:
    report = status(build(tmp_path, staging_mtime=T0), now=T0 + 5000)
    assert not report.live and report.eta_s is None and report.shard_rate_per_s is None
    assert report.throughput_images_per_s == round(30 / 960, 3)  # unchanged by how long it sat idle
    assert "idle, last write 1 h 07 min ago" in format_status(report)


def test_a_finished_run_says_complete(tmp_path: Path) -> None:
    build(tmp_path, staging_mtime=T0)
    for index in (3, 4):
        Ledger(str(tmp_path)).write_marker(Marker.of(f"{index:06d}", _marker(T0 + 990 + index)))
    report = status(str(tmp_path), now=T0 + 4000)
    assert report.shards_pending == 0 and "complete, last write" in format_status(report)


def test_plan_still_being_written(tmp_path: Path) -> None:
    report = status(build(tmp_path, staging_mtime=T0, complete_plan=False), now=T0 + 1000)
    assert not report.plan_complete and report.shards_planned == 5 and report.images_known is None
    assert "(still planning)" in format_status(report)


def test_a_new_run_with_nothing_done(tmp_path: Path) -> None:
    Ledger(str(tmp_path)).write_manifest({"fingerprint": "fp", "created_at": time.time(), "modes": [{"name": "t"}]})
    report = status(str(tmp_path))
    assert (report.shards_planned, report.images_done, report.throughput_images_per_s) == (0, 0, None)
    assert not report.live and report.modes["t"].glitch_rate == 0.0
    assert "nothing committed or in progress yet" in format_status(report)


def test_not_an_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(FileNotFoundError, match="not a pipeline output"):
        status(str(tmp_path))
    assert main(["status", str(tmp_path)]) == 2
    assert "not a pipeline output" in capsys.readouterr().err


def test_cli_status_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", build(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["shards_committed"] == 3 and report["modes"]["description"]["tokens"] == 900
    assert main(["status", str(tmp_path)]) == 0
    assert "3 committed, 2 pending" in capsys.readouterr().out


# The keys `status --json` prints, in order (README: pipeline status): scripts read them.
STATUS_KEYS = ["output", "fingerprint", "model", "created_at", "plan_complete", "images_known", "shards_planned",
               "shards_committed", "shards_pending", "shards_staging", "images_done", "ok", "errors", "error_share",
               "error_reasons", "modes", "throughput_images_per_s", "last_commit_at", "last_activity_at", "live",
               "lease", "shard_rate_per_s", "eta_s", "checked_at", "engines_last_run"]


def test_the_report_has_the_json_keys_and_reads_back_from_them(tmp_path: Path) -> None:
    report = status(build(tmp_path, staging_mtime=T0 + 1000, live=True), now=T0 + 1010)
    printed = json.loads(json.dumps(report.to_dict()))
    assert list(printed) == STATUS_KEYS
    assert list(printed["lease"]) == ["state", "host", "pid", "renewed_at", "expires_at"]
    assert list(printed["modes"]["tags"]) == ["captions", "glitched", "tokens", "retries", "glitch_rate"]
    assert StatusReport.from_dict(printed) == report
    assert StatusReport.from_dict({**printed, "lease": None, "added_later": 1}) == replace(report, lease=None)
    assert StatusReport.from_dict({"output": "o"}).finished is False  # what an older writer lacks: defaults


def test_status_on_s3(tmp_path: Path, s3_bucket: str, s3_fs) -> None:
    s3_fs.put(build(tmp_path / "local") + "/", f"{s3_bucket}/run/", recursive=True)
    report = status(f"s3://{s3_bucket}/run", now=time.time())
    assert (report.shards_planned, report.shards_committed, report.shards_staging) == (5, 3, ["000003"])
    assert report.output == f"s3://{s3_bucket}/run"
    assert not report.live  # no run holds the lease
    assert report.last_activity_at == pytest.approx(time.time(), abs=60)  # the staging object's LastModified


def test_fragments_in_a_runs_folder_count_and_a_marker_of_another_config_does_not(tmp_path: Path) -> None:
    root = build(tmp_path, staging_mtime=T0 + 970)
    fragment = Path(staging_dir(root, "000004", "a" * 32)) / "def.parquet"  # how runs stage fragments now
    fragment.parent.mkdir(parents=True)
    fragment.write_bytes(b"PAR1")
    os.utime(fragment, (T0 + 990, T0 + 990))
    Ledger(root).write_marker(Marker.of("000004", {**_marker(T0 + 980), "fingerprint": "another config's"}))
    report = status(root, now=T0 + 1000)
    assert report.shards_staging == ["000003", "000004"] and report.last_activity_at == T0 + 990
    assert (report.shards_committed, report.shards_pending, report.images_done) == (3, 2, 30)
