"""Keys unique across the input and safe as file names; file lists de-duplicated; the planning API."""

from __future__ import annotations

import itertools
import json
import logging
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import InputConfig
from pipeline.io.keys import list_entry_key, resolve_list_entry, safe_key
from pipeline.io.sources import Shard, plan_shards, read_shard


def _keys(config: InputConfig) -> list[str]:
    return [record.key for shard in plan_shards(config) for record in read_shard(shard, config)[1]]


def _safe(key: str) -> bool:
    return not key.startswith("/") and all(part not in ("", ".", "..") for part in key.split("/"))


# ------------------------------------------------------------------------------------------------------ keys
def test_safe_key_is_one_to_one_and_safe() -> None:
    alphabet = ["", ".", "..", "%", "%.", "%%..", "a", "a.b", "%2E", "..."]
    paths = {"/".join(parts) for size in (1, 2, 3) for parts in itertools.product(alphabet, repeat=size)}
    keys = {safe_key(path) for path in paths}
    assert len(keys) == len(paths)
    assert all(_safe(key) for key in keys)
    assert safe_key("a/b/cat.jpg") == "a/b/cat.jpg" and safe_key("100%/x.jpg") == "100%/x.jpg"


def test_list_entry_keys_differ_whenever_uris_differ() -> None:
    uris = ["s3://b/x.jpg", "/b/x.jpg", "s3a://b/x.jpg", "s3://b//x.jpg", "s3://b/./x.jpg", "s3://b/../b/x.jpg",
            "/b/../x.jpg", "s3://b/x.jpg/", "gs://b/x.jpg", "/s3/b/x.jpg", "s3:///b/x.jpg"]
    keys = [list_entry_key(uri) for uri in uris]
    assert keys[:2] == ["s3/b/x.jpg", "file/b/x.jpg"]
    assert len(set(keys)) == len(keys)
    assert all(_safe(key) for key in keys)


def test_relative_list_lines_resolve_against_the_list_folder() -> None:
    assert resolve_list_entry("x.jpg", "/data/lists") == "/data/lists/x.jpg"
    assert resolve_list_entry("../img/x.jpg", "/data/lists") == "/data/img/x.jpg"
    assert resolve_list_entry("img/x.jpg", "s3://b/lists") == "s3://b/lists/img/x.jpg"
    assert resolve_list_entry("../x.jpg", "s3://b/lists") == "s3://b/x.jpg"
    assert resolve_list_entry("file:///data/x.jpg", "/elsewhere") == "/data/x.jpg"
    assert resolve_list_entry("s3://b/../x.jpg", "/elsewhere") == "s3://b/../x.jpg"  # a URI is taken as written


def test_keys_are_unique_across_folders(tmp_path: Path) -> None:
    for folder in ("a", "b"):
        (tmp_path / "pq" / folder).mkdir(parents=True)
        pq.write_table(pa.table({"image": pa.array([b"1", b"2"], pa.binary())}), tmp_path / "pq" / folder / "p.parquet")
    assert _keys(InputConfig(uri=str(tmp_path / "pq"))) == ["a/p/00000000", "a/p/00000001", "b/p/00000000",
                                                            "b/p/00000001"]
    assert _keys(InputConfig(uri=str(tmp_path / "pq" / "a" / "p.parquet"))) == ["p/00000000", "p/00000001"]


# ------------------------------------------------------------------------------------------------ file lists
def test_a_file_list_is_deduplicated(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "img").mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (tmp_path / "img" / name).write_bytes(name.encode())
    a, b, c = (str(tmp_path / "img" / name) for name in ("a.jpg", "b.jpg", "c.jpg"))
    lines = [a, b, f"  {a}  ", "img/c.jpg", c, f"file://{b}", "# comment", "", "img/missing.jpg", a]
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(lines) + "\n")
    config = InputConfig(uri=str(listing), shard_size=2)
    with caplog.at_level(logging.WARNING):
        shards = list(plan_shards(config))
    missing = str(tmp_path / "img" / "missing.jpg")
    assert [(s.members, s.size) for s in shards] == [([a, b], 2), ([c, missing], 2)]
    assert "4 repeated lines dropped" in caplog.text
    records = [record for shard in shards for record in read_shard(shard, config)[1]]
    assert [r.key for r in records] == ["file" + path for path in (a, b, c, missing)]
    assert [r.data for r in records[:3]] == [b"a.jpg", b"b.jpg", b"c.jpg"]
    assert (records[3].error or "").startswith("unreadable object: FileNotFoundError")


