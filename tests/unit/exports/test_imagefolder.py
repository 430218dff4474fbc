"""imagefolder export: what `datasets.load_dataset("imagefolder", ...)` loads from it, for every input layout."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from pipeline.cli.main import main
from pipeline.exports.imagefolder import ImagefolderCounts, export_imagefolder
from pipeline.exports.names import relative_segments
from pipeline.exports.sources import LinkError
from pipeline.exports.targets import TargetError
from pipeline.table.names import manifest_path, part_path
from tests.unit.exports.fake_output import (
    COLORS,
    MODES,
    FakeOutput,
    _row,
    _write_parquet,
    build_real_output,
    hostile_keys,
    jpeg,
    snapshot,
    write_image_parquet,
    write_tar,
)


def _loaded(folder: Path, cache: Path) -> list[dict[str, Any]]:
    """Every row `datasets` loads from `folder` (split train), with its image decoded and its bytes."""
    from datasets import Image as HfImage
    from datasets import load_dataset

    dataset = load_dataset("imagefolder", data_dir=str(folder), split="train", cache_dir=str(cache))
    assert sorted(dataset.column_names) == sorted(["image", *MODES])
    for row in dataset:
        row["image"].load()  # every image decodes
    rows = []
    for row in dataset.cast_column("image", HfImage(decode=False)):
        image = row.pop("image")
        rows.append({**row, "bytes": image["bytes"] or Path(image["path"]).read_bytes()})
    return rows


def _check_loads(folder: Path, cache: Path, table: dict[str, dict[str, Any]], images: dict[str, bytes]) -> None:
    """The folder loads exactly the ok rows whose bytes are in `images`, with the table's captions."""
    by_captions = {tuple(row[mode] for mode in MODES): key for key, row in table.items() if row["status"] == "ok"}
    loaded = _loaded(folder, cache)
    keys = [by_captions[tuple(row[mode] for mode in MODES)] for row in loaded]  # captions equal the table's
    assert sorted(keys) == sorted(images)
    for key, row in zip(keys, loaded, strict=True):
        assert row["bytes"] == images[key], key  # the input's bytes, unchanged


def _metadata(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text("utf-8").splitlines()]


def _commit_rows(fake: FakeOutput, shard: str, rows: list[dict[str, Any]]) -> None:
    """Replace a committed shard's rows (its marker stays)."""
    _write_parquet(part_path(str(fake.output), shard), rows)
    fake.rows = {key: row for key, row in fake.rows.items() if row["shard"] != shard}
    fake.rows.update({row["key"]: row for row in rows})


def test_folder_input(fake_output: FakeOutput, tmp_path: Path) -> None:
    target = tmp_path / "hf"
    counts = export_imagefolder(str(fake_output.output), str(target))
    # 5 images; the error row skipped; of shard 000001, `..` and `/` name nothing, the other hostile keys'
    # sources and the tar (no plan) are not there to read again.
    assert counts == ImagefolderCounts(written=5, skipped_errors=1, refused=2, missing=9, renamed=0)
    assert sorted(entry["file_name"] for entry in _metadata(target)) == sorted(COLORS)
    images = {key: (fake_output.input / key).read_bytes() for key in COLORS}
    _check_loads(target, tmp_path / "cache", fake_output.rows, images)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cache", "data", "hf", "runs"]  # no temporaries


