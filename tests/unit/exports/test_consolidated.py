"""Consolidated Parquet export: what `datasets`, pandas and pyarrow read from it, file sizes, resuming, refusals."""

from __future__ import annotations

import io
import json
import os
import random
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.cli.main import main
from pipeline.exports import consolidated
from pipeline.exports.consolidated import export_parquet
from pipeline.exports.rolling import STATE, RollingCounts, parse_size
from pipeline.exports.targets import TargetError
from pipeline.table.ledger import Ledger
from pipeline.table.records import Marker
from tests.unit.exports.fake_output import (
    COLORS,
    MODES,
    FakeOutput,
    RealOutput,
    _marker,
    _row,
    build_real_output,
    jpeg,
    write_tar,
)
from tests.unit.exports.rolling_helpers import KilledError, interrupt_after, noisy_output


@pytest.fixture(scope="module", name="noisy")
def _noisy(tmp_path_factory: pytest.TempPathFactory) -> RealOutput:
    return noisy_output(tmp_path_factory)


def _files(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def _parquet_files(folder: Path) -> list[str]:
    return [str(folder / name) for name in _files(folder) if name.endswith(".parquet")]


def _rows(folder: Path) -> list[dict[str, Any]]:
    return [row for path in _parquet_files(folder) for row in pq.read_table(path).to_pylist()]


def test_datasets_loads_images_and_captions(fake_output: FakeOutput, tmp_path: Path) -> None:
    from datasets import Image as HfImage
    from datasets import load_dataset

    target = tmp_path / "pq"
    counts = export_parquet(str(fake_output.output), str(target), with_images=True)
    # 5 images; the error row skipped; shard 000001's hostile keys and its tar row have no image to read again.
    assert counts == RollingCounts(written=5, skipped_errors=1, missing=11, files=1, new_files=1)
    assert _files(target) == [STATE, "train-00000.parquet"]
    files = _parquet_files(target)
    dataset = load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "cache"))
    assert dataset.column_names == ["key", "image", "text", "captions", *MODES, "width", "height"]
    assert dataset.features["image"] == HfImage()
    for row in dataset:
        assert isinstance(row["image"], Image.Image) and row["image"].size == (64, 48)
        table = fake_output.rows[row["key"]]
        assert [row[mode] for mode in MODES] == [table[mode] for mode in MODES]
        assert row["text"] == table[MODES[0]] and row["captions"] == [table[mode] for mode in MODES]
        assert (row["width"], row["height"]) == (64, 48)
    raw = dataset.cast_column("image", HfImage(decode=False))
    assert sorted(row["key"] for row in raw) == sorted(COLORS)
    for row in raw:
        assert row["image"]["bytes"] == (fake_output.input / row["key"]).read_bytes()  # the input's bytes, unchanged
        assert row["image"]["path"] == Path(row["key"]).name
    # The folder itself loads as one train split too (data_dir, or a path), and pandas and pyarrow read it.
    by_dir = load_dataset("parquet", data_dir=str(target), split="train", cache_dir=str(tmp_path / "cache2"))
    assert sorted(by_dir["key"]) == sorted(COLORS)
    import pandas as pd
    import pyarrow.dataset as ds

    frame = pd.read_parquet(target)
    first = frame.iloc[0]
    assert sorted(frame["key"]) == sorted(COLORS) and list(first["captions"]) == [first[mode] for mode in MODES]
    assert ds.dataset(str(target), format="parquet").count_rows() == 5
    import duckdb
    import polars

    assert duckdb.sql(f"select count(*) from read_parquet('{target}/train-*.parquet')").fetchall() == [(5,)]
    assert sorted(polars.read_parquet(files[0])["key"].to_list()) == sorted(COLORS)