def test_a_long_file_list_keeps_strings_only_for_repeats(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.io import sharding as plan

    rng = random.Random(7)
    lines = [f"s3://bucket/images/{index:07d}.jpg" for index in range(50_000)]
    repeats = rng.sample(lines, 50)
    (tmp_path / "list.txt").write_text("\n".join(lines + repeats) + "\n")
    repeated_sets: list[int] = []
    real = plan._repeated_hashes

    def spy(hashes: object) -> set[int]:
        found = real(hashes)  # type: ignore[arg-type]
        repeated_sets.append(len(found))
        return found

    monkeypatch.setattr(plan, "_repeated_hashes", spy)
    shards = list(plan_shards(InputConfig(uri=str(tmp_path / "list.txt"), shard_size=1000)))
    assert [m for s in shards for m in s.members] == lines
    assert sum(s.size or 0 for s in shards) == len(lines)
    assert repeated_sets == [50]


def test_a_list_with_bad_utf8_spoils_one_line(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"a")
    (tmp_path / "list.txt").write_bytes(f"{tmp_path}/a.jpg\n{tmp_path}/\xff\xfe.jpg\n".encode("latin-1"))
    config = InputConfig(uri=str(tmp_path / "list.txt"))
    [shard] = plan_shards(config)
    good, bad = read_shard(shard, config)[1]
    assert good.data == b"a" and bad.error is not None


# ---------------------------------------------------------------------------------------------- planning API
def _inputs(tmp_path: Path) -> dict[str, InputConfig]:
    (tmp_path / "folder" / "sub").mkdir(parents=True)
    for name in ("a.jpg", "b.jpg", "sub/c.jpg"):
        (tmp_path / "folder" / name).write_bytes(b"x")
    (tmp_path / "list.txt").write_text("/x/1.jpg\n/x/2.jpg\n/x/1.jpg\n/x/3.jpg\n")
    (tmp_path / "tars" / "d").mkdir(parents=True)
    for name in ("0.tar", "1.tar", "d/2.tar"):
        (tmp_path / "tars" / name).write_bytes(b"")
    (tmp_path / "pq").mkdir()
    for name in ("p0", "p1"):
        pq.write_table(pa.table({"image": pa.array([b"1"] * 5, pa.binary())}), tmp_path / "pq" / f"{name}.parquet",
                       row_group_size=2)
    return {"folder": InputConfig(uri=str(tmp_path / "folder"), shard_size=2),
            "filelist": InputConfig(uri=str(tmp_path / "list.txt"), shard_size=2),
            "webdataset": InputConfig(uri=str(tmp_path / "tars")),
            "parquet": InputConfig(uri=str(tmp_path / "pq"), shard_size=2),
            "single": InputConfig(uri=str(tmp_path / "pq" / "p0.parquet"), shard_size=2)}


UNITS = {"folder": ["a.jpg", "b.jpg", "sub/c.jpg"], "filelist": ["/x/1.jpg", "/x/2.jpg", "/x/3.jpg"],
         "webdataset": ["0.tar", "1.tar", "d/2.tar"], "parquet": ["p0.parquet", "p1.parquet"], "single": [""]}


@pytest.mark.parametrize("layout", list(UNITS))
def test_skip_sees_every_unit_once_in_listing_order(tmp_path: Path, layout: str) -> None:
    config = _inputs(tmp_path)[layout]
    seen: list[str] = []
    everything = list(plan_shards(config, skip=lambda unit: seen.append(unit) or False))
    assert seen == UNITS[layout]
    assert [s.id for s in everything] == [f"{index:06d}" for index in range(len(everything))]
    assert list(dict.fromkeys(u for s in everything for u in s.units())) == UNITS[layout]

    dropped = UNITS[layout][0]
    grown = list(plan_shards(config, skip=lambda unit: unit == dropped, first_index=7))
    assert [s.id for s in grown] == [f"{index:06d}" for index in range(7, 7 + len(grown))]
    assert list(dict.fromkeys(u for s in grown for u in s.units())) == UNITS[layout][1:]


def test_parquet_shards_of_one_file_share_its_unit(tmp_path: Path) -> None:
    shards = list(plan_shards(_inputs(tmp_path)["parquet"]))
    assert [(s.container, s.row_groups, s.first_row, s.size) for s in shards] == [
        ("p0.parquet", [0, 1], 0, 2), ("p0.parquet", [1, 2], 2, 2), ("p0.parquet", [2, 3], 4, 1),
        ("p1.parquet", [0, 1], 0, 2), ("p1.parquet", [1, 2], 2, 2), ("p1.parquet", [2, 3], 4, 1)]
    assert [s.units() for s in shards] == [["p0.parquet"]] * 3 + [["p1.parquet"]] * 3


def test_shard_json_is_tolerant(tmp_path: Path) -> None:
    shard = Shard("000003", "parquet", "/in/x.parquet", [], 10, "x.parquet", [2, 4], 20)
    assert Shard.from_json(shard.to_json()) == shard
    old = Shard.from_json(json.dumps({"id": "000001", "kind": "tar", "uri": "/in/a/b.tar", "members": [],
                                      "size": None, "added_later": 1}))
    assert (old.container, old.row_groups, old.first_row) == (None, None, 0)
    assert old.units() == ["/in/a/b.tar"] and old.units("/in") == ["a/b.tar"]
    files = Shard("000000", "files", "/in", ["a.jpg", "b/c.jpg"], 2)
    assert files.units() == ["a.jpg", "b/c.jpg"] and Shard.from_json(files.to_json()) == files


def test_odd_list_entries_are_error_rows(tmp_path: Path) -> None:
    (tmp_path / "folder").mkdir()
    lines = ["nosuch://x/y.jpg", "memory://nothing/x.jpg", str(tmp_path / "folder"), "nul\x00.jpg", "a//b/../c.jpg"]
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    config = InputConfig(uri=str(tmp_path / "list.txt"))
    records = [record for shard in plan_shards(config) for record in read_shard(shard, config)[1]]
    assert len(records) == 5 and all(r.data is None and (r.error or "").startswith("unreadable object: ")
                                     for r in records)
    assert all(_safe(r.key) for r in records) and len({r.key for r in records}) == 5
    assert records[-1].source == str(tmp_path / "a" / "c.jpg")  # relative: resolved against the list's folder