def test_keys_never_escape_and_names_stay_unique(fake_output: FakeOutput, tmp_path: Path) -> None:
    source = f"{fake_output.input}/cat/a.jpg"
    keys = [*hostile_keys(tmp_path), "a/b.jpg", "A/B.JPG", "x/y.jpg", "cat.jpg", "CAT.jpg", "cat.jpg/z.jpg"]
    _commit_rows(fake_output, "000001", [_row(key, source, "000001") for key in keys])
    target = tmp_path / "deep" / "er" / "hf"
    before = snapshot(tmp_path)
    counts = export_imagefolder(str(fake_output.output), str(target))
    added = snapshot(tmp_path) - before
    assert added and all(target in path.parents for path in added), added - {p for p in added if target in p.parents}
    assert not (tmp_path / "escape.jpg").exists() and not (tmp_path / "abs").exists()
    assert (counts.written, counts.refused, counts.missing) == (5 + len(keys) - 2, 2, 0)
    names = [entry["file_name"] for entry in _metadata(target)]
    assert len({name.casefold() for name in names}) == len(names)  # unique, even case-insensitively
    assert all(not os.path.isabs(name) and ".." not in name.split("/") and "\x00" not in name for name in names)
    # Cleaned to the same name or differing in case: the later one (in key order) gets ~2, and folders whose
    # names differ in case are one; a folder never takes a file's name.
    assert {"A/B.JPG", "A/b~2.jpg", "A/b~3.jpg", "A/up.jpg", "x/y.jpg", "x/y~2.jpg", "CAT.jpg", "cat~2.jpg",
            "cat.jpg~2/z.jpg", "nul_byte.jpg", "back/slash.jpg", "escape.jpg", "deep.jpg"} <= set(names)
    assert counts.renamed == 12
    images = {key: (fake_output.input / key).read_bytes() for key in COLORS}
    images.update({key: Path(source).read_bytes() for key in keys if key not in ("..", "/")})
    _check_loads(target, tmp_path / "cache", fake_output.rows, images)


@pytest.mark.parametrize(("key", "name"), [
    ("test/x.jpg", "test~/x.jpg"), ("a/my_val.jpg", "a/my_val~.jpg"), ("train-3/eval 1.jpg", "train~-3/eval~ 1.jpg"),
    ("data/foo-00000-of-00001.jpg", "data/foo-00000-of~-00001.jpg"), (".hidden/__x.jpg", "_hidden/_x.jpg"),
    ("contest/latest.jpg", "contest/latest.jpg"), ("x/part-0/00000012", "x/part-0/00000012.jpg"),
])
def test_names_are_safe_from_split_inference(key: str, name: str) -> None:
    assert "/".join(relative_segments(key, ".jpg") or []) == name


def test_split_words_in_keys_still_load_as_one_split(fake_output: FakeOutput, tmp_path: Path) -> None:
    source = f"{fake_output.input}/dog/b.png"
    keys = ["test/x.png", "a/my_val.png", "dev-1.png", "data/foo-00000-of-00001.png", ".hidden.png"]
    _commit_rows(fake_output, "000001", [_row(key, source, "000001") for key in keys])
    target = tmp_path / "hf"
    assert export_imagefolder(str(fake_output.output), str(target)).written == 5 + len(keys)
    images = {key: (fake_output.input / key).read_bytes() for key in COLORS}
    images.update({key: Path(source).read_bytes() for key in keys})
    _check_loads(target, tmp_path / "cache", fake_output.rows, images)


def test_webdataset_input(tmp_path: Path) -> None:
    shards = tmp_path / "wds"
    write_tar(shards / "000000.tar", [
        ("s0.jpg", jpeg((255, 0, 0))), ("s0.json", b'{"caption": "red"}'),
        ("s1.png", jpeg((0, 255, 0), image_format="PNG")), ("S1.png", jpeg((0, 0, 255), image_format="PNG")),
        ("sub/s2.jpeg", jpeg((9, 9, 9))), ("s3.jpg", b"not an image"),
        ("s0.jpg", jpeg((1, 2, 3)))])  # s0 again, later: another sample, keyed s0#2
    write_tar(shards / "more" / "000001.tar", [("t0.webp", jpeg((5, 5, 5), image_format="WEBP"))])
    real = build_real_output(tmp_path / "out", str(shards), "webdataset")
    assert {"000000/s0", "000000/s0#2", "000000/S1", "000000/s1", "more/000001/t0"} <= set(real.images)
    target = tmp_path / "hf"
    counts = export_imagefolder(str(real.output), str(target))
    assert (counts.written, counts.skipped_errors, counts.missing) == (len(real.images), 1, 0)
    names = {entry["file_name"] for entry in _metadata(target)}
    assert {"000000/s0.jpg", "000000/s0#2.jpg", "000000/sub/s2.jpeg", "more/000001/t0.webp"} <= names
    assert names & {"000000/s1.png", "000000/S1.png"} and names & {"000000/s1~2.png", "000000/S1~2.png"}
    _check_loads(target, tmp_path / "cache", real.rows, real.images)
    with pytest.raises(LinkError, match="--link needs image files in a local folder"):
        export_imagefolder(str(real.output), str(tmp_path / "linked"), link=True)