def test_captions_modes_and_columns(fake_output: FakeOutput, tmp_path: Path) -> None:
    target = tmp_path / "pq"
    counts = export_parquet(str(fake_output.output), str(target), ["description", "tags"],
                            columns=["meta", "tags_prompt", "key", "description_seed"])
    assert (counts.written, counts.skipped_errors, counts.missing) == (16, 1, 0)  # no images: every ok row
    table = pq.read_table(_parquet_files(target)[0])
    assert table.column_names == ["key", "text", "captions", "description", "tags", "width", "height", "meta",
                                  "tags_prompt", "description_seed"]
    assert str(table.schema.field("description_seed").type) == "int64"  # the table's own type
    features = json.loads(table.schema.metadata[b"huggingface"])["info"]["features"]
    assert features["captions"]["_type"] == "Sequence" and features["description_seed"]["dtype"] == "int64"
    rows = {row["key"]: row for row in table.to_pylist()}
    assert set(rows) == {key for key, row in fake_output.rows.items() if row["status"] == "ok"}
    for key, row in rows.items():
        source = fake_output.rows[key]
        assert row["text"] == source["description"]  # the first chosen mode
        assert row["captions"] == [source["description"], source["tags"]]
        assert row["tags_prompt"] == source["tags_prompt"] and row["description_seed"] == 7
    with pytest.raises(ValueError, match=r"^unknown column 'tags_nope' for --columns; this table has key, "):
        export_parquet(str(fake_output.output), str(tmp_path / "other"), columns=["meta", "tags_nope"])
    with pytest.raises(ValueError, match="unknown modes"):
        export_parquet(str(fake_output.output), str(tmp_path / "other"), ["nope"])
    assert not (tmp_path / "other").exists()


def test_empty_captions_stay_out_of_the_list(fake_output: FakeOutput, tmp_path: Path) -> None:
    from pipeline.exports.consolidated import ParquetPart
    from pipeline.exports.stream import Item

    row = {"key": "k", "width": 1, "height": 2, "tags": "", "description": "words"}
    schema = consolidated.export_schema(MODES, [], pq.read_schema(_any_part(fake_output)), False)
    part = ParquetPart(str(tmp_path / "x.parquet"), schema, MODES, [], 1 << 20)
    part.add(Item(0, row), 0)
    part.close()
    written = pq.read_table(tmp_path / "x.parquet").to_pylist()[0]
    assert (written["text"], written["captions"], written["tags"]) == ("", ["words"], "")


def _any_part(fake: FakeOutput) -> str:
    return str(fake.output / "data" / "part-000000.parquet")


def test_files_are_near_the_target_size(noisy: RealOutput, tmp_path: Path) -> None:
    target, size = tmp_path / "pq", parse_size("200kB")
    counts = export_parquet(str(noisy.output), str(target), with_images=True, target_size="200kB")
    assert counts.written == len(noisy.images) == 250 and counts.files >= 10
    sizes = [os.path.getsize(path) for path in _parquet_files(target)]
    assert sum(sizes) > 3_000_000
    assert all(0.8 * size <= each <= 1.2 * size for each in sizes[:-1]), sizes
    assert sizes[-1] <= 1.2 * size
    state = json.loads((target / STATE).read_text())
    assert [entry["bytes"] for entry in state["files"]] == sizes and state["complete"]
    assert sum(entry["rows"] for entry in state["files"]) == 250
    rows = _rows(target)
    assert sorted(row["key"] for row in rows) == sorted(noisy.images)  # every row once
    for row in rows:
        assert row["image"]["bytes"] == noisy.images[row["key"]]
    # Row groups stay a small part of a file: the one row group in memory is bounded by the target.
    metadata = pq.ParquetFile(_parquet_files(target)[0]).metadata
    assert metadata.num_row_groups > 4


def _tar_input(root: Path) -> RealOutput:
    """A WebDataset input: its images sit inside tars, so the export reads them again tar by tar."""
    rng = random.Random(1)
    for number in range(3):
        members = []
        for index in range(30):
            side = rng.randint(40, 70)
            buffer = io.BytesIO()
            Image.frombytes("RGB", (side, side), rng.randbytes(side * side * 3)).save(buffer, "PNG")
            members.append((f"s{number}_{index:03d}.png", buffer.getvalue()))
        members.append(("broken.jpg", b"not an image"))
        write_tar(root / "wds" / f"{number:06d}.tar", members)
    return build_real_output(root / "out", str(root / "wds"), "webdataset")


