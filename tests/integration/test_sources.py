"""Every input layout through the real pipeline: the set of output keys equals the set of inputs."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.table.names import DATA, manifest_path
from tests.integration.conftest import last_summary, run_cli, write_config

pytestmark = pytest.mark.integration
FEW = ["astronaut.jpg", "coffee.jpg", "rocket.jpg"]
QUICK_MODES = [{"name": "tags", "type": "booru_like", "length": 50, "max_tokens": 8}]


def _run(tmp_path: Path, tiny_model: Path, input_uri: str, output_uri: str, **sections: object) -> None:
    sections.setdefault("modes", QUICK_MODES)
    config = write_config(tmp_path / "run.yaml", tiny_model, input_uri, output_uri, **sections)
    result = run_cli("run", str(config))
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.slow
def test_webdataset_shards_and_a_repaired_tar_is_redone_whole(tmp_path: Path, tiny_model: Path, samples: Path):
    import webdataset

    shards = tmp_path / "shards"
    shards.mkdir()
    expected = set()
    for index, names in enumerate([FEW[:2], FEW[2:]]):
        with webdataset.TarWriter(str(shards / f"train-{index:05d}.tar")) as sink:
            for number, name in enumerate(names):
                sink.write({"__key__": f"sample{number:04d}", "jpg": (samples / name).read_bytes(),
                            "json": {"url": f"https://example.org/{name}"}, "txt": f"alt text {name}"})
                expected.add(f"train-{index:05d}/sample{number:04d}")
    good = (shards / "train-00001.tar").read_bytes()
    (shards / "train-00001.tar").write_bytes(b"not a tar archive" * 64)
    _run(tmp_path, tiny_model, str(shards), str(tmp_path / "out"))
    table = pd.read_parquet(tmp_path / "out" / DATA).set_index("key")
    # The broken tar is one error row standing for the whole file.
    assert sorted(table.index) == ["train-00000/sample0000", "train-00000/sample0001", "train-00001"]
    assert table.loc["train-00001"].status == "error"
    assert table.loc["train-00001"].error.startswith("unreadable object")

    # Repaired, its images have keys the error row never had: --retry-errors redoes the shard whole.
    (shards / "train-00001.tar").write_bytes(good)
    result = run_cli("run", str(tmp_path / "run.yaml"), "--retry-errors")
    assert result.returncode == 0, result.stderr[-4000:]
    after = pd.read_parquet(tmp_path / "out" / DATA)
    assert set(after.key) == expected and len(after) == len(expected)
    assert (after.status == "ok").all()
    first = after.set_index("key").loc[["train-00000/sample0000", "train-00000/sample0001"]]
    assert list(first.tags) == list(table.loc[first.index].tags)  # the good shard was not touched
    meta = [json.loads(m) for m in after.sort_values("key").meta]
    assert all(m["json"]["url"].startswith("https://example.org/") and m["txt"].startswith("alt text")
               for m in meta)
    assert last_summary(tmp_path / "out")["images"] == len(expected)


@pytest.mark.slow
def test_parquet_with_hugging_face_image_structs(tmp_path: Path, tiny_model: Path, samples: Path):
    images = [{"bytes": (samples / name).read_bytes(), "path": name} for name in FEW] + [{"bytes": b"", "path": "x"}]
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    source = tmp_path / "parquet"
    source.mkdir()
    pq.write_table(pa.table({"image": pa.array(images, type=struct), "label": list(range(len(images)))}),
                   source / "train-0.parquet")
    _run(tmp_path, tiny_model, str(source), str(tmp_path / "out"))
    table = pd.read_parquet(tmp_path / "out" / DATA).sort_values("key")
    assert list(table.key) == [f"train-0/{row:08d}" for row in range(len(images))]
    assert list(table.status) == ["ok", "ok", "ok", "error"]
    assert list(table.member) == [*FEW, "x"]


def test_file_list_and_s3_input_and_output(tmp_path: Path, tiny_model: Path, samples: Path, s3_fs, s3_bucket: str):
    for name in FEW:
        s3_fs.pipe_file(f"{s3_bucket}/images/{name}", (samples / name).read_bytes())
    listing = tmp_path / "list.txt"
    listing.write_text("# images on S3 and on disk\n" + "".join(f"s3://{s3_bucket}/images/{name}\n" for name in FEW)
                       + f"{samples / 'logo.png'}\n")
    _run(tmp_path, tiny_model, str(listing), f"s3://{s3_bucket}/captions")
    s3_fs.invalidate_cache()
    parts = sorted(s3_fs.glob(f"{s3_bucket}/captions/data/*.parquet"))
    table = pa.concat_tables([pq.read_table(io.BytesIO(s3_fs.cat_file(part))) for part in parts]).to_pandas()
    # File-list keys name the store: s3://b/k is s3/b/k, a local /p is file/p, so the two never collide.
    expected = {f"s3/{s3_bucket}/images/{name}" for name in FEW} | {"file" + str(samples / "logo.png")}
    assert set(table.key) == expected and len(table) == len(expected)
    assert (table.status == "ok").all()
    manifest = s3_fs.cat_file(manifest_path(f"{s3_bucket}/captions")).decode()
    assert "testing" not in manifest  # credentials never reach outputs


@pytest.mark.slow
def test_s3_prefix(tmp_path: Path, tiny_model: Path, samples: Path, s3_fs, s3_bucket: str):
    for name in FEW:
        s3_fs.pipe_file(f"{s3_bucket}/data/set/{name}", (samples / name).read_bytes())
    s3_fs.pipe_file(f"{s3_bucket}/data/set/notes.txt", b"not an image file: skipped by extension")
    _run(tmp_path, tiny_model, f"s3://{s3_bucket}/data/set/", str(tmp_path / "out"))
    table = pd.read_parquet(tmp_path / "out" / DATA)
    assert set(table.key) == set(FEW) and (table.status == "ok").all()


@pytest.mark.slow
def test_broken_files_become_error_rows_then_retry_errors_recaptions_them(tmp_path: Path, tiny_model: Path,
                                                                          image_corpus):
    corpus = image_corpus(tmp_path / "mixed")
    out = tmp_path / "out"
    _run(tmp_path, tiny_model, str(tmp_path / "mixed"), str(out))
    table = pd.read_parquet(out / DATA).set_index("key")
    assert sorted(table.index) == sorted(file.path.name for file in corpus.values())
    for file in corpus.values():
        row = table.loc[file.path.name]
        if file.error is None:
            assert row.status == "ok" and row.tags, file.path.name
        else:
            assert row.status == "error" and row.error.startswith(file.error), (file.path.name, row.error)
            assert pd.isna(row.tags)
    errors_before = int((table.status == "error").sum())

    # The user repairs one file; --retry-errors re-captions only the error rows.
    shutil.copy(corpus["astronaut"].path, corpus["truncated"].path)
    config = tmp_path / "run.yaml"
    result = run_cli("run", str(config), "--retry-errors")
    assert result.returncode == 0, result.stderr[-4000:]
    after = pd.read_parquet(out / DATA).set_index("key")
    assert sorted(after.index) == sorted(table.index)
    assert after.loc["truncated.jpg"].status == "ok" and after.loc["truncated.jpg"].tags
    assert int((after.status == "error").sum()) == errors_before - 1
    untouched = [name for name in table.index if table.loc[name].status == "ok"]
    assert (after.loc[untouched].tags == table.loc[untouched].tags).all()
    assert last_summary(out)["errors"] == errors_before - 1
