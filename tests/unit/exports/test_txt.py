"""Sidecar .txt export: layout, ordering, and that hostile keys never escape the target."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.cli.main import main
from pipeline.exports.txt import TxtCounts, export_txt, safe_segments, sidecar_text, txt_name
from pipeline.table.names import manifest_path, part_path
from tests.unit.exports.fake_output import FakeOutput, _row, _write_parquet, hostile_keys, snapshot


def _added_under(fake: FakeOutput, before: set[Path], allowed: Path) -> set[Path]:
    added = snapshot(fake.root) - before
    outside = {path for path in added if allowed.resolve() not in path.resolve().parents}
    assert not outside, f"written outside {allowed}: {outside}"
    return added


@pytest.mark.parametrize(("key", "segments"), [
    ("cat/a.jpg", ["cat", "a.jpg"]),
    ("../../etc/passwd", ["etc", "passwd"]),
    ("/etc/cron.d/x.png", ["etc", "cron.d", "x.png"]),
    ("a\\..\\..\\b.jpg", ["a", "b.jpg"]),
    ("a//./b/", ["a", "b"]),
    ("nul\x00x\n.jpg", ["nul_x_.jpg"]),
    ("..", []),
    ("with space/é ü.jpg", ["with space", "é ü.jpg"]),
])
def test_safe_segments(key: str, segments: list[str]) -> None:
    assert safe_segments(key) == segments


def test_txt_name_replaces_only_image_extensions() -> None:
    assert txt_name("a.jpg") == "a.txt"
    assert txt_name("b.JPEG") == "b.txt"
    assert txt_name("000001") == "000001.txt"
    assert txt_name("v1.2") == "v1.2.txt"
    assert txt_name(".jpg") == ".jpg.txt"


def test_sidecar_text_is_one_line_per_mode_in_order() -> None:
    row = {"tags": "a,\r\n b\n\nc", "description": "One.\u2028Two.", "other": None}
    assert sidecar_text(row, ["tags", "description"]) == "a, b c\nOne. Two.\n"
    assert sidecar_text(row, ["description", "other", "tags"]) == "One. Two.\n\na, b c\n"


# Every line boundary str.splitlines knows; the first test keeps this list honest.
LINE_BOUNDARIES = ("\n", "\r", "\r\n", "\v", "\f", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029")


def test_line_boundaries_are_all_that_splitlines_knows() -> None:
    splitting = {chr(code) for code in range(0x3000) if len(f"a{chr(code)}b".splitlines()) == 2}
    assert splitting == set(LINE_BOUNDARIES) - {"\r\n"}
    assert all(len(f"a{boundary}b".splitlines()) == 2 for boundary in LINE_BOUNDARIES)


@pytest.mark.parametrize("boundary", LINE_BOUNDARIES, ids=[repr(boundary) for boundary in LINE_BOUNDARIES])
def test_sidecar_text_flattens_every_line_boundary(boundary: str) -> None:
    row = {"tags": f"a{boundary}b", "description": f"{boundary} x {boundary}{boundary}\ty{boundary}"}
    assert sidecar_text(row, ["tags", "description"]).splitlines() == ["a b", "x y"]


def test_export_writes_one_line_per_mode_whatever_the_boundary(fake_output: FakeOutput) -> None:
    rows = [_row(f"b{index}.jpg", None, "000000", captions={"tags": f"a{boundary}b", "description": f"x{boundary}"})
            for index, boundary in enumerate(LINE_BOUNDARIES)]
    _write_parquet(part_path(str(fake_output.output), "000000"), rows)  # shard 000000 holds only these now
    target = fake_output.root / "boundaries"
    export_txt(str(fake_output.output), str(target), None, {})
    for index, boundary in enumerate(LINE_BOUNDARIES):
        written = (target / f"b{index}.txt").read_text("utf-8")
        assert written.splitlines() == ["a b", "x"], (boundary, written)


def test_export_to_folder(fake_output: FakeOutput) -> None:
    target = fake_output.root / "exports" / "nested" / "txt"
    before = snapshot(fake_output.root)
    counts = export_txt(str(fake_output.output), str(target), None, {})
    added = _added_under(fake_output, before, target)
    assert counts == TxtCounts(written=13, skipped_errors=1, refused=2, duplicates=1)
    names = {path.relative_to(target).as_posix() for path in added}
    absolute = hostile_keys(fake_output.root)[2].lstrip("/").removesuffix(".jpg") + ".txt"
    assert names == {"cat/a.txt", "dog/b.txt", "with space/é ü.txt", "日本/画像.txt", "escape.txt", "deep.txt",
                     absolute, "a/up.txt", "back/slash.txt", "nul_byte.txt", "x/y.txt", "a/b.txt",
                     "shard/000001.txt"}
    # Manifest order; line breaks collapsed; the earlier of cat/a.jpg and cat/a.png wins.
    assert (target / "cat/a.txt").read_text("utf-8").splitlines() == [
        "red, square bright", fake_output.rows["cat/a.jpg"]["description"]]
    assert (target / "日本/画像.txt").read_text("utf-8") == "tags of 日本/画像.jpg second line\n" \
                                                        "description of 日本/画像.jpg second line\n"


def test_export_selected_modes_and_rejects_unknown(fake_output: FakeOutput) -> None:
    target = fake_output.root / "x" / "y" / "t"
    export_txt(str(fake_output.output), str(target), ["description"], {})
    assert (target / "dog/b.txt").read_text("utf-8") == "description of dog/b.png second line\n"
    with pytest.raises(ValueError, match="unknown modes"):
        export_txt(str(fake_output.output), str(target), ["nope"], {})


def test_uncommitted_and_staged_rows_are_not_exported(fake_output: FakeOutput) -> None:
    target = fake_output.root / "x" / "y" / "t"
    export_txt(str(fake_output.output), str(target), None, {})
    assert not (target / "uncommitted").exists()
    assert not (target / "staged").exists()


def test_existing_files_are_kept_unless_overwrite(fake_output: FakeOutput) -> None:
    target = fake_output.root / "x" / "y" / "t"
    (target / "dog").mkdir(parents=True)
    (target / "dog/b.txt").write_text("written by a person")
    counts = export_txt(str(fake_output.output), str(target), None, {})
    assert (counts.written, counts.kept_existing) == (12, 1)
    assert (target / "dog/b.txt").read_text() == "written by a person"
    counts = export_txt(str(fake_output.output), str(target), None, {}, overwrite=True)
    assert (counts.written, counts.kept_existing) == (13, 0)
    assert (target / "dog/b.txt").read_text().startswith("tags of dog/b.png")


def test_symlink_inside_target_cannot_lead_out(fake_output: FakeOutput) -> None:
    target, outside = fake_output.root / "x" / "y" / "t", fake_output.root / "elsewhere"
    target.mkdir(parents=True)
    outside.mkdir()
    (target / "cat").symlink_to(outside, target_is_directory=True)
    before = snapshot(fake_output.root)
    counts = export_txt(str(fake_output.output), str(target), None, {})
    assert counts.refused == 4  # cat/a.jpg and cat/a.png, plus `..` and `/`
    assert not any(outside.iterdir())
    _added_under(fake_output, before, target)


def test_beside_images_stays_in_the_input_folder(fake_output: FakeOutput) -> None:
    before = snapshot(fake_output.root)
    counts = export_txt(str(fake_output.output), None, None, {}, beside_images=True)
    added = _added_under(fake_output, before, fake_output.input)
    assert counts == TxtCounts(written=7, skipped_errors=1, refused=8, duplicates=1)
    names = {path.relative_to(fake_output.input).as_posix() for path in added}
    assert names == {"cat/a.txt", "dog/b.txt", "with space/é ü.txt", "日本/画像.txt", "back\\..\\..\\slash.txt",
                     "x/y.txt", "a/b.txt"}
    assert (fake_output.input / "with space/é ü.txt").read_text("utf-8").startswith("tags of with space/é ü.jpg")
    assert not os.path.exists(fake_output.input.parent / "escape.txt")


def test_beside_images_needs_a_local_folder_input(fake_output: FakeOutput) -> None:
    import json

    manifest_file = Path(manifest_path(str(fake_output.output)))
    manifest = json.loads(manifest_file.read_text())
    manifest["config"]["input"]["uri"] = "s3://bucket/images"
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="local folder input"):
        export_txt(str(fake_output.output), None, None, {}, beside_images=True)
    with pytest.raises(ValueError, match="target folder"):
        export_txt(str(fake_output.output), None, None, {})


def test_cli_export_txt(fake_output: FakeOutput, capsys: pytest.CaptureFixture[str]) -> None:
    target = fake_output.root / "x" / "y" / "cli"
    assert main(["export", str(fake_output.output), "--format", "txt", "--to", str(target), "--modes", "tags"]) == 0
    assert "13 written, 1 skipped errors, 2 refused" in capsys.readouterr().out
    assert (target / "dog/b.txt").read_text("utf-8") == "tags of dog/b.png second line\n"
    assert main(["export", str(fake_output.output), "--format", "txt"]) == 2  # neither --to nor --beside-images
    assert main(["export", str(fake_output.output), "--format", "txt", "--to", str(target), "--modes", "x"]) == 2
    assert "unknown modes" in capsys.readouterr().err


def test_export_from_and_to_s3(fake_output: FakeOutput, s3_bucket: str, s3_fs) -> None:
    s3_fs.put(str(fake_output.output) + "/", f"{s3_bucket}/out/", recursive=True)
    counts = export_txt(f"s3://{s3_bucket}/out", f"s3://{s3_bucket}/captions", None, {})
    assert counts == TxtCounts(written=13, skipped_errors=1, refused=2, duplicates=1)
    s3_fs.invalidate_cache()
    keys = {path.removeprefix(f"{s3_bucket}/") for path in s3_fs.find(s3_bucket)}
    assert "captions/日本/画像.txt" in keys and "captions/with space/é ü.txt" in keys
    assert all(key.startswith(("out/", "captions/")) for key in keys)
    assert s3_fs.cat_file(f"{s3_bucket}/captions/cat/a.txt").decode().startswith("red, square bright\n")


def test_to_a_file_is_refused_in_words(fake_output: FakeOutput, capsys: pytest.CaptureFixture[str]) -> None:
    target = fake_output.root / "captions.txt"
    target.write_text("not a folder")
    assert main(["export", str(fake_output.output), "--format", "txt", "--to", str(target)]) == 2
    assert capsys.readouterr().err == f"error: --to {target} is a file; txt export writes a folder of files\n"
    assert target.read_text() == "not a folder"


# ----------------------------------------------------------------------------- --extension and --one-mode
def test_extension_replaces_txt(fake_output: FakeOutput) -> None:
    target = fake_output.root / "kohya"
    counts = export_txt(str(fake_output.output), str(target), None, {}, extension=".caption")
    assert counts.written == 13
    assert (target / "dog/b.caption").read_text("utf-8").splitlines() == [
        "tags of dog/b.png second line", "description of dog/b.png second line"]
    assert not list(target.rglob("*.txt"))
    export_txt(str(fake_output.output), str(fake_output.root / "bare"), None, {}, extension="tags")
    assert (fake_output.root / "bare" / "dog/b.tags").exists()  # the dot is added
    assert txt_name("a.jpg", ".caption") == "a.caption" and txt_name("000001", ".caption") == "000001.caption"


@pytest.mark.parametrize("extension", [".jpg", "png", "../x", "a/b", ".", "..txt", ".t\x00", ""])
def test_extension_must_be_a_plain_suffix(fake_output: FakeOutput, extension: str) -> None:
    with pytest.raises(ValueError, match="--extension"):
        export_txt(str(fake_output.output), str(fake_output.root / "t"), None, {}, extension=extension)
    assert not (fake_output.root / "t").exists()


def test_one_mode_writes_that_caption_alone(fake_output: FakeOutput) -> None:
    target = fake_output.root / "one"
    counts = export_txt(str(fake_output.output), str(target), None, {}, extension=".caption", one_mode="description")
    assert counts.written == 13
    assert (target / "dog/b.caption").read_text("utf-8") == "description of dog/b.png second line\n"
    assert (target / "cat/a.caption").read_text("utf-8") == fake_output.rows["cat/a.jpg"]["description"] + "\n"
    with pytest.raises(ValueError, match=r"^--one-mode 'summary' is not a mode of this output; it has \['tags', "):
        export_txt(str(fake_output.output), str(target), None, {}, one_mode="summary")
    with pytest.raises(ValueError, match="not both"):
        export_txt(str(fake_output.output), str(target), ["tags"], {}, one_mode="tags")


def test_one_mode_beside_images(fake_output: FakeOutput) -> None:
    counts = export_txt(str(fake_output.output), None, None, {}, beside_images=True, extension=".caption",
                        one_mode="tags")
    assert counts.written == 7
    assert (fake_output.input / "dog/b.caption").read_text("utf-8") == "tags of dog/b.png second line\n"
    assert not (fake_output.input / "dog/b.txt").exists()


def test_cli_extension_and_one_mode(fake_output: FakeOutput, capsys: pytest.CaptureFixture[str]) -> None:
    target = fake_output.root / "cli"
    out = str(fake_output.output)
    assert main(["export", out, "--format", "txt", "--to", str(target), "--extension", ".caption",
                 "--one-mode", "tags"]) == 0
    assert "13 written" in capsys.readouterr().out
    assert (target / "dog/b.caption").read_text("utf-8") == "tags of dog/b.png second line\n"
    assert main(["export", out, "--format", "txt", "--to", str(target), "--one-mode", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --one-mode 'nope' is not a mode of this output") and err.count("\n") == 1
    assert main(["export", out, "--format", "txt", "--to", str(target), "--one-mode", "tags", "--modes", "tags"]) == 2
    for fmt in ("jsonl", "imagefolder", "parquet", "webdataset"):
        to = str(fake_output.root / f"x.{fmt}")
        assert main(["export", out, "--format", fmt, "--to", to, "--extension", ".caption"]) == 2
        assert "(given: --extension)" in capsys.readouterr().err
