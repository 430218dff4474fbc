"""The real img2dataset's three output formats, read as they come (no Ray, no engine).

img2dataset (pinned: 1.47.0) lives in its own venv, `scripts/img2dataset_env.sh` makes it (it pins
webdataset<0.3 and pandas<3, which the project venv cannot take); without it these tests skip. Once per
module, it downloads 10 real photos (JPEG and PNG, from scikit-image) and 2 URLs that answer 404, served
on loopback by a ThreadingHTTPServer, from a Parquet URL list with a caption and one more column, into
`webdataset`, `parquet` and `files` outputs (the three run at once), all with `--resize_mode no`. The
`parquet` and `files` runs also keep the downloaded bytes (`--disable_all_reencoding`), so each record can
be checked against the photo its URL names; the `webdataset` run re-encodes, as img2dataset does by
default, and then records its width and height too.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import os
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import InputConfig
from pipeline.io.sources import Record, check_input, plan_shards, read_shard

ROOT = Path(__file__).resolve().parents[3]
IMG2DATASET = Path(os.environ.get("IMG2DATASET_VENV", ROOT / ".venv-img2dataset")) / "bin" / "img2dataset"
pytestmark = pytest.mark.skipif(not IMG2DATASET.exists(),
                                reason=f"img2dataset is not installed at {IMG2DATASET}: run scripts/img2dataset_env.sh")
PHOTOS = ("astronaut", "chelsea", "coffee", "camera", "rocket")
FORMATS = ("webdataset", "parquet", "files")
EXPECTED = {"webdataset": ("webdataset", "img2dataset-webdataset"), "parquet": ("parquet", "img2dataset-parquet"),
            "files": ("folder", "img2dataset-files")}
MISSING = ("gone-1.jpg", "gone-2.png")
KEPT = ("parquet", "files")  # stored as downloaded; webdataset re-encodes


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[bytes, str]]]:
    """URL -> (bytes served, caption) of the 10 photos; the two 404 URLs map to (b"", caption)."""
    import skimage.data

    www = tmp_path_factory.mktemp("www")
    names: list[str] = []
    for photo in PHOTOS:
        picture = Image.fromarray(getattr(skimage.data, photo)())
        for kind, suffix in (("JPEG", "jpg"), ("PNG", "png")):
            picture.save(www / f"{photo}.{suffix}", kind)
            names.append(f"{photo}.{suffix}")
    names[3:3], names[8:8] = [MISSING[0]], [MISSING[1]]  # failures inside shards, not only at the end
    handler = functools.partial(_Quiet, directory=str(www))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield {f"{base}/{name}": ((www / name).read_bytes() if (www / name).exists() else b"",
                                  f"alt text {index}: {name}") for index, name in enumerate(names)}
    finally:
        server.shutdown()
        thread.join()


@pytest.fixture(scope="module")
def downloaded(served: dict[str, tuple[bytes, str]], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Output folder of each img2dataset output format."""
    work = tmp_path_factory.mktemp("img2dataset")
    urls = list(served)
    pq.write_table(pa.table({"url": urls, "caption": [served[url][1] for url in urls],
                             "license": [f"cc-by-{index}" for index in range(len(urls))]}), work / "urls.parquet")
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled",
           "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    runs = {}
    for output in FORMATS:
        command = [str(IMG2DATASET), "--url_list", str(work / "urls.parquet"), "--input_format", "parquet",
                   "--url_col", "url", "--caption_col", "caption", "--save_additional_columns", "['license']",
                   "--output_format", output, "--output_folder", str(work / output), "--resize_mode", "no",
                   "--disable_all_reencoding", str(output in KEPT), "--number_sample_per_shard", "5",
                   "--processes_count", "1", "--thread_count", "4", "--timeout", "10", "--retries", "0",
                   "--enable_wandb", "False"]
        runs[output] = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=work)
    for output, run in runs.items():
        log, _ = run.communicate(timeout=600)
        assert run.returncode == 0, f"img2dataset --output_format {output} failed:\n{log.decode()[-3000:]}"
    return {output: work / output for output in FORMATS}


# -------------------------------------------------------------------------- what img2dataset stored, read apart
def _stored_webdataset(root: Path) -> dict[str, bytes]:
    stored = {}
    for tar in sorted(root.glob("*.tar")):
        with tarfile.open(tar) as archive:
            for member in archive.getmembers():
                if member.name.endswith(".jpg"):
                    stored[f"{tar.stem}/{member.name[:-4]}"] = archive.extractfile(member).read()  # type: ignore[union-attr]
    return stored


