"""Where a run stands, read from its output folder alone (no Ray, no engine).

Everything comes from the ledger: the plan says how many shards there are, markers what is done
and how it went, `_staging/` what is in flight: in progress while a run holds the lease, else left by an
interrupted run (the next run clears it). A run counts as live while it holds the output's lease
(lease.py: renewed by its heartbeat, and on this machine its process still exists); only then is an ETA
given, from the recent shard rate. A run stopped by Ctrl-C released its lease; a killed one's lease
reads as gone at once on its own machine and as expired after its time to live elsewhere.
Works on local folders and s3:// alike, and on a run still in progress.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from pipeline.config.limits import STATUS_RATE_WINDOW_S
from pipeline.io.fs import join, list_names, to_uri
from pipeline.table.lease import read_lease
from pipeline.table.ledger import Ledger
from pipeline.table.names import MANIFEST, STAGING
from pipeline.table.records import LeaseStatus, StatusReport, Totals


def _mtime(info: dict[str, Any]) -> float | None:
    """A listing entry's modification time: local listings give `mtime`, S3 `LastModified`."""
    for name in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(name)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, int | float):
            return float(value)
    return None


def _entries(ledger: Ledger, path: str) -> list[dict[str, Any]]:
    """The files under a shard's staging folder, one level of run folders (`_staging/<shard>/<run>/`) down."""
    try:
        entries = ledger.fs.ls(path, detail=True, refresh=True)
    except FileNotFoundError:  # committed and cleared while we looked
        return []
    files = [entry for entry in entries if entry.get("type") != "directory"]
    for entry in entries:
        if entry.get("type") == "directory":
            try:
                files.extend(ledger.fs.ls(entry["name"], detail=True, refresh=True))
            except FileNotFoundError:
                continue
    return files


def _staging(ledger: Ledger) -> tuple[list[str], float | None]:
    """Shards with fragments in staging, and when the newest fragment was written."""
    shards, newest = [], None
    root = join(ledger.root, STAGING)
    for name in list_names(ledger.fs, root):
        entries = _entries(ledger, join(root, name))
        times = [t for t in (_mtime(entry) for entry in entries) if t is not None]
        if entries:
            shards.append(name)
        if times:
            newest = max(newest or 0.0, *times)
    return shards, newest


def _shard_rate(commit_times: list[float], now: float, created_at: float | None) -> float | None:
    """Shards per second: over recent commits when there are two or more, else over the whole run."""
    recent = [t for t in commit_times if t >= now - STATUS_RATE_WINDOW_S]  # see limits.py
    if len(recent) >= 2 and recent[-1] > recent[0]:
        return (len(recent) - 1) / (recent[-1] - recent[0])
    if commit_times and created_at and commit_times[-1] > created_at:
        return len(commit_times) / (commit_times[-1] - created_at)
    return None


def status(output_uri: str, storage_options: dict[str, Any] | None = None, now: float | None = None) -> StatusReport:
    """Counts, quality and progress of the run writing to `output_uri` (`now` is for tests)."""
    now = time.time() if now is None else now
    ledger = Ledger(output_uri, storage_options)
    manifest = ledger.manifest()
    if manifest is None:
        raise FileNotFoundError(f"{output_uri} has no {MANIFEST}: not a pipeline output, or its run has not started")
    plan = ledger.plan_complete()
    planned = int(plan["shards"]) if plan else sum(1 for _ in ledger.planned_ids())
    markers = ledger.markers(manifest.get("fingerprint"))  # a marker of another config is not committed
    staging, staged_at = _staging(ledger)
    commit_times = sorted(float(m.committed_at) for m in markers if m.committed_at)
    created_at = manifest.get("created_at")
    totals = Totals.of(markers, [m["name"] for m in manifest.get("modes", [])])
    ok, images = totals.ok, totals.rows
    last_commit = commit_times[-1] if commit_times else None
    last_activity = max((t for t in (last_commit, staged_at) if t is not None), default=None)
    lease = read_lease(output_uri, storage_options)
    lease_state = lease.state(now) if lease else None
    live = lease_state in ("held", "stale")
    elapsed = last_commit - created_at if last_commit and created_at else None
    pending = max(planned - len(markers), 0)
    rate = _shard_rate(commit_times, now, created_at) if live else None
    return StatusReport(
        output=to_uri(ledger.fs, ledger.root),
        fingerprint=manifest.get("fingerprint"),
        model=(manifest.get("model") or {}).get("path"),
        created_at=created_at,
        plan_complete=plan is not None,
        images_known=(plan or {}).get("images_known"),
        shards_planned=planned,
        shards_committed=len(markers),
        shards_pending=pending,
        shards_staging=staging,
        images_done=images,
        ok=ok,
        errors=totals.errors,
        error_share=round(totals.error_share, 4),
        error_reasons=totals.error_reasons,
        modes=totals.modes_report(),
        throughput_images_per_s=round(images / elapsed, 3) if elapsed and elapsed > 0 else None,
        last_commit_at=last_commit,
        last_activity_at=last_activity,
        live=live,
        lease=None if lease is None or lease_state is None else LeaseStatus(
            lease_state, lease.host, lease.pid, lease.renewed_at, lease.expires_at),
        shard_rate_per_s=round(rate, 5) if rate else None,
        eta_s=(0.0 if pending == 0 else round(pending / rate, 1) if rate else None) if live else None,
        checked_at=now,
        engines_last_run=(manifest.get("last_summary") or {}).get("engines"),
    )


