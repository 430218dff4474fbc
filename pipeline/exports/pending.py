"""The note an export or gallery of an unfinished output prints: how much of the plan is not committed yet.

Exports hold committed shards only (table.py), which is right while a run writes, but a user reading
"880 rows written" should also learn that 120 more are planned. The counts are pipeline.table.status's own
(planned images from the plan summary, done images from the markers), not counted again here.
"""

from __future__ import annotations

from typing import Any

from pipeline.table.records import StatusReport


def _count(number: int, noun: str) -> str:
    return f"{number:,} {noun}{'' if number == 1 else 's'}"


def describe_pending(report: StatusReport, holder: str = "this export holds") -> str | None:
    """One line for a `pipeline.table.status.status` report of an unfinished output; None when it is finished."""
    done = report.images_done
    if report.finished:
        return None
    head = "note: the output is not finished: "
    if not report.plan_complete:
        return (f"{head}its run is still planning ({_count(report.shards_committed, 'shard')} committed so "
                f"far); {holder} the {_count(done, 'image')} committed")
    known = report.images_known or 0
    if known and known >= done:
        return (f"{head}{known - done:,} of {known:,} planned images are not committed yet; "
                f"{holder} the {done:,} committed")
    # Tar shards count their images only once read: say it in shards.
    return (f"{head}{report.shards_pending:,} of {_count(report.shards_planned, 'planned shard')} are not "
            f"committed yet; {holder} the {_count(done, 'image')} committed")


def pending_note(output_uri: str, storage_options: dict[str, Any] | None = None,
                 holder: str = "this export holds") -> str | None:
    """`describe_pending` of the output's current status (FileNotFoundError when it holds no run)."""
    from pipeline.table.status import status  # reads the lease too: kept out of the exports' import

    return describe_pending(status(output_uri, storage_options), holder)
