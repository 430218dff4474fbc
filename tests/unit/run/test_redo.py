"""`run --redo`: parsing a selection, and the committed rows it picks (run/redo.py)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.run.planning import WorkList
from pipeline.run.records import WorkItem, work_rows
from pipeline.run.redo import Below, Glitched, parse_selection, redo_work
from pipeline.table.ledger import Ledger
from pipeline.table.names import part_path
from tests.unit.exports.fake_output import MODES, build_output


def test_selections_parse_and_combine():
    files = {"keys.txt": "a.jpg\n\n  b.jpg \n"}
    selection = parse_selection(["confidence<0.3", "glitch=repetition, tags.glitch", "keys=keys.txt",
                                 "description.confidence<=0.5"], read_text=files.__getitem__)
    assert selection.below == [Below(0.3), Below(0.5, inclusive=True, mode="description")]
    assert selection.glitched == [Glitched("repetition"), Glitched(None, "tags")]
    assert selection.keys == {"a.jpg", "b.jpg"}
    assert not parse_selection([])


@pytest.mark.parametrize("spec", ["confidence>0.3", "confidence<abc", "glitches", "seed=3", "confidence<"])
def test_bad_selections_are_refused(spec: str):
    with pytest.raises(ValueError):
        parse_selection([spec])


def test_a_criterion_naming_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="nope"):
        parse_selection(["nope.glitch"]).modes(MODES)


def test_matching_is_the_union_and_a_missing_confidence_never_matches():
    selection = parse_selection(["confidence<0.3", "glitch=truncated"])
    row = {"key": "k", "tags_confidence": 0.9, "description_confidence": None, "tags_glitch": None,
           "description_glitch": None}
    assert not selection.matches(row, MODES)
    assert selection.matches({**row, "description_confidence": 0.2}, MODES)
    assert selection.matches({**row, "tags_glitch": "truncated"}, MODES)
    assert not selection.matches({**row, "tags_glitch": "repetition"}, MODES)
    assert not parse_selection(["description.confidence<0.95"]).matches(row, MODES)
    assert parse_selection(["tags.confidence<0.95"]).matches(row, MODES)


def _set_confidence(output: Path, shard: str, values: dict[str, float]) -> None:
    path = part_path(str(output), shard)
    table = pq.read_table(path)
    for mode in MODES:
        column = f"{mode}_confidence"
        filled = [values.get(key) if ok == "ok" else None
                  for key, ok in zip(table.column("key").to_pylist(), table.column("status").to_pylist(), strict=True)]
        table = table.set_column(table.column_names.index(column), column, pa.array(filled, pa.float32()))
    pq.write_table(table, path)


def test_redo_work_picks_committed_rows_per_shard_with_their_attempts(tmp_path: Path):
    fake = build_output(tmp_path, hostile=False)
    _set_confidence(fake.output, "000000", {"cat/a.png": 0.1, "dog/b.png": 0.8, "cat/a.jpg": 0.9})
    ledger = Ledger(str(fake.output))
    (tmp_path / "keys.txt").write_text("shard/000001\n")
    work = redo_work(ledger, MODES, parse_selection(["confidence<0.5", "glitch", f"keys={tmp_path / 'keys.txt'}"]))
    assert work.keys == {"000000": ["cat/a.jpg", "cat/a.png"], "000001": ["shard/000001"]}
    assert work.bases == {"000000": {"cat/a.jpg": 2, "cat/a.png": 1}, "000001": {"shard/000001": 1}}
    # The uncommitted shard 000002's rows are never picked, whatever they hold.
    assert redo_work(ledger, MODES, parse_selection(["keys=" + str(tmp_path / "none.txt")],
                                                    read_text=lambda _: "uncommitted/zzz.jpg")).keys == {}


def test_redo_work_reads_an_old_output_without_confidence_columns(tmp_path: Path):
    fake = build_output(tmp_path, hostile=False)
    path = part_path(str(fake.output), "000000")
    table = pq.read_table(path)
    pq.write_table(table.drop_columns([f"{mode}_confidence" for mode in MODES]), path)
    work = redo_work(Ledger(str(fake.output)), MODES, parse_selection(["confidence<1", "glitch=repetition"]))
    assert work.keys == {"000000": ["cat/a.jpg"]}


def test_redo_bases_cross_ray_data_with_their_keys_and_plain_items_keep_their_rows():
    items = WorkList(pending=["000000"], retry={"000001": ["a", "b"], "000002": ["c"]}, plan={},
                     bases={"000001": {"b": 3}}).items()
    assert items == [WorkItem("000000"), WorkItem("000001", ["a", "b"], [0, 3]), WorkItem("000002", ["c"])]
    rows = work_rows(items)
    assert all(set(row) == {"shard", "only", "bases"} for row in rows)
    assert [WorkItem.from_row(row) for row in pa.Table.from_pylist(rows).to_pylist()] == items
    assert work_rows([WorkItem("000000")]) == [{"shard": "000000", "only": None}]