def _duration(seconds: float) -> str:
    hours, rest = divmod(round(seconds), 3600)
    minutes, rest = divmod(rest, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {rest:02d} s" if minutes else f"{rest} s"


def format_status(report: StatusReport) -> str:
    """The status report as a few aligned lines for a terminal."""
    known = f", {report.images_known} images known" if report.images_known else ""
    plan = f"{report.shards_planned} shards{known}" + ("" if report.plan_complete else " (still planning)")
    lines = [f"output      {report.output}",
             f"model       {report.model or '?'}",
             f"plan        {plan}",
             f"shards      {_shards(report)}",
             f"images      {report.images_done} done ({report.ok} captioned, {report.errors} errors)"]
    if report.error_reasons:
        lines.append(f"errors      {report.error_share:.1%} of rows: " + ", ".join(
            f"{reason}: {count}" for reason, count in list(report.error_reasons.items())[:5]))
    for name, stats in report.modes.items():
        lines.append(f"mode {name:<12} {stats.captions} captions, {stats.tokens} tokens, "
                     f"glitch rate {stats.glitch_rate:.1%} ({stats.retries} retries)")
    if report.throughput_images_per_s is not None:
        lines.append(f"throughput  {report.throughput_images_per_s:.2f} images/s since the run was created")
    if report.engines_last_run:
        lines.append(f"engines     {report.engines_last_run} caption engines ran in the last finished run")
    lines.append(f"state       {_state(report)}")
    return "\n".join(lines)


def _shards(report: StatusReport) -> str:
    """Committed and pending; of the pending, those with fragments in staging are in progress only while a run
    holds the lease: without one, they are what an interrupted run left, which the next run clears."""
    text = f"{report.shards_committed} committed, {report.shards_pending} pending"
    staged = len(report.shards_staging)
    if not staged:
        return text
    if report.live:
        return f"{text} ({staged} in progress)"
    return f"{text}; {staged} with fragments left by an interrupted run (cleared at the next run)"


def _state(report: StatusReport) -> str:
    """Live (who holds the lease, how recent its heartbeat and last write, the ETA), or how it was left."""
    last, lease, now = report.last_activity_at, report.lease, report.checked_at
    if report.live and lease:
        state = f"live: host {lease.host}, pid {lease.pid}, heartbeat {_duration(max(now - lease.renewed_at, 0))} ago"
        if last is not None:
            state += f", last write {_duration(max(now - last, 0))} ago"
        if report.eta_s is not None:
            state += f"; ETA {_duration(report.eta_s)}" if report.eta_s else "; finishing"
        return state
    if last is None:
        return "nothing committed or in progress yet"
    stopped = " (its run stopped without finishing)" if lease and lease.state in ("gone", "expired") else ""
    return f"{'complete' if report.finished else 'idle'}{stopped}, last write {_duration(max(now - last, 0))} ago"
