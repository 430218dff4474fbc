"""pipeline.io.sources: deterministic, streamed shard plans and records for every input layout, local and S3."""

from __future__ import annotations

import io
import json
import os
import types
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset
from PIL import Image

import pipeline.io.fs as fs_module
import pipeline.io.layout as layout_module
import pipeline.io.walk as walk_module
from pipeline.config import InputConfig
from pipeline.io.fs import open_fs
from pipeline.io.sources import Record, Shard, SourceError, detect_format, plan_shards, read_shard

# The folder layout below, as plan_shards must list it: byte order of the relative path (as S3 lists keys),
# with hidden files and folders and non-image files left out.
FOLDER_KEYS = ["a-b.jpg", "a/astronaut.jpg", "a/b/coffee.jpg", "chelsea.png", "empty.jpg", "photo.heic",
               "z/deep/er/camera.jpg"]


# ----------------------------------------------------------------------------------------------------- helpers


def _jpeg(name: str) -> bytes:
    import skimage.data

    buffer = io.BytesIO()
    Image.fromarray(getattr(skimage.data, name)()).save(buffer, "JPEG", quality=80)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def photos() -> dict[str, bytes]:
    return {name: _jpeg(name) for name in ("astronaut", "chelsea", "coffee", "camera")}


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _folder(root: Path, photos: dict[str, bytes]) -> Path:
    files = {
        "a/astronaut.jpg": photos["astronaut"],
        "a/b/coffee.jpg": photos["coffee"],
        "a-b.jpg": photos["camera"],  # sorts before "a/..." by bytes ('-' < '/'), after the folder "a" by name
        "chelsea.png": photos["chelsea"],  # a JPEG named .png: listing goes by name, decoding by content
        "empty.jpg": b"",
        "photo.heic": b"\x00heic",
        "z/deep/er/camera.jpg": photos["camera"],
        "notes.txt": b"not listed",
        ".hidden.jpg": photos["astronaut"],
        ".cache/thumb.jpg": photos["astronaut"],
        "a/.DS_Store": b"\x00",
    }
    for relative, data in files.items():
        _write(root / relative, data)
    return root


