"""JSONL export: one UTF-8 JSON object per committed row with every column; local and S3 alike."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from pipeline.cli import main
from pipeline.exports.jsonl import export_jsonl
from pipeline.sink import output_schema
from tests.unit.exports.fake_output import MODES, FakeOutput


def _check_lines(text: str, fake: FakeOutput) -> None:
    rows = [json.loads(line) for line in text.splitlines()]
    assert len(rows) == len(fake.rows)
    assert {row["key"] for row in rows} == set(fake.rows)  # NUL, backslashes, non-ASCII round-trip
    assert all(list(row) == output_schema(MODES).names for row in rows)
    by_key = {row["key"]: row for row in rows}
    assert by_key["cat/a.jpg"]["tags_glitch"] == "repetition" and by_key["cat/a.jpg"]["tags_attempts"] == 2
    assert by_key["broken.jpg"]["status"] == "error" and by_key["broken.jpg"]["tags"] is None


def test_export_jsonl(fake_output: FakeOutput) -> None:
    target = fake_output.root / "exports" / "rows.jsonl"
    assert export_jsonl(str(fake_output.output), str(target), {}) == len(fake_output.rows)
    raw = target.read_bytes()
    assert "日本/画像.jpg".encode() in raw  # UTF-8, not \u escapes
    _check_lines(raw.decode("utf-8"), fake_output)
    assert [path.name for path in target.parent.iterdir()] == ["rows.jsonl"]  # no temporary left behind


def test_export_jsonl_gzip_through_the_cli(fake_output: FakeOutput, capsys) -> None:
    target = fake_output.root / "rows.jsonl.gz"
    assert main(["export", str(fake_output.output), "--format", "jsonl", "--to", str(target)]) == 0
    assert f"{len(fake_output.rows)} rows" in capsys.readouterr().out
    _check_lines(gzip.decompress(target.read_bytes()).decode("utf-8"), fake_output)


def test_export_jsonl_from_and_to_s3(fake_output: FakeOutput, s3_bucket: str, s3_fs) -> None:
    s3_fs.put(str(fake_output.output) + "/", f"{s3_bucket}/out/", recursive=True)
    target = f"s3://{s3_bucket}/exports/rows.jsonl"
    assert export_jsonl(f"s3://{s3_bucket}/out", target, {}) == len(fake_output.rows)
    s3_fs.invalidate_cache()
    _check_lines(s3_fs.cat_file(target).decode("utf-8"), fake_output)


def test_cli_refuses_a_missing_output(tmp_path: Path, capsys) -> None:
    assert main(["export", str(tmp_path), "--format", "jsonl", "--to", str(tmp_path / "x.jsonl")]) == 2
    assert "not a pipeline output" in capsys.readouterr().err
