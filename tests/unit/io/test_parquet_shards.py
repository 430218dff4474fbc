"""Parquet: planned by row groups into shards of about shard_size rows, read group by group, damage kept small."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import InputConfig
from pipeline.io import sharding as plan
from pipeline.io.sources import Record, Shard, plan_shards, read_shard
from tests.unit.waiting import wait_until


def values(count: int, start: int = 0) -> list[bytes]:
    return [f"image {index}".encode() for index in range(start, start + count)]


def write(path: Path, count: int, row_group_size: int, start: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"image": pa.array(values(count, start), pa.binary()), "n": list(range(count))}), path,
                   row_group_size=row_group_size)
    return path


def read(shard: Shard, config: InputConfig) -> list[Record]:
    size, records = read_shard(shard, config)
    listed = list(records)
    assert size == len(listed)
    return listed


def test_a_file_is_cut_into_row_group_ranges(tmp_path: Path) -> None:
    write(tmp_path / "in" / "x" / "part-0.parquet", 150, 40)  # row groups of 40, 40, 40, 30
    config = InputConfig(uri=str(tmp_path / "in"), shard_size=100)
    shards = list(plan_shards(config))
    assert [(s.id, s.container, s.row_groups, s.first_row, s.size) for s in shards] == [
        ("000000", "x/part-0.parquet", [0, 2], 0, 80), ("000001", "x/part-0.parquet", [2, 4], 80, 70)]
    assert all(s.units() == ["x/part-0.parquet"] for s in shards)
    records = [record for shard in shards for record in read(shard, config)]
    assert [r.key for r in records] == [f"x/part-0/{row:08d}" for row in range(150)]  # rows of the file
    assert [r.data for r in records] == values(150)
    assert [r.member for r in records] == [str(row) for row in range(150)]
    assert [Shard.from_json(s.to_json()) for s in shards] == shards


def test_a_big_row_group_stays_one_shard_and_an_empty_file_is_one_empty_shard(tmp_path: Path) -> None:
    write(tmp_path / "in" / "a.parquet", 150, 1000)
    write(tmp_path / "in" / "b.parquet", 0, 10)
    config = InputConfig(uri=str(tmp_path / "in"), shard_size=100)
    a, b = plan_shards(config)
    assert (a.row_groups, a.size, b.size) == ([0, 1], 150, 0)
    assert len(read(a, config)) == 150 and read(b, config) == []


def _corrupt_row_group(path: Path, index: int) -> None:
    column = pq.ParquetFile(path).metadata.row_group(index).column(0)
    data = bytearray(path.read_bytes())
    start = column.data_page_offset
    data[start:start + 64] = b"\xff" * 64  # the page header: no decoder gets past it
    path.write_bytes(bytes(data))


def test_a_corrupt_row_group_is_one_error_row_per_row(tmp_path: Path) -> None:
    path = write(tmp_path / "c.parquet", 30, 10)
    _corrupt_row_group(path, 1)
    config = InputConfig(uri=str(path))
    [shard] = plan_shards(config)
    records = read(shard, config)
    assert [r.key for r in records] == [f"c/{row:08d}" for row in range(30)]
    assert [r.data for r in records[:10] + records[20:]] == values(10) + values(10, 20)
    assert all(r.data is None and (r.error or "").startswith("unreadable row group 1: ") for r in records[10:20])


def test_an_unreadable_footer_is_one_error_row(tmp_path: Path) -> None:
    path = write(tmp_path / "in" / "broken.parquet", 30, 10)
    path.write_bytes(path.read_bytes()[:-20])
    write(tmp_path / "in" / "good.parquet", 3, 10)
    config = InputConfig(uri=str(tmp_path / "in"))
    broken, good = plan_shards(config)
    assert (broken.row_groups, broken.size, good.size) == (None, 1, 3)
    [record] = read(broken, config)
    assert record.key == "broken" and (record.error or "").startswith("unreadable object: ")
    assert [r.key for r in read(good, config)] == ["good/00000000", "good/00000001", "good/00000002"]


def test_a_file_changed_since_planning_keeps_the_planned_keys(tmp_path: Path) -> None:
    path = write(tmp_path / "f.parquet", 30, 10)
    config = InputConfig(uri=str(path), shard_size=10)
    shards = list(plan_shards(config))
    write(path, 25, 25)
    records = read(shards[1], config)
    assert [r.key for r in records] == [f"f/{row:08d}" for row in range(10, 20)]
    assert all("changed since it was planned" in (r.error or "") for r in records)


def test_plans_written_before_row_groups_read_the_whole_file(tmp_path: Path) -> None:
    path = write(tmp_path / "old.parquet", 30, 10)
    old = Shard.from_json(json.dumps({"id": "000000", "kind": "parquet", "uri": str(path), "members": [],
                                      "size": None}))
    assert (old.row_groups, old.container, old.first_row) == (None, None, 0)
    records = read(old, InputConfig(uri=str(path)))
    assert [r.key for r in records] == [f"old/{row:08d}" for row in range(30)]
    assert old.units(str(tmp_path)) == ["old.parquet"]


def test_footers_are_read_in_parallel_in_listing_order_and_streamed(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    for index in range(24):
        write(tmp_path / "in" / f"{index:02d}.parquet", 5, 5, start=index * 5)
    monkeypatch.setattr(plan, "FOOTER_WORKERS", 3)
    running, most, read_footers = 0, 0, 0
    finished: set[int] = set()
    lock = threading.Lock()
    real = plan.footer_rows

    def footer_rows(*args: object) -> list[int] | None:
        nonlocal running, most, read_footers
        index = int(str(args[1])[-10:-8])
        with lock:
            running, read_footers = running + 1, read_footers + 1
            most = max(most, running)
        try:
            if index % 2 == 0:  # uneven: each even file finishes after the next one, so finishing order differs
                wait_until(lambda: index + 1 in finished, what=f"footer {index + 1:02d} read while {index:02d} waits")
            return real(*args)  # type: ignore[arg-type]
        finally:
            with lock:
                running -= 1
                finished.add(index)

    monkeypatch.setattr(plan, "footer_rows", footer_rows)
    shards = plan_shards(InputConfig(uri=str(tmp_path / "in")))
    first = next(shards)
    assert first.container == "00.parquet" and read_footers <= 2 * 3 + 1  # not every footer before the first shard
    rest = list(shards)
    assert [s.container for s in [first, *rest]] == [f"{index:02d}.parquet" for index in range(24)]
    assert [s.id for s in [first, *rest]] == [f"{index:06d}" for index in range(24)]
    assert 1 < most <= 3