def test_parquet_input(tmp_path: Path) -> None:
    images: list[tuple[str | None, bytes | None]] = [(None, jpeg((index * 30, 0, 0))) for index in range(7)]
    images[2] = ("photos/pic.png", jpeg((0, 0, 200), image_format="PNG"))  # HF's struct keeps a path
    images[5] = (None, None)  # no bytes: an error row
    write_image_parquet(tmp_path / "in" / "images.parquet", images, row_group_size=2)
    real = build_real_output(tmp_path / "out", str(tmp_path / "in"), "parquet", shard_size=4)
    assert len(real.images) == 6 and len({row["shard"] for row in real.rows.values()}) == 2
    target = tmp_path / "hf"
    counts = export_imagefolder(str(real.output), str(target), ["description", "tags"])
    assert (counts.written, counts.skipped_errors, counts.missing) == (6, 1, 0)
    names = [entry["file_name"] for entry in _metadata(target)]
    assert names[:3] == ["images/00000000.jpg", "images/00000001.jpg", "images/00000002.png"]
    _check_loads(target, tmp_path / "cache", real.rows, real.images)


def test_s3_input(fake_output: FakeOutput, tmp_path: Path, s3_bucket: str, s3_fs) -> None:
    for key in COLORS:
        s3_fs.put_file(str(fake_output.input / key), f"{s3_bucket}/in/{key}")
    real = build_real_output(tmp_path / "out", f"s3://{s3_bucket}/in", "folder")
    assert all(row["source"].startswith(f"s3://{s3_bucket}/in/") for row in real.rows.values())
    target = tmp_path / "hf"
    assert export_imagefolder(str(real.output), str(target)).written == len(COLORS)
    _check_loads(target, tmp_path / "cache", real.rows, real.images)
    with pytest.raises(LinkError, match="local folder"):
        export_imagefolder(str(real.output), str(tmp_path / "linked"), link=True)


def test_link_shares_the_input_files(fake_output: FakeOutput, tmp_path: Path) -> None:
    target = tmp_path / "linked"
    with pytest.raises(LinkError, match="shard 000001 holds images inside a tar or Parquet file"):
        export_imagefolder(str(fake_output.output), str(target), link=True)  # its row `shard/000001`
    assert not target.exists()
    _commit_rows(fake_output, "000001", [])
    assert export_imagefolder(str(fake_output.output), str(target), link=True).written == len(COLORS)
    for key in COLORS:
        assert os.path.samefile(target / key, fake_output.input / key)
    _check_loads(target, tmp_path / "cache", fake_output.rows,
                 {key: (fake_output.input / key).read_bytes() for key in COLORS})


def test_nothing_is_replaced_without_overwrite(fake_output: FakeOutput, tmp_path: Path) -> None:
    out, target = str(fake_output.output), tmp_path / "hf"
    export_imagefolder(out, str(target))
    (target / "stale.jpg").write_bytes(b"from an earlier export")
    with pytest.raises(TargetError, match="not empty; choose an empty or new folder, or pass --overwrite"):
        export_imagefolder(out, str(target))
    assert (target / "stale.jpg").exists()
    export_imagefolder(out, str(target), overwrite=True)  # an earlier export: replaced whole
    assert not (target / "stale.jpg").exists() and (target / "dog/b.png").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(TargetError, match=r"holds no metadata\.jsonl"):
        export_imagefolder(out, str(mine), overwrite=True)
    assert [path.name for path in mine.iterdir()] == ["notes.txt"]
    with pytest.raises(TargetError, match="is a file"):
        export_imagefolder(out, str(mine / "notes.txt"))
    with pytest.raises(TargetError, match="holds the run's input or output"):
        export_imagefolder(out, str(fake_output.output.parent), overwrite=True)
    with pytest.raises(TargetError, match="writes a local folder"):
        export_imagefolder(out, "s3://bucket/hf")
    (tmp_path / "empty").mkdir()
    assert export_imagefolder(out, str(tmp_path / "empty")).written == len(COLORS)


