"""`pipeline review`: the worst captions first, over a fake output (exports/review.py, cli/review.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli.main import main
from pipeline.exports.review import Criteria, worst
from pipeline.exports.table import open_output
from pipeline.table.names import part_path
from tests.unit.exports.fake_output import MODES, FakeOutput, build_output

CONFIDENCE = {("cat/a.png", "tags"): 0.05, ("cat/a.png", "description"): 0.7, ("dog/b.png", "tags"): 0.4,
              ("dog/b.png", "description"): 0.2, ("cat/a.jpg", "tags"): 0.95, ("cat/a.jpg", "description"): 0.9}


def _with_confidence(fake: FakeOutput, default: float = 0.99) -> None:
    path = part_path(str(fake.output), "000000")
    table = pq.read_table(path)
    keys, status = table.column("key").to_pylist(), table.column("status").to_pylist()
    for mode in MODES:
        values = [CONFIDENCE.get((key, mode), default) if ok == "ok" else None for key, ok in zip(keys, status,
                                                                                                   strict=True)]
        name = f"{mode}_confidence"
        table = table.set_column(table.column_names.index(name), name, pa.array(values, pa.float32()))
    pq.write_table(table, path)


@pytest.fixture
def output(tmp_path: Path) -> FakeOutput:
    fake = build_output(tmp_path, hostile=False)
    _with_confidence(fake)
    return fake


def _listed(fake: FakeOutput, criteria: Criteria, count: int = 5) -> list[tuple[str, str | None]]:
    return [(entry.key, entry.mode) for entry in worst(open_output(str(fake.output)), criteria, count)]


def test_flagged_first_then_ascending_confidence_and_none_last(output: FakeOutput):
    found = worst(open_output(str(output.output)), Criteria(), 100)
    assert [(e.key, e.mode) for e in found[:4]] == [("cat/a.jpg", "tags"), ("cat/a.png", "tags"),
                                                     ("dog/b.png", "description"), ("dog/b.png", "tags")]
    assert found[0].glitch == "repetition"
    ranked = [entry.confidence for entry in found[1:] if entry.confidence is not None]
    assert ranked == sorted(ranked)
    assert found[-1].confidence is None  # shard 000001's row has no confidence: last
    assert ("uncommitted/zzz.jpg", "tags") not in {(e.key, e.mode) for e in found}  # never an uncommitted shard
    assert all(entry.mode is not None for entry in found)  # error rows only when asked for


def test_filters(output: FakeOutput):
    assert _listed(output, Criteria(below=0.5)) == [("cat/a.png", "tags"), ("dog/b.png", "description"),
                                                    ("dog/b.png", "tags")]
    assert _listed(output, Criteria(modes=["description"], below=0.5)) == [("dog/b.png", "description")]
    assert _listed(output, Criteria(flag="repetition")) == [("cat/a.jpg", "tags")]
    assert _listed(output, Criteria(flag="truncated")) == []
    assert _listed(output, Criteria(error_kind="cannot identify image file <broken.jpg>")) == [("broken.jpg", None)]
    assert _listed(output, Criteria(error_kind="any", below=0.1)) == [("broken.jpg", None), ("cat/a.png", "tags")]
    assert _listed(output, Criteria(), count=2) == [("cat/a.jpg", "tags"), ("cat/a.png", "tags")]


def test_an_old_output_without_confidence_columns_still_reviews(tmp_path: Path):
    fake = build_output(tmp_path, hostile=False)
    path = part_path(str(fake.output), "000000")
    pq.write_table(pq.read_table(path).drop_columns([f"{mode}_confidence" for mode in MODES]), path)
    found = worst(open_output(str(fake.output)), Criteria(), 3)
    assert (found[0].key, found[0].glitch) == ("cat/a.jpg", "repetition")
    assert all(entry.confidence is None for entry in found)


def test_the_command_prints_json_worst_first(output: FakeOutput, capsys: pytest.CaptureFixture[str]):
    assert main(["review", str(output.output), "--worst", "3", "--json", "--mode", "tags"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(entry["key"], entry["confidence"] is not None) for entry in listed] == [
        ("cat/a.jpg", True), ("cat/a.png", True), ("dog/b.png", True)]
    assert listed[1]["confidence"] == pytest.approx(0.05)
    assert main(["review", str(output.output)]) == 0
    assert "cat/a.png" in capsys.readouterr().out
    assert main(["review", str(output.output), "--mode", "nope"]) == 2
