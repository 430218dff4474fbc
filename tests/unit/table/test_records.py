"""The table layer's records that travel: a write task's report as a Ray Data row, and a mode's line of counts."""

from __future__ import annotations

import numpy as np

from pipeline.table.records import WRITE_REPORT_SCHEMA, ModeReport, ModeStats, Totals, WriteReport


def test_write_reports_cross_ray_data_as_rows_and_come_back_typed():
    reports = [WriteReport("000001", None, ["a", "b"]), WriteReport("000002", 3, ["c"])]
    table = WriteReport.to_table(reports)
    assert table.schema == WRITE_REPORT_SCHEMA
    assert table.to_pylist() == [{"shard": "000001", "shard_size": None, "keys": ["a", "b"]},
                                 {"shard": "000002", "shard_size": 3, "keys": ["c"]}]
    assert [WriteReport.from_row(row) for row in table.to_pylist()] == reports
    # Ray Data may hand a list column back as an array, and an integer as a NumPy scalar.
    assert WriteReport.from_row({"shard": "000002", "shard_size": np.int64(3), "keys": np.array(["c"])}) == reports[1]


def test_mode_reports_keep_the_keys_the_summary_and_status_print():
    totals = Totals(shards=1, rows=10, ok=8, errors=2, modes={"tags": ModeStats(8, 2, 80, 1)})
    report = totals.modes_report()["tags"]
    assert report == ModeReport(captions=8, glitched=2, tokens=80, retries=1, glitch_rate=0.25)
    assert report.to_dict() == {"captions": 8, "glitched": 2, "tokens": 80, "retries": 1, "glitch_rate": 0.25}
    assert ModeReport.from_dict(report.to_dict()) == report
    assert Totals(0, 0, 0, 0, {"tags": ModeStats()}).modes_report()["tags"].glitch_rate == 0.0  # nothing captioned
