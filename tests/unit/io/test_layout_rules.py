"""`format: auto` decided from what a folder holds as a whole, and the sidecars that travel into `meta`.

The rules (pipeline.io.layout.decide) on synthetic censuses first, then on real folders written here:
a Hugging Face `datasets` export, tars without metadata, images with sidecars, mixed folders, folders of
metadata tables only. Parquet image columns and meta: test_parquet_columns.py; the real img2dataset's
outputs: test_img2dataset_layouts.py.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset
from PIL import Image

import pipeline.io.listing as listing
import pipeline.io.sources as sources_module
from pipeline.config import InputConfig
from pipeline.io.layout import Census, ParquetProbe, decide
from pipeline.io.sources import SourceError, check_input, detect_format, plan_shards, read_shard
from tests.unit.io.records import all_records, meta_of


def _image(seed: int, kind: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24 + seed, 16), (seed * 40 % 256, 90, 160)).save(buffer, kind)
    return buffer.getvalue()


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# ------------------------------------------------------------------------------------ the rules, synthetic
def _census(**counts: object) -> Census:
    census = Census(files=10)
    for name, value in counts.items():
        setattr(census, name, value)
    return census


IMAGES = ParquetProbe("t.parquet", "image (binary)", True, "image")
HF = ParquetProbe("t.parquet", "image (struct<bytes: binary, path: string>)", True, "image", struct=True)
TABLE = ParquetProbe("t.parquet", "url (string), caption (string)", False)


@pytest.mark.parametrize(("census", "probe", "expected"), [
    (_census(tars=2, stats=2, parquets=["0.parquet"], shard_stems={"0"}), None,
     ("webdataset", "img2dataset-webdataset")),
    (_census(tars=2, parquets=["0.parquet"], shard_stems={"0", "1"}), None,
     ("webdataset", "img2dataset-webdataset")),
    (_census(tars=2, shard_stems={"0", "1"}), None, ("webdataset", "webdataset")),
    (_census(tars=1, parquets=["meta.parquet"]), TABLE, ("webdataset", "webdataset")),
    (_census(parquets=["0.parquet"], stats=1), IMAGES, ("parquet", "img2dataset-parquet")),
    (_census(parquets=["0.parquet"]), HF, ("parquet", "huggingface-parquet")),
    (_census(parquets=["0.parquet"]), IMAGES, ("parquet", "parquet")),
    (_census(parquets=["x.parquet"]), ParquetProbe("x.parquet", None, True), ("parquet", "parquet")),  # unreadable
    (_census(images=4, with_sidecars=4, stats=1, parquets=["0.parquet"], shard_stems={"0"}), None,
     ("folder", "img2dataset-files")),
    (_census(images=4, with_sidecars=4, parquets=["0.parquet"], shard_stems={"0"}), None,
     ("folder", "img2dataset-files")),
    (_census(images=4, with_sidecars=1), None, ("folder", "folder-with-sidecars")),
    (_census(images=4, parquets=["metadata.parquet"]), TABLE, ("folder", "folder")),
    (_census(images=4), None, ("folder", "folder")),
])
def test_the_rules(census: Census, probe: ParquetProbe | None, expected: tuple[str, str]) -> None:
    layout = decide(census, probe)
    assert (layout.format, layout.origin) == expected
    assert layout.describe().startswith(f"layout       {expected[1]} (read as {expected[0]})")


@pytest.mark.parametrize(("census", "probe", "words"), [
    (_census(tars=2, images=3), None, ["2 .tar shards and 3 image files", "input.format"]),
    (_census(tars=1, parquets=["x.parquet"]), IMAGES, ["1 .tar shards and Parquet files with image bytes"]),
    (_census(images=1, parquets=["x.parquet"]), IMAGES, ["Parquet files with image bytes and 1 image files"]),
    (_census(parquets=["0.parquet"], stats=1), TABLE, ["without image bytes", "url (string)", "img2dataset"]),
    (_census(other=Counter({".txt": 3})), None, ["holds no images", "3 .txt"]),
])
def test_what_cannot_be_decided_is_an_error_naming_what_was_seen(census: Census, probe: ParquetProbe | None,
                                                                 words: list[str]) -> None:
    with pytest.raises(SourceError) as caught:
        decide(census, probe, "s3://b/in")
    for word in [*words, "s3://b/in"]:
        assert word in str(caught.value)


# -------------------------------------------------------------------------------------------- real folders
def test_a_hugging_face_datasets_export(tmp_path: Path) -> None:
    import datasets

    pictures = [_image(index) for index in range(3)]
    table = datasets.Dataset.from_dict({"image": [{"bytes": data, "path": f"p{i}.jpg"} for i, data in
                                                  enumerate(pictures)], "text": ["a", "b", "c"], "label": [1, 2, 3]})
    table.cast_column("image", datasets.Image()).to_parquet(str(tmp_path / "hf" / "train-00000.parquet"))
    config = InputConfig(uri=str(tmp_path / "hf"))
    layout = check_input(config)
    assert (layout.format, layout.origin, layout.image_column) == ("parquet", "huggingface-parquet", "image")
    assert config.image_column is None  # resolved at read time, never written into the config
    records = all_records(config)
    assert [(r.key, r.member, r.data) for r in records] == [
        (f"train-00000/{i:08d}", f"p{i}.jpg", data) for i, data in enumerate(pictures)]
    assert meta_of(records[1]) == {"caption": "b", "columns": {"text": "b", "label": 2}}


def test_tars_without_metadata_are_plain_webdataset(tmp_path: Path) -> None:
    root = tmp_path / "wds"
    root.mkdir()
    for index in range(2):
        with webdataset.TarWriter(str(root / f"train-{index}.tar")) as sink:
            sink.write({"__key__": "s", "jpg": _image(index), "json": {"url": f"https://x/{index}", "key": "k"}})
    _write(root / "README.md", b"# shards")
    layout = check_input(InputConfig(uri=str(root)))
    assert (layout.format, layout.origin) == ("webdataset", "webdataset")
    records = all_records(InputConfig(uri=str(root)))
    assert [meta_of(r) for r in records] == [{"url": f"https://x/{i}", "source_key": "k",
                                            "json": {"url": f"https://x/{i}", "key": "k"}} for i in range(2)]


def _sidecar_folder(root: Path) -> Path:
    _write(root / "a" / "x.jpg", _image(1))
    _write(root / "a" / "x.txt", b"a red square")
    _write(root / "a" / "x.json", json.dumps({"url": "https://x/1", "sha256": "ab", "width": 25}).encode())
    _write(root / "a" / "x.a.png", _image(2, "PNG"))  # its name starts with `x.`, its stem is `x.a`
    _write(root / "a" / "x.a.txt", b"inner")
    _write(root / "b" / "y.png", _image(3, "PNG"))  # `y.json` sorts before `y.png`
    _write(root / "b" / "y.json", b'{"caption": "from json", "key": "y0"}')
    _write(root / "b" / "z.jpg", _image(4))  # no sidecar
    _write(root / "b" / "orphan.txt", b"no image of this stem")
    return root


def test_an_image_folder_with_sidecars(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _sidecar_folder(tmp_path / "in")
    config = InputConfig(uri=str(root), shard_size=2)
    layout = check_input(config)
    assert (layout.format, layout.origin) == ("folder", "folder-with-sidecars") and "caption" in layout.meta
    shards = list(plan_shards(config))
    assert [(s.members, s.sidecars) for s in shards] == [
        (["a/x.a.png", "a/x.jpg"], [["txt"], ["json", "txt"]]), (["b/y.png", "b/z.jpg"], [["json"], []])]
    reads: list[str] = []
    real = sources_module.read_input
    monkeypatch.setattr(sources_module, "read_input", lambda fs, path: reads.append(path) or real(fs, path))
    records = [record for shard in shards for record in read_shard(shard, config)[1]]
    assert [r.key for r in records] == ["a/x.a.png", "a/x.jpg", "b/y.png", "b/z.jpg"]
    assert [meta_of(r) for r in records] == [
        {"caption": "inner", "txt": "inner"},
        {"caption": "a red square", "url": "https://x/1", "sha256": "ab", "width": 25,
         "json": {"url": "https://x/1", "sha256": "ab", "width": 25}, "txt": "a red square"},
        {"caption": "from json", "source_key": "y0", "json": {"caption": "from json", "key": "y0"}},
        {}]
    assert len(reads) == 4 + 4  # the images, and only the sidecars that exist: never a guess per image


def test_a_plain_folder_asks_for_no_sidecars(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for index in range(3):
        _write(tmp_path / "in" / f"{index}.jpg", _image(index))
    _write(tmp_path / "in" / "notes.txt", b"not beside any image")
    config = InputConfig(uri=str(tmp_path / "in"))
    assert check_input(config).origin == "folder"
    [shard] = plan_shards(config)
    assert shard.sidecars is None and json.loads(shard.to_json())["sidecars"] is None
    reads: list[str] = []
    real = sources_module.read_input
    monkeypatch.setattr(sources_module, "read_input", lambda fs, path: reads.append(path) or real(fs, path))
    assert [r.meta for r in read_shard(shard, config)[1]] == [None, None, None]
    assert len(reads) == 3


def test_sidecar_pairing_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(listing, "MAX_PENDING", 3)
    window = listing.SidecarWindow()
    names = ["x.jpg", *(f"x.d/{index}.jpg" for index in range(6)), "x.txt"]  # a folder inside x's run of names
    out = [pair for name in names for pair in window.add(name)] + list(window.finish())
    assert [image for image, _found in out] == names[:-1]  # in listing order, never held past the bound
    assert out[0] == ("x.jpg", [])  # let go before its sidecar came: the bound wins over pairing


def test_a_mixed_folder_needs_a_format(tmp_path: Path) -> None:
    root = tmp_path / "mixed"
    _write(root / "photo.jpg", _image(1))
    with webdataset.TarWriter(str(root / "0.tar")) as sink:
        sink.write({"__key__": "s", "jpg": _image(2)})
    with pytest.raises(SourceError, match=r"mixes 1 \.tar shards and 1 image files .*input\.format"):
        check_input(InputConfig(uri=str(root)))
    assert detect_format(InputConfig(uri=str(root), format="folder")) == "folder"
    assert [r.key for r in all_records(InputConfig(uri=str(root), format="webdataset"))] == ["0/s"]
    assert [r.key for r in all_records(InputConfig(uri=str(root), glob="*.jpg", format="folder"))] == ["photo.jpg"]


def test_images_beside_a_metadata_table_are_a_folder(tmp_path: Path) -> None:
    _write(tmp_path / "in" / "train" / "a.jpg", _image(1))
    pq.write_table(pa.table({"file_name": ["train/a.jpg"], "text": ["a"]}), tmp_path / "in" / "metadata.parquet")
    layout = check_input(InputConfig(uri=str(tmp_path / "in")))
    assert (layout.format, layout.origin) == ("folder", "folder")
    assert layout.ignored == ("1 .parquet tables without image bytes (metadata)",)


def test_metadata_tables_alone_are_an_error_naming_their_columns(tmp_path: Path) -> None:
    root = tmp_path / "meta-only"
    root.mkdir()
    for index in range(2):
        pq.write_table(pa.table({"url": ["https://x"], "caption": ["c"], "status": ["success"]}),
                       root / f"{index:05d}.parquet")
        _write(root / f"{index:05d}_stats.json", b"{}")
    with pytest.raises(SourceError) as caught:
        check_input(InputConfig(uri=str(root)))
    message = str(caught.value)
    assert "without image bytes" in message and "url (string), caption (string), status (string)" in message
    assert "2 .parquet" in message and "2 _stats.json" in message and str(root) in message