@pytest.mark.parametrize("layout", ["folder", "tars"])
def test_an_interrupted_export_resumes_to_the_same_files(noisy: RealOutput, tmp_path: Path, layout: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    real = noisy if layout == "folder" else _tar_input(tmp_path)
    out = str(real.output)
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    expected = export_parquet(out, str(whole), with_images=True, target_size="150kB", columns=["meta"])
    assert expected.files >= 4
    with monkeypatch.context() as patch:
        interrupt_after(patch, consolidated.ParquetPart, 2)
        with pytest.raises(KilledError):
            export_parquet(out, str(resumed), with_images=True, target_size="150kB", columns=["meta"])
    assert _files(resumed) == [STATE, "train-00000.parquet", "train-00001.parquet"]  # no temporary left
    state = json.loads((resumed / STATE).read_text())
    assert [entry["name"] for entry in state["files"]] == ["train-00000.parquet", "train-00001.parquet"]
    (resumed / ".tmp-0123-train-00002.parquet").write_bytes(b"a half-written file a kill left behind")
    counts = export_parquet(out, str(resumed), with_images=True, target_size="150kB", columns=["meta"])
    assert counts == RollingCounts(expected.written, expected.skipped_errors, expected.missing, expected.files,
                                   new_files=expected.files - 2)
    assert _files(resumed) == _files(whole)
    for name in _files(whole):
        if name != STATE:
            assert (resumed / name).read_bytes() == (whole / name).read_bytes(), name
    keys = [row["key"] for row in _rows(resumed)]
    assert len(keys) == len(set(keys)) == len(real.images)
    # Once finished, the same command has nothing left to do.
    again = export_parquet(out, str(resumed), with_images=True, target_size="150kB", columns=["meta"])
    assert (again.written, again.files, again.new_files) == (expected.written, expected.files, 0)


def test_other_options_are_refused_unless_overwrite(fake_output: FakeOutput, tmp_path: Path) -> None:
    out, target = str(fake_output.output), tmp_path / "pq"
    export_parquet(out, str(target), ["tags"])
    with pytest.raises(TargetError, match=r"holds a parquet export of other options \(modes \['tags'\] there, "
                                          r"\['tags', 'description'\] now\); pass --overwrite"):
        export_parquet(out, str(target))
    with pytest.raises(TargetError, match="target_size"):
        export_parquet(out, str(target), ["tags"], target_size="1GB")
    counts = export_parquet(out, str(target), overwrite=True)
    assert counts.new_files == 1 and pq.read_table(target / "train-00000.parquet").column_names[3:5] == MODES
    from pipeline.exports.webdataset import export_webdataset

    with pytest.raises(TargetError, match="holds a parquet export; pass --overwrite"):
        export_webdataset(out, str(target))


def test_a_folder_of_other_files_is_never_written(fake_output: FakeOutput, tmp_path: Path) -> None:
    out = str(fake_output.output)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(TargetError, match=f"is not empty and holds no {STATE}"):
            export_parquet(out, str(mine), overwrite=overwrite)
    assert _files(mine) == ["notes.txt"]
    with pytest.raises(TargetError, match="is a file"):
        export_parquet(out, str(mine / "notes.txt"))
    with pytest.raises(TargetError, match="writes a local folder"):
        export_parquet(out, "s3://bucket/pq")
    with pytest.raises(TargetError, match="lies inside the run's input"):
        export_parquet(out, str(fake_output.input / "pq"))
    with pytest.raises(TargetError, match="holds the run's input or output"):
        export_parquet(out, str(fake_output.output.parent))
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / ".gitattributes").write_text("*.parquet filter=lfs\n")
    assert export_parquet(out, str(hidden)).files == 1  # hidden files do not count
    assert (hidden / ".gitattributes").exists()


