"""JSONL export: one UTF-8 JSON object per committed row with every column; local and S3 alike."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

from pipeline.cli.main import main
from pipeline.exports.jsonl import export_jsonl
from pipeline.exports.table import iter_batches
from pipeline.exports.targets import TargetError
from pipeline.table.schema import output_schema
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


def test_an_existing_file_is_kept_unless_overwrite(fake_output: FakeOutput, capsys) -> None:
    target = fake_output.root / "rows.jsonl"
    target.write_text("someone's file\n")
    command = ["export", str(fake_output.output), "--format", "jsonl", "--to", str(target)]
    assert main(command) == 2
    assert capsys.readouterr().err == f"error: {target} exists; pass --overwrite to replace it\n"
    assert target.read_text() == "someone's file\n"
    assert main([*command, "--overwrite"]) == 0
    _check_lines(target.read_text("utf-8"), fake_output)


def test_to_a_folder_is_refused_in_words(fake_output: FakeOutput, capsys) -> None:
    folder = fake_output.root / "exports"
    folder.mkdir()
    assert main(["export", str(fake_output.output), "--format", "jsonl", "--to", str(folder)]) == 2
    assert capsys.readouterr().err == (f"error: --to {folder} is a folder; jsonl export writes one file, "
                                       f"e.g. {folder}/captions.jsonl\n")
    assert list(folder.iterdir()) == []  # no hidden temporary holding the rows
    new = f"{fake_output.root}/new/"
    assert main(["export", str(fake_output.output), "--format", "jsonl", "--to", new, "--overwrite"]) == 2
    assert "is a folder" in capsys.readouterr().err and not os.path.exists(new)


def test_a_failed_export_writes_nothing(fake_output: FakeOutput, monkeypatch) -> None:
    from pipeline.exports import jsonl

    def failing(output, columns=None):
        yield from list(iter_batches(output, columns))[:1]
        raise OSError("storage went away")

    monkeypatch.setattr(jsonl, "iter_batches", failing)
    target = fake_output.root / "out" / "rows.jsonl"
    with pytest.raises(OSError, match="storage went away"):
        export_jsonl(str(fake_output.output), str(target))
    assert list(target.parent.iterdir()) == []


def test_s3_existing_object_is_kept(fake_output: FakeOutput, s3_bucket: str, s3_fs) -> None:
    s3_fs.put(str(fake_output.output) + "/", f"{s3_bucket}/out/", recursive=True)
    s3_fs.pipe_file(f"{s3_bucket}/rows.jsonl", b"old")
    with pytest.raises(TargetError, match="exists; pass --overwrite"):
        export_jsonl(f"s3://{s3_bucket}/out", f"s3://{s3_bucket}/rows.jsonl", {})
    with pytest.raises(TargetError, match="is a folder"):
        export_jsonl(f"s3://{s3_bucket}/out", f"s3://{s3_bucket}/out", {})
    assert export_jsonl(f"s3://{s3_bucket}/out", f"s3://{s3_bucket}/rows.jsonl", {}, overwrite=True) == len(
        fake_output.rows)
    s3_fs.invalidate_cache()
    _check_lines(s3_fs.cat_file(f"{s3_bucket}/rows.jsonl").decode("utf-8"), fake_output)