def _wds(root: Path, photos: dict[str, bytes]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    with webdataset.TarWriter(str(root / "shard-000000.tar")) as sink:
        sink.write({"__key__": "s0", "jpg": photos["astronaut"], "json": {"id": 0, "tags": ["space"]},
                    "txt": "an astronaut"})
        sink.write({"__key__": "s1", "png": photos["chelsea"], "json": {"id": 1}})
        sink.write({"__key__": "s2", "json": {"id": 2}, "txt": "no picture here"})  # no image member
        sink.write({"__key__": "sub/s3", "jpeg": photos["coffee"]})
    with webdataset.TarWriter(str(root / "shard-000001.tar")) as sink:
        sink.write({"__key__": "s4", "jpg": photos["camera"], "txt": "a cameraman"})
    return root


def _parquet(root: Path, photos: dict[str, bytes]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    raw = pa.table({"image": pa.array([photos["astronaut"], None, photos["coffee"]], pa.binary()),
                    "caption": ["a", "b", "c"]})
    pq.write_table(raw, root / "raw.parquet")
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    hf = pa.table({"image": pa.array([{"bytes": photos["chelsea"], "path": "cats/chelsea.jpg"},
                                      {"bytes": photos["camera"], "path": None},
                                      {"bytes": None, "path": "gone.jpg"}], struct)})
    pq.write_table(hf, root / "hf.parquet")
    return root


def _records(shard: Shard, config: InputConfig) -> list[Record]:
    count, records = read_shard(shard, config)
    listed = list(records)
    assert count == (None if shard.kind == "tar" else len(listed))  # a tar's count is known once read
    assert len({record.key for record in listed}) == len(listed)
    return listed


def _all_records(config: InputConfig) -> list[Record]:
    return [record for shard in plan_shards(config) for record in _records(shard, config)]


def _layout(shards: list[Shard]) -> list[tuple[str, str, list[str], int | None]]:
    return [(shard.id, shard.kind, shard.members, shard.size) for shard in shards]


def _summary(records: list[Record]) -> list[tuple[str, str | None, str | None, str | None, bytes | None]]:
    return [(r.key, r.member, r.error, r.meta, r.data) for r in records]


# ------------------------------------------------------------------------------------------------------ folder


def test_folder_plan_is_deterministic_and_chunked(tmp_path: Path, photos: dict[str, bytes]) -> None:
    root = _folder(tmp_path / "in", photos)
    config = InputConfig(uri=str(root), shard_size=3)
    first, second = list(plan_shards(config)), list(plan_shards(config))
    assert [s.to_json() for s in first] == [s.to_json() for s in second]
    assert _layout(first) == [("000000", "files", FOLDER_KEYS[:3], 3), ("000001", "files", FOLDER_KEYS[3:6], 3),
                              ("000002", "files", FOLDER_KEYS[6:], 1)]
    assert all(shard.uri == str(root) for shard in first)
    assert Shard.from_json(first[0].to_json()) == first[0]
    assert [s.members for s in plan_shards(InputConfig(uri=str(root), shard_size=100))] == [FOLDER_KEYS]
    assert [len(s.members) for s in plan_shards(InputConfig(uri=str(root), shard_size=1))] == [1] * 7


def test_folder_records(tmp_path: Path, photos: dict[str, bytes]) -> None:
    root = _folder(tmp_path / "in", photos)
    config = InputConfig(uri=str(root) + "/", shard_size=4)  # a trailing slash changes nothing
    records = _all_records(config)
    assert [r.key for r in records] == FOLDER_KEYS
    for record in records:
        assert record.error is None and record.member is None
        assert record.data == (root / record.key).read_bytes()
        assert record.source == f"{root}/{record.key}"


def test_glob_filters_relative_paths(tmp_path: Path, photos: dict[str, bytes]) -> None:
    root = _folder(tmp_path / "in", photos)

    def keys(glob: str) -> list[str]:
        return [m for s in plan_shards(InputConfig(uri=str(root), glob=glob)) for m in s.members]

    assert keys("*.png") == ["chelsea.png"]
    assert keys("a/*") == ["a/astronaut.jpg", "a/b/coffee.jpg"]  # fnmatch: * crosses folders
    assert keys("*.jpg") == [k for k in FOLDER_KEYS if k.endswith(".jpg")]
    assert keys("z/*/er/*.jpg") == ["z/deep/er/camera.jpg"]
    assert keys("*.webp") == []


def test_hidden_and_non_image_files_are_ignored(tmp_path: Path, photos: dict[str, bytes]) -> None:
    root = _folder(tmp_path / "in", photos)
    keys = [m for s in plan_shards(InputConfig(uri=str(root))) for m in s.members]
    assert not [k for k in keys if any(part.startswith(".") for part in k.split("/"))]
    assert "notes.txt" not in keys


# ------------------------------------------------------------------------------------------- format detection


def test_format_detection(tmp_path: Path, photos: dict[str, bytes]) -> None:
    folder = _folder(tmp_path / "folder", photos)
    wds = _wds(tmp_path / "wds", photos)
    parquet = _parquet(tmp_path / "parquet", photos)
    filelist = _write(tmp_path / "list.txt", f"{folder}/a-b.jpg\n".encode())

    def detected(uri: Path | str, **options: object) -> str:
        return detect_format(InputConfig(uri=str(uri), **options))

    assert detected(folder) == "folder"
    assert detected(wds) == "webdataset"
    assert detected(wds / "shard-000000.tar") == "webdataset"
    assert detected(parquet) == "parquet"
    assert detected(parquet / "raw.parquet") == "parquet"
    assert detected(filelist) == "filelist"
    assert detected(folder, format="webdataset") == "webdataset"  # an explicit format is taken as given
    nested = _wds(tmp_path / "nested" / "deeper" / "shards", photos)
    assert detected(nested.parent.parent) == "webdataset"

    (tmp_path / "empty").mkdir()
    _write(tmp_path / "texts" / "readme.txt", b"nothing to see")
    for uri in (tmp_path / "empty", tmp_path / "texts"):
        with pytest.raises(SourceError, match="holds no images"):
            detected(uri)


@pytest.mark.parametrize("layout", ["auto", "folder", "webdataset", "parquet", "filelist"])
def test_missing_input_names_the_path(tmp_path: Path, layout: str) -> None:
    missing = tmp_path / "does" / "not-exist"
    with pytest.raises(SourceError, match="not-exist") as caught:
        list(plan_shards(InputConfig(uri=str(missing), format=layout)))  # type: ignore[arg-type]
    assert str(missing) in str(caught.value)


# ------------------------------------------------------------------------------------------------ webdataset


def test_webdataset_shards(tmp_path: Path, photos: dict[str, bytes]) -> None:
    root = _wds(tmp_path / "wds", photos)
    config = InputConfig(uri=str(root))
    shards = list(plan_shards(config))
    assert [(s.id, s.kind, s.uri, s.members) for s in shards] == [
        ("000000", "tar", f"{root}/shard-000000.tar", []), ("000001", "tar", f"{root}/shard-000001.tar", [])]
    assert [s.to_json() for s in plan_shards(config)] == [s.to_json() for s in shards]

    records = _records(shards[0], config)
    assert [r.key for r in records] == ["shard-000000/s0", "shard-000000/s1", "shard-000000/s2",
                                        "shard-000000/sub/s3"]
    s0, s1, s2, s3 = records
    assert (s0.member, s0.data, s0.error) == ("s0.jpg", photos["astronaut"], None)
    assert json.loads(s0.meta or "") == {"caption": "an astronaut", "json": {"id": 0, "tags": ["space"]},
                                         "txt": "an astronaut"}  # the .txt is also the caption
    assert (s1.member, s1.data, json.loads(s1.meta or "")) == ("s1.png", photos["chelsea"], {"json": {"id": 1}})
    assert s2.data is None and s2.error == "no image member in sample (found json, txt)"
    assert json.loads(s2.meta or "") == {"caption": "no picture here", "json": {"id": 2}, "txt": "no picture here"}
    assert (s3.member, s3.data, s3.meta) == ("sub/s3.jpeg", photos["coffee"], None)
    assert all(r.source == shards[0].uri for r in records)

    [s4] = _records(shards[1], config)
    assert (s4.key, s4.data, json.loads(s4.meta or "")) == ("shard-000001/s4", photos["camera"],
                                                            {"caption": "a cameraman", "txt": "a cameraman"})

    single = InputConfig(uri=f"{root}/shard-000001.tar")
    [only] = list(plan_shards(single))
    assert [r.key for r in _records(only, single)] == ["shard-000001/s4"]


def test_unreadable_tar_is_one_error_record(tmp_path: Path) -> None:
    _write(tmp_path / "bad" / "garbage.tar", os.urandom(3000))
    config = InputConfig(uri=str(tmp_path / "bad"))
    [shard] = list(plan_shards(config))
    count, records = read_shard(shard, config)
    [record] = list(records)
    assert count is None  # a tar's count is known once read
    assert record.key == "garbage" and record.data is None
    assert record.error is not None and record.error.startswith("unreadable object: ReadError")


# --------------------------------------------------------------------------------------------------- parquet


def test_parquet_bytes_and_hugging_face_struct(tmp_path: Path, photos: dict[str, bytes]) -> None:
    root = _parquet(tmp_path / "pq", photos)
    config = InputConfig(uri=str(root))
    shards = list(plan_shards(config))
    assert [(s.id, s.kind, s.uri) for s in shards] == [("000000", "parquet", f"{root}/hf.parquet"),
                                                       ("000001", "parquet", f"{root}/raw.parquet")]
    hf, raw = (_records(shard, config) for shard in shards)
    assert [(r.key, r.member, r.data, r.error) for r in raw] == [
        ("raw/00000000", "0", photos["astronaut"], None), ("raw/00000001", "1", None, "no image bytes in this row"),
        ("raw/00000002", "2", photos["coffee"], None)]
    assert [(r.key, r.member, r.data, r.error) for r in hf] == [
        ("hf/00000000", "cats/chelsea.jpg", photos["chelsea"], None), ("hf/00000001", "1", photos["camera"], None),
        ("hf/00000002", "gone.jpg", None, "no image bytes in this row")]


def test_parquet_rows_number_across_batches(tmp_path: Path) -> None:
    values = [f"image {i}".encode() for i in range(150)]
    pq.write_table(pa.table({"pixels": pa.array(values, pa.binary())}), tmp_path / "many.parquet", row_group_size=40)
    config = InputConfig(uri=str(tmp_path / "many.parquet"), image_column="pixels")
    [shard] = list(plan_shards(config))
    records = _records(shard, config)
    assert [r.key for r in records] == [f"many/{i:08d}" for i in range(150)]
    assert [r.data for r in records] == values


def test_parquet_without_the_column_is_one_error_record(tmp_path: Path, photos: dict[str, bytes]) -> None:
    root = _parquet(tmp_path / "pq", photos)
    config = InputConfig(uri=str(root / "raw.parquet"), image_column="img")
    [shard] = list(plan_shards(config))
    [record] = _records(shard, config)
    assert record.key == "raw" and record.error is not None
    assert "no column 'img'" in record.error and "caption" in record.error


# -------------------------------------------------------------------------------------------------- filelist


def test_filelist(tmp_path: Path, photos: dict[str, bytes]) -> None:
    root = _folder(tmp_path / "in", photos)
    lines = ["# images to caption", "", f"{root}/a/astronaut.jpg", f"  {root}/chelsea.png  ",
             f"{root}/missing.jpg", f"{root}/z/deep/er/camera.jpg"]
    listing = _write(tmp_path / "list.txt", "\n".join(lines).encode())
    config = InputConfig(uri=str(listing), shard_size=2)
    shards = list(plan_shards(config))
    paths = [f"{root}/a/astronaut.jpg", f"{root}/chelsea.png", f"{root}/missing.jpg", f"{root}/z/deep/er/camera.jpg"]
    assert _layout(shards) == [("000000", "files", paths[:2], 2), ("000001", "files", paths[2:], 2)]
    assert all(shard.uri == "" for shard in shards)
    records = [r for shard in shards for r in _records(shard, config)]
    assert [r.key for r in records] == ["file" + path for path in paths]
    assert [r.source for r in records] == paths
    assert records[0].data == photos["astronaut"] and records[3].data == photos["camera"]
    assert records[2].data is None and (records[2].error or "").startswith("unreadable object: FileNotFoundError")


# -------------------------------------------------------------------------------------------- streamed listing


def test_local_listing_is_streamed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "many"
    for folder in range(30):
        (root / f"d{folder:02d}").mkdir(parents=True)
        for index in range(100):
            (root / f"d{folder:02d}" / f"{index:03d}.jpg").touch()

    scanned: list[str] = []
    real_scandir = os.scandir

    def scandir(path: str) -> object:
        scanned.append(os.path.relpath(path, root))
        return real_scandir(path)

    walked = 0
    real_walk = walk_module.walk_files

    def walk_files(*args: object) -> Iterator[tuple[str, int]]:
        nonlocal walked
        for item in real_walk(*args):  # type: ignore[arg-type]
            walked += 1
            yield item

    monkeypatch.setattr(fs_module.os, "scandir", scandir)
    monkeypatch.setattr(walk_module, "walk_files", walk_files)
    monkeypatch.setattr(layout_module, "CENSUS_FILES", 20)  # deciding the layout looks at this many files
    plan = plan_shards(InputConfig(uri=str(root), shard_size=50))
    assert isinstance(plan, types.GeneratorType)
    assert scanned == [] and walked == 0  # nothing is listed before the first shard is asked for

    first = next(plan)
    assert first.members == [f"d00/{index:03d}.jpg" for index in range(50)]
    assert set(scanned) == {".", "d00"}  # detection and planning each opened the root and the first folder
    assert walked <= (20 + 1) + (50 + 1)  # the census (and one more to know it stopped short), then the shard

    rest = list(plan)
    assert len(rest) == 59 and walked > 3000
    assert [m for shard in [first, *rest] for m in shard.members] == [
        f"d{folder:02d}/{index:03d}.jpg" for folder in range(30) for index in range(100)]


# ------------------------------------------------------------------------------------------------------- S3


def _upload(s3_fs, local: Path, prefix: str) -> None:  # (s3fs.S3FileSystem, ...) -> None
    """Copy a local tree to `bucket/prefix`, hidden files included."""
    for directory, _folders, names in os.walk(local):
        for name in names:
            path = Path(directory) / name
            s3_fs.pipe_file(f"{prefix}/{path.relative_to(local).as_posix()}", path.read_bytes())
    s3_fs.invalidate_cache()


@pytest.fixture(scope="module")
def s3_copy(tmp_path_factory: pytest.TempPathFactory, photos: dict[str, bytes], s3_server: str) -> tuple[Path, str]:
    """The same inputs locally (returned path) and under s3://<bucket>/data (returned URI), once per module."""
    import s3fs

    local = tmp_path_factory.mktemp("s3-copy") / "data"
    _folder(local / "folder", photos)
    _wds(local / "wds", photos)
    _parquet(local / "parquet", photos)
    _write(local / "bad" / "garbage.tar", os.urandom(3000))
    s3_fs = s3fs.S3FileSystem(endpoint_url=s3_server, skip_instance_cache=True)
    bucket = f"copy-{uuid.uuid4().hex[:16]}"
    s3_fs.mkdir(bucket)
    _upload(s3_fs, local, f"{bucket}/data")
    return local, f"s3://{bucket}/data"


@pytest.mark.parametrize(("layout", "relative", "options"), [
    ("folder", "folder", {"shard_size": 3}),
    ("folder", "folder", {"shard_size": 2, "glob": "a*"}),
    ("webdataset", "wds", {}),
    ("webdataset", "wds/shard-000001.tar", {}),
    ("parquet", "parquet", {}),
    ("parquet", "parquet/raw.parquet", {}),
    ("webdataset", "bad", {}),
])
def test_s3_gives_the_same_shards_and_records(s3_copy: tuple[Path, str], layout: str, relative: str,
                                              options: dict[str, object]) -> None:
    local, remote = s3_copy
    local_config = InputConfig(uri=str(local / relative), **options)  # type: ignore[arg-type]
    s3_config = InputConfig(uri=f"{remote}/{relative}", **options)  # type: ignore[arg-type]
    assert detect_format(local_config) == detect_format(s3_config) == layout
    local_shards, s3_shards = list(plan_shards(local_config)), list(plan_shards(s3_config))
    assert _layout(s3_shards) == _layout(local_shards)
    assert [s.to_json() for s in plan_shards(s3_config)] == [s.to_json() for s in s3_shards]
    assert all(shard.uri.startswith(remote) for shard in s3_shards)
    local_records = [r for shard in local_shards for r in _records(shard, local_config)]
    s3_records = [r for shard in s3_shards for r in _records(shard, s3_config)]
    assert local_records
    if relative == "bad":  # the error text names the stream class, which differs between file systems
        assert [(r.key, r.data) for r in s3_records] == [(r.key, r.data) for r in local_records] == [("garbage", None)]
        assert (s3_records[0].error or "").startswith("unreadable object: ReadError")
    else:
        assert _summary(s3_records) == _summary(local_records)
    if layout == "folder":
        assert s3_records[0].source == f"{remote}/{relative}/{s3_records[0].key}"


def test_s3_filelist_and_missing_uri(s3_copy: tuple[Path, str], s3_fs, s3_bucket: str,
                                     photos: dict[str, bytes]) -> None:  # s3_fs: s3fs.S3FileSystem
    _local, remote = s3_copy
    listing = f"{remote}/folder/a/astronaut.jpg\n{remote}/folder/missing.jpg\n{remote}/folder/chelsea.png\n"
    s3_fs.pipe_file(f"{s3_bucket}/lists/list.txt", listing.encode())  # the list may live elsewhere
    config = InputConfig(uri=f"s3://{s3_bucket}/lists/list.txt")
    assert detect_format(config) == "filelist"
    records = _all_records(config)
    data = remote.removeprefix("s3://")
    assert [r.key for r in records] == [f"s3/{data}/folder/a/astronaut.jpg", f"s3/{data}/folder/missing.jpg",
                                        f"s3/{data}/folder/chelsea.png"]
    assert [r.source for r in records] == [f"s3://{r.key.removeprefix('s3/')}" for r in records]
    assert records[0].data == photos["astronaut"] and records[2].data == photos["chelsea"]
    assert records[1].data is None and (records[1].error or "").startswith("unreadable object: FileNotFoundError")

    for layout in ("auto", "folder", "parquet"):
        with pytest.raises(SourceError, match="nothing-here"):
            list(plan_shards(InputConfig(uri=f"{remote}/nothing-here", format=layout)))  # type: ignore[arg-type]


S3_PAGED_OBJECTS = 2500
S3_UPLOADED = 25  # of them through s3fs; the rest straight into the server's store


def _put_empty_objects(bucket: str, keys: list[str]) -> None:
    """Create empty objects directly in the moto backend that the in-process server serves.

    Over HTTP each PUT costs ~9 ms of CPU on a 2-core machine (2500 objects: ~22 s); the listing, the part
    under test, still goes over HTTP to the server.
    """
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    for key in keys:
        backend.put_object(bucket, key, b"")


def test_s3_listing_is_paged(s3_fs, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    names = [f"{index:05d}.jpg" for index in range(S3_PAGED_OBJECTS)]
    uploaded = names[:: S3_PAGED_OBJECTS // S3_UPLOADED]  # spread over all three pages
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda name: s3_fs.pipe_file(f"{s3_bucket}/many/{name}", b""), uploaded))
    _put_empty_objects(s3_bucket, [f"many/{name}" for name in names if name not in set(uploaded)])
    assert len(s3_fs.ls(f"{s3_bucket}/many", refresh=True)) == S3_PAGED_OBJECTS

    uri = f"s3://{s3_bucket}/many"
    fs, _ = open_fs(uri)  # the instance the plan will use (fsspec caches it)
    pages: list[dict[str, object]] = []
    real_call = fs.call_s3

    def call_s3(method: str, *args: object, **kwargs: object) -> object:
        if method == "list_objects_v2":
            pages.append(kwargs)
        return real_call(method, *args, **kwargs)

    monkeypatch.setattr(fs, "call_s3", call_s3)
    plan = plan_shards(InputConfig(uri=uri, format="folder", shard_size=100))
    first = next(plan)
    assert first.members == names[:100]
    assert len(pages) == 1 and "ContinuationToken" not in pages[0]  # only the first page was asked for

    rest = list(plan)
    assert [m for shard in [first, *rest] for m in shard.members] == names
    expected_pages = -(-S3_PAGED_OBJECTS // 1000)
    assert len(pages) == expected_pages
    assert all(page["MaxKeys"] == 1000 and page["Prefix"] == "many/" for page in pages)
    assert all("ContinuationToken" in page for page in pages[1:])


def test_s3_keys_keep_odd_object_names_apart(s3_fs, s3_bucket: str) -> None:  # s3_fs: s3fs.S3FileSystem
    s3_fs.pipe_file(f"{s3_bucket}/in/a//b.jpg", b"double slash")  # a different object from a/b.jpg
    s3_fs.pipe_file(f"{s3_bucket}/in/a/b.jpg", b"single slash")
    config = InputConfig(uri=f"s3://{s3_bucket}/in")
    [shard] = plan_shards(config)
    assert shard.members == ["a//b.jpg", "a/b.jpg"]
    assert [(r.key, r.data) for r in _records(shard, config)] == [("a/%/b.jpg", b"double slash"),
                                                                  ("a/b.jpg", b"single slash")]
