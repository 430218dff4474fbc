"""Parquet inputs: the image column found when `input.image_column` is unset, checked before a run, and the
small scalar columns carried into `meta` (img2dataset's failed downloads as error rows)."""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import InputConfig
from pipeline.io.sources import SourceError, check_input
from tests.unit.io.records import all_records, meta_of


def _image(seed: int, kind: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24 + seed, 16), (seed * 40 % 256, 90, 160)).save(buffer, kind)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------- the image column
def _table(path: Path, **columns: pa.Array) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


@pytest.mark.parametrize(("columns", "found"), [
    ({"caption": pa.array(["a"]), "jpg": pa.array([_image(1)], pa.binary())}, "jpg"),
    ({"image": pa.array(["a/b.jpg"]), "webp": pa.array([_image(1)], pa.binary())}, "webp"),  # `image` is a path
    ({"id": pa.array([1]), "picture": pa.array([{"bytes": _image(1), "path": "p"}])}, "picture"),
    ({"blob": pa.array([b"not an image"], pa.binary()), "pixels": pa.array([_image(2, "PNG")], pa.binary())},
     "pixels"),
])
def test_the_image_column_is_found(tmp_path: Path, columns: dict[str, pa.Array], found: str) -> None:
    path = _table(tmp_path / "in" / "t.parquet", **columns)
    config = InputConfig(uri=str(tmp_path / "in"))
    assert check_input(config).image_column == found
    [record] = all_records(config)
    assert record.error is None and record.data is not None and record.data.startswith((b"\xff\xd8", b"\x89PNG"))
    assert check_input(InputConfig(uri=str(path))).image_column == found


def test_the_guess_by_content_looks_at_the_first_value_present(tmp_path: Path) -> None:
    _table(tmp_path / "t.parquet", blob=pa.array([b"\x00", b"GIF89a..."], pa.binary()),
           raw=pa.array([None, _image(1)], pa.binary()))
    assert check_input(InputConfig(uri=str(tmp_path / "t.parquet"))).image_column == "raw"
    empty, picture = all_records(InputConfig(uri=str(tmp_path / "t.parquet")))
    assert (empty.error, picture.data) == ("no image bytes in this row", _image(1))


def test_no_image_column_fails_before_a_run_naming_the_columns(tmp_path: Path) -> None:
    path = _table(tmp_path / "t.parquet", blob=pa.array([b"\x00\x01"], pa.binary()), caption=pa.array(["a"]))
    with pytest.raises(SourceError, match=r"no image column found .*blob \(binary\), caption \(string\)"):
        check_input(InputConfig(uri=str(path)))
    [record] = all_records(InputConfig(uri=str(path)))  # read anyway, it is one error row per row: never a crash
    assert record.data is None and "no image column found" in (record.error or "")


def test_a_wrong_explicit_column_fails_before_a_run_naming_the_columns(tmp_path: Path) -> None:
    _table(tmp_path / "in" / "t.parquet", jpg=pa.array([_image(1)], pa.binary()), caption=pa.array(["a"]))
    with pytest.raises(SourceError, match=r"no column 'img' \(input\.image_column\); columns are \['jpg', 'caption'\]"):
        check_input(InputConfig(uri=str(tmp_path / "in"), image_column="img"))
    with pytest.raises(SourceError, match=r"column 'caption' \(input\.image_column\) holds string"):
        check_input(InputConfig(uri=str(tmp_path / "in"), image_column="caption"))
    assert check_input(InputConfig(uri=str(tmp_path / "in"), image_column="jpg")).image_column == "jpg"
    with pytest.raises(SourceError, match="columns are"):  # an explicit format is checked the same way
        check_input(InputConfig(uri=str(tmp_path / "in"), format="parquet", image_column="img"))


def test_a_damaged_first_file_is_not_a_reason_to_stop(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.parquet").write_bytes(b"PAR1 not really")
    _table(tmp_path / "in" / "b.parquet", image=pa.array([_image(1)], pa.binary()))
    layout = check_input(InputConfig(uri=str(tmp_path / "in")))
    assert layout.format == "parquet"
    broken, good = all_records(InputConfig(uri=str(tmp_path / "in")))
    assert broken.key == "a" and (broken.error or "").startswith("unreadable object")
    assert good.error is None


# ----------------------------------------------------------------------------------------- Parquet meta
def test_small_scalar_columns_travel_and_failed_downloads_are_error_rows(tmp_path: Path) -> None:
    long = "é" * 3000  # 6000 bytes: cut to 4 KiB
    _table(tmp_path / "t.parquet", jpg=pa.array([_image(1), None], pa.binary()), caption=pa.array([long, "b"]),
           url=pa.array(["https://x/1", "https://x/2"]), key=pa.array(["000", "001"]),
           status=pa.array(["success", "failed_to_download"]), error_message=pa.array([None, "HTTP Error 404"]),
           width=pa.array([25, None], pa.int32()), score=pa.array([0.5, float("nan")]),
           tags=pa.array([["a"], ["b"]]), thumb=pa.array([b"x", b"y"], pa.binary()))
    ok, failed = all_records(InputConfig(uri=str(tmp_path / "t.parquet")))
    meta = meta_of(ok)
    assert ok.error is None and len(meta["caption"].encode()) == 4096  # type: ignore[union-attr]
    assert meta["columns"] == {"caption": meta["caption"], "url": "https://x/1", "key": "000", "status": "success",
                               "width": 25, "score": 0.5}  # no bytes, no lists, nulls left out
    assert (meta["url"], meta["source_key"], meta["width"]) == ("https://x/1", "000", 25)
    assert failed.data is None and failed.error == "img2dataset failed_to_download: HTTP Error 404"
    assert meta_of(failed)["url"] == "https://x/2"


def test_a_damaged_carried_column_costs_only_the_meta(tmp_path: Path) -> None:
    path = _table(tmp_path / "t.parquet", image=pa.array([_image(i) for i in range(4)], pa.binary()),
                  n=pa.array(range(4)))
    pq.write_table(pq.read_table(path), path, row_group_size=2)
    column = pq.ParquetFile(path).metadata.row_group(1).column(1)
    data = bytearray(path.read_bytes())
    data[column.data_page_offset:column.data_page_offset + 16] = b"\xff" * 16
    path.write_bytes(bytes(data))
    records = all_records(InputConfig(uri=str(path)))
    assert [r.data for r in records] == [_image(i) for i in range(4)]
    assert [meta_of(r).get("columns") for r in records] == [{"n": 0}, {"n": 1}, None, None]