def test_shards_committed_later_are_added(fake_output: FakeOutput, tmp_path: Path) -> None:
    out, target = str(fake_output.output), tmp_path / "pq"
    assert export_parquet(out, str(target)).written == 16
    # Shard 000002 had a part file and no marker: a run commits it now.
    row = _row("uncommitted/zzz.jpg", "x", "000002")
    Ledger(out).write_marker(Marker.of("000002", _marker([row], time.time())))
    counts = export_parquet(out, str(target))
    assert (counts.written, counts.files, counts.new_files) == (17, 2, 1)
    keys = [row["key"] for row in _rows(target)]
    assert len(keys) == len(set(keys)) == 17 and "uncommitted/zzz.jpg" in keys


def test_tar_input_images_are_the_readers_bytes(tmp_path: Path) -> None:
    write_tar(tmp_path / "wds" / "000000.tar", [
        ("s0.jpg", jpeg((255, 0, 0))), ("s0.json", b'{"caption": "red"}'),
        ("s1.png", jpeg((0, 255, 0), image_format="PNG")), ("s3.jpg", b"not an image"), ("s0.jpg", jpeg((1, 2, 3)))])
    real = build_real_output(tmp_path / "out", str(tmp_path / "wds"), "webdataset")
    counts = export_parquet(str(real.output), str(tmp_path / "pq"), with_images=True)
    errors = sum(row["status"] != "ok" for row in real.rows.values())
    assert (counts.written, counts.skipped_errors, counts.missing) == (len(real.images), errors, 0) and errors
    rows = _rows(tmp_path / "pq")
    assert {row["key"]: row["image"]["bytes"] for row in rows} == real.images


@pytest.mark.parametrize(("text", "size"), [("256MB", 256_000_000), ("1GB", 10**9), ("500mb", 500_000_000),
                                            ("2GiB", 2 * 2**30), ("123456", 123456), ("1.5MB", 1_500_000)])
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_cli_export_parquet(fake_output: FakeOutput, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, target = str(fake_output.output), str(tmp_path / "pq")
    assert main(["export", out, "--format", "parquet", "--to", target, "--with-images", "--modes", "tags",
                 "--columns", "meta", "--target-size", "1MB"]) == 0
    printed = capsys.readouterr()
    assert "5 rows in 1 parquet files, 1 skipped errors, 11 missing in" in printed.out
    assert 'load_dataset("parquet", data_dir=' in printed.out
    assert pq.read_table(Path(target) / "train-00000.parquet").column_names == [
        "key", "image", "text", "captions", "tags", "width", "height", "meta"]
    for argv, words in [(["--link"], "parquet export takes --to FOLDER and not"),
                        (["--beside-images"], "(given: --beside-images)"),
                        (["--one-mode", "tags"], "(given: --one-mode)"),
                        (["--target-size", "lots"], "--target-size 'lots' is not a size"),
                        (["--columns", "meta,nope"], "unknown column 'nope'"),
                        (["--modes", "description"], "holds a parquet export of other options")]:
        assert main(["export", out, "--format", "parquet", "--to", target, "--with-images", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err
    assert main(["export", out, "--format", "parquet"]) == 2
    assert "(no --to given)" in capsys.readouterr().err
    assert main(["export", out, "--format", "jsonl", "--to", str(tmp_path / "x.jsonl"), "--with-images"]) == 2
    assert main(["export", out, "--format", "txt", "--to", str(tmp_path / "t"), "--target-size", "1MB"]) == 2
    assert "(given: --target-size)" in capsys.readouterr().err


def test_an_unreadable_state_is_replaced_only_with_overwrite(fake_output: FakeOutput, tmp_path: Path) -> None:
    out, target = str(fake_output.output), tmp_path / "pq"
    export_parquet(out, str(target))
    (target / STATE).write_text("{not json")
    with pytest.raises(TargetError, match=f"{STATE} is not an export state this version reads"):
        export_parquet(out, str(target))
    assert export_parquet(out, str(target), overwrite=True).new_files == 1
    assert json.loads((target / STATE).read_text())["complete"]