def _stored_parquet(root: Path) -> dict[str, bytes]:
    stored = {}
    for path in sorted(root.glob("*.parquet")):
        for row, item in enumerate(pq.read_table(path, columns=["jpg", "status"]).to_pylist()):
            if item["status"] == "success":
                stored[f"{path.stem}/{row:08d}"] = item["jpg"]
    return stored


def _stored_files(root: Path) -> dict[str, bytes]:
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in sorted(root.glob("*/*.jpg"))}


STORED = {"webdataset": _stored_webdataset, "parquet": _stored_parquet, "files": _stored_files}


def _statuses(root: Path) -> list[str]:
    """img2dataset's own account of every URL (its metadata tables, or the parquet output itself)."""
    return [status for path in sorted(root.glob("*.parquet")) for status in pq.read_table(path)["status"].to_pylist()]


def _read(uri: str) -> list[Record]:
    config = InputConfig(uri=uri)
    records = []
    for shard in plan_shards(config):
        size, reading = read_shard(shard, config)
        got = list(reading)
        assert size is None or size == len(got)
        records.extend(got)
    return records


# ------------------------------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("output", FORMATS)
def test_every_saved_image_is_one_ok_record_with_its_alt_text_and_url(
        output: str, downloaded: dict[str, Path], served: dict[str, tuple[bytes, str]]) -> None:
    root = downloaded[output]
    assert sorted(_statuses(root)) == ["failed_to_download"] * 2 + ["success"] * 10  # img2dataset's own account
    stored = STORED[output](root)
    assert len(stored) == 10

    layout = check_input(InputConfig(uri=str(root)))
    assert (layout.format, layout.origin) == EXPECTED[output]
    assert layout.image_column == ("jpg" if output == "parquet" else None)
    records = _read(str(root))
    keys = [record.key for record in records]
    assert len(set(keys)) == len(keys)
    ok = {record.key: record for record in records if record.error is None}
    assert {key: record.data for key, record in ok.items()} == stored  # exactly what img2dataset stored, once each
    errors = [record for record in records if record.error is not None]
    if output == "parquet":  # its failed URLs are rows of the table: error rows, with img2dataset's reason
        assert sorted(record.error or "" for record in errors) == ["img2dataset failed_to_download: HTTP Error 404: "
                                                                   "File not found"] * 2
        assert sorted(json.loads(record.meta or "{}")["url"].rsplit("/", 1)[1] for record in errors) == list(MISSING)
    else:  # the metadata tables beside the shards are never read as images
        assert errors == []
        assert not [record for record in records if record.source.endswith((".parquet", ".json"))]

    for record in ok.values():
        meta = json.loads(record.meta or "{}")
        served_bytes, caption = served[meta["url"]]
        # img2dataset hashes what it downloaded, whatever it stores
        assert (meta["caption"], meta["sha256"]) == (caption, hashlib.sha256(served_bytes).hexdigest())
        assert isinstance(meta["source_key"], str) and meta["source_key"]
        if output in KEPT:
            assert record.data == served_bytes  # the photo the URL names, bytes for bytes
            assert "width" not in meta  # img2dataset leaves sizes null when it does not decode
        else:
            stored_size = Image.open(io.BytesIO(record.data or b"")).size
            assert stored_size == Image.open(io.BytesIO(served_bytes)).size  # re-encoded, not resized
            assert (meta["width"], meta["height"]) == (meta["original_width"], meta["original_height"]) == stored_size
        if output == "parquet":
            assert meta["columns"]["license"].startswith("cc-by-") and meta["columns"]["status"] == "success"
        else:
            assert meta["txt"] == caption and meta["json"]["license"].startswith("cc-by-")


def test_files_output_plans_sidecars_from_the_listing(downloaded: dict[str, Path]) -> None:
    shards = list(plan_shards(InputConfig(uri=str(downloaded["files"]))))
    assert [found for shard in shards for found in shard.sidecars or []] == [["json", "txt"]] * 10


def test_the_same_on_s3(downloaded: dict[str, Path], s3_fs, s3_bucket: str) -> None:  # s3_fs: s3fs.S3FileSystem
    local = downloaded["files"]
    for path in sorted(local.rglob("*")):
        if path.is_file():
            s3_fs.pipe_file(f"{s3_bucket}/i2d/{path.relative_to(local).as_posix()}", path.read_bytes())
    s3_fs.invalidate_cache()
    uri = f"s3://{s3_bucket}/i2d"
    assert check_input(InputConfig(uri=uri)).origin == "img2dataset-files"
    here = [(r.key, r.data, r.meta) for r in _read(str(local))]
    assert [(r.key, r.data, r.meta) for r in _read(uri)] == here and len(here) == 10