def test_a_failed_export_leaves_the_folder_as_it_was(fake_output: FakeOutput, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    out, target = str(fake_output.output), tmp_path / "hf"
    export_imagefolder(out, str(target))
    before = {path: path.read_bytes() for path in snapshot(target)}

    def broken(*_args: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr("pipeline.exports.imagefolder._copy", broken)
    with pytest.raises(RuntimeError, match="disk on fire"):
        export_imagefolder(out, str(target), overwrite=True)
    assert {path: path.read_bytes() for path in snapshot(target)} == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["data", "hf", "runs"]  # no temporary left


def test_modes_that_clash_with_the_loaders_columns_are_refused(fake_output: FakeOutput, tmp_path: Path) -> None:
    manifest_file = Path(manifest_path(str(fake_output.output)))
    manifest = json.loads(manifest_file.read_text())
    manifest["modes"].append({"name": "thumb_file_name"})
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"\['thumb_file_name'\] cannot be imagefolder columns"):
        export_imagefolder(str(fake_output.output), str(tmp_path / "hf"))
    assert export_imagefolder(str(fake_output.output), str(tmp_path / "hf"), ["tags"]).written == len(COLORS)


def test_cli_export_imagefolder(fake_output: FakeOutput, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, target = str(fake_output.output), str(tmp_path / "hf")
    assert main(["export", out, "--format", "imagefolder", "--to", target, "--modes", "tags"]) == 0
    printed = capsys.readouterr()
    assert "5 written, 1 skipped errors, 2 refused, 9 missing, 0 renamed" in printed.out
    assert 'load_dataset("imagefolder"' in printed.out and printed.err == ""  # a finished output: no note
    assert list(_metadata(Path(target))[0]) == ["file_name", "tags"]
    assert main(["export", out, "--format", "imagefolder", "--to", target]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert main(["export", out, "--format", "imagefolder", "--to", target, "--overwrite"]) == 0
    assert list(_metadata(Path(target))[0]) == ["file_name", *MODES]
    assert main(["export", out, "--format", "imagefolder"]) == 2
    assert main(["export", out, "--format", "imagefolder", "--to", target, "--beside-images"]) == 2
    assert main(["export", out, "--format", "imagefolder", "--to", str(tmp_path / "x"), "--modes", "nope"]) == 2
    assert "unknown modes" in capsys.readouterr().err
    assert main(["export", out, "--format", "txt", "--to", str(tmp_path / "t"), "--link"]) == 2
    assert "not --link" in capsys.readouterr().err


def test_cli_link_needs_a_folder_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_tar(tmp_path / "wds" / "000000.tar", [("s0.jpg", jpeg((255, 0, 0)))])
    real = build_real_output(tmp_path / "out", str(tmp_path / "wds"), "webdataset")
    assert main(["export", str(real.output), "--format", "imagefolder", "--to", str(tmp_path / "hf"), "--link"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --link needs image files in a local folder") and err.count("\n") == 1
    assert not (tmp_path / "hf").exists()


def test_images_keep_their_extension() -> None:
    assert relative_segments("a/x.PNG", ".PNG") == ["a", "x.PNG"]
    assert relative_segments("a/x", ".webp") == ["a", "x.webp"]
    assert relative_segments("a/x.jpg", ".png") == ["a", "x.jpg.png"]  # the image's own extension wins


def test_names_stay_unique_when_folder_listings_are_dropped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.exports import names

    monkeypatch.setattr(names, "CACHED_FOLDERS", 1)  # every other folder's listing is read again from disk
    namer = names.Namer(str(tmp_path))
    keys = [f"{folder}/{name}" for name in ("a.jpg", "A.jpg") for folder in ("x", "X", "y", "Y/z", "y/Z")]
    reserved = [namer.reserve(relative_segments(key, ".jpg") or []) for key in keys]
    assert reserved == ["x/a.jpg", "x/a~2.jpg", "y/a.jpg", "y/z/a.jpg", "y/z/a~2.jpg",
                        "x/A~3.jpg", "x/A~4.jpg", "y/A~2.jpg", "y/z/A~3.jpg", "y/z/A~4.jpg"]
    assert all((tmp_path / name).is_file() for name in reserved)


def test_a_folder_inside_the_input_is_refused(fake_output: FakeOutput) -> None:
    with pytest.raises(TargetError, match="lies inside the run's input"):
        export_imagefolder(str(fake_output.output), str(fake_output.input / "hf"))
    assert not (fake_output.input / "hf").exists()
