"""Reading committed rows: markers decide what is output, and rows stream a batch at a time."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest

from pipeline.exports.table import check_modes, committed_files, iter_batches, iter_rows, open_output
from pipeline.table.names import part_name, part_path
from tests.unit.exports.fake_output import FakeOutput


def test_only_shards_with_markers_are_read(fake_output: FakeOutput) -> None:
    output = open_output(str(fake_output.output))
    assert output.shards == ("000000", "000001")
    keys = [row["key"] for row in iter_rows(output, ["key"])]
    assert sorted(keys) == sorted(fake_output.rows)
    assert "uncommitted/zzz.jpg" not in keys and "staged/yyy.jpg" not in keys


def test_committed_files_are_exactly_the_committed_table_for_any_reader(fake_output: FakeOutput) -> None:
    import duckdb
    import pyarrow.dataset as pads

    files = committed_files(str(fake_output.output))
    assert [Path(f).name for f in files] == [part_name("000000"), part_name("000001")]  # not 000002
    keys = pads.dataset(files, format="parquet").to_table(columns=["key"]).column("key").to_pylist()
    assert sorted(keys) == sorted(fake_output.rows)
    assert duckdb.sql(f"SELECT count(*) FROM read_parquet({files!r})").fetchall() == [(len(fake_output.rows),)]


def test_rows_stream_in_small_batches(fake_output: FakeOutput) -> None:
    output = open_output(str(fake_output.output))
    batches = list(iter_batches(output, ["key", "status"], batch_rows=4))
    assert max(batch.num_rows for batch in batches) == 4
    assert sum(batch.num_rows for batch in batches) == len(fake_output.rows)
    assert batches[0].schema.names == ["key", "status"]


def test_marker_without_part_file_is_skipped_with_a_warning(fake_output: FakeOutput,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    Path(part_path(str(fake_output.output), "000001")).unlink()
    with caplog.at_level(logging.WARNING, logger="pipeline.exports"):
        rows = list(iter_rows(open_output(str(fake_output.output)), ["shard"]))
    assert {row["shard"] for row in rows} == {"000000"}
    assert "000001" in caplog.text


def test_manifest_order_and_mode_checks(fake_output: FakeOutput) -> None:
    output = open_output(str(fake_output.output))
    assert output.mode_names == ["tags", "description"]
    assert output.input_uri == str(fake_output.input)
    assert check_modes(output, None) == ["tags", "description"]
    assert check_modes(output, ["description", "tags"]) == ["description", "tags"]
    with pytest.raises(ValueError, match="unknown modes"):
        check_modes(output, ["tags", "caption"])


def test_a_folder_without_manifest_is_not_an_output(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a pipeline output"):
        open_output(str(tmp_path))


def test_readers_go_by_the_part_each_marker_names_and_skip_markers_of_another_config(
        fake_output: FakeOutput) -> None:
    """A shard redone by --retry-errors has its part under its run's name, with the old part possibly still
    beside it (a kill before its removal); a marker a run of another config wrote late does not count."""
    import shutil

    from pipeline.table.ledger import Ledger

    out, run = str(fake_output.output), "c" * 32
    ledger = Ledger(out)
    redone = part_name("000001", run)
    shutil.copy(part_path(out, "000001"), part_path(out, "000001", redone))
    ledger.write_marker(dataclasses.replace(ledger.marker("000001"), part=redone, holder=run))
    shutil.copy(part_path(out, "000000"), part_path(out, "000004"))
    ledger.write_marker(dataclasses.replace(ledger.marker("000000"), shard="000004", fingerprint="another"))
    files = committed_files(out)
    assert [Path(f).name for f in files] == [part_name("000000"), redone]
    output = open_output(out)
    assert output.shards == ("000000", "000001")
    assert sorted(row["key"] for row in iter_rows(output, ["key"])) == sorted(fake_output.rows)
