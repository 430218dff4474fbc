"""Progress lines: done/total, rates and ETA from what has arrived and been committed."""

from __future__ import annotations

from pipeline.progress import Progress
from pipeline.records import Marker


def test_progress_line_counts_arrivals_and_commits():
    progress = Progress(total_shards=4, done_shards=1, images_known=40, mode_names=["tags"], interval=3600)
    progress.images_arrived(10)
    progress.shard_done(Marker.of("000001", {"rows": 10, "modes": {"tags": {"captions": 10, "tokens": 250}}}))
    line = progress.line()
    assert line.startswith("shards 2/4 (") and "/s) | images 10/40 this run" in line
    assert "captions" in line and "tokens" in line and "ETA" in line and "unknown" not in line


def test_eta_is_unknown_before_any_commit():
    progress = Progress(total_shards=4, done_shards=0, images_known=0, mode_names=["tags"])
    assert progress.line().endswith("ETA unknown")
