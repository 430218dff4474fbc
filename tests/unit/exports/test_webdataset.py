"""WebDataset export: what the `webdataset` library (and `datasets`) read back, names, sizes, determinism, resuming."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from pipeline.cli.main import main
from pipeline.exports import webdataset as wds_export
from pipeline.exports.rolling import STATE, RollingCounts
from pipeline.exports.targets import TargetError
from pipeline.exports.txt import one_line
from pipeline.exports.webdataset import export_webdataset, sample_name
from pipeline.table.fragments import part_path
from tests.unit.exports.fake_output import COLORS, MODES, FakeOutput, RealOutput, _row, _write_parquet
from tests.unit.exports.rolling_helpers import KilledError, interrupt_after, noisy_output

ODD_KEYS = ["a.b.c/d e.f.jpg", "日本/画像.v2.jpg", "x/y.tar.gz.png", "with space/ä ö.v.jpg", "..",
            "caf\u0065\u0301.jpg", "a\\b.jpg", "000000001_cat_a_jpg.jpg", "trailing.", ".hidden.png"]


@pytest.fixture(scope="module", name="noisy")
def _noisy(tmp_path_factory: pytest.TempPathFactory) -> RealOutput:
    return noisy_output(tmp_path_factory)


def _tars(folder: Path) -> list[str]:
    return sorted(str(path) for path in folder.glob("shard-*.tar"))


def _samples(folder: Path, decode: bool = False) -> list[dict[str, Any]]:
    import webdataset as wds

    dataset = wds.WebDataset(_tars(folder), shardshuffle=False, empty_check=False)
    if decode:
        dataset = dataset.decode("pil")
    return list(dataset)


def _image_of(sample: dict[str, Any]) -> tuple[str, Any]:
    (extension,) = [name for name in sample if name not in ("__key__", "__url__", "__local_path__", "json", "txt")]
    return extension, sample[extension]


def _with_odd_keys(fake: FakeOutput) -> dict[str, str]:
    """Replace shard 000001 with rows of awkward keys whose sources are real images; key -> source."""
    sources = {key: str(fake.input / list(COLORS)[index % len(COLORS)]) for index, key in enumerate(ODD_KEYS)}
    rows = [_row(key, source, "000001") for key, source in sources.items()]
    _write_parquet(part_path(str(fake.output), "000001"), rows)
    fake.rows = {key: row for key, row in fake.rows.items() if row["shard"] != "000001"}
    fake.rows.update({row["key"]: row for row in rows})
    return {**{key: str(fake.input / key) for key in COLORS}, **sources}


def test_the_webdataset_loader_reads_every_sample(fake_output: FakeOutput, tmp_path: Path) -> None:
    sources = _with_odd_keys(fake_output)
    target = tmp_path / "wds"
    counts = export_webdataset(str(fake_output.output), str(target))
    assert counts == RollingCounts(written=len(sources), skipped_errors=1, missing=0, files=1, new_files=1)
    samples = _samples(target)
    assert len(samples) == len(sources)  # no key split into two samples, none merged
    seen = []
    for index, sample in enumerate(samples):
        meta = json.loads(sample["json"])
        key = meta["key"]
        seen.append(key)
        assert sample["__key__"] == sample_name(index, key)
        assert "." not in sample["__key__"] and "/" not in sample["__key__"]
        extension, data = _image_of(sample)
        assert data == Path(sources[key]).read_bytes(), key  # the input's bytes, unchanged
        assert extension == Path(sources[key]).suffix.lstrip(".").lower()
        row = fake_output.rows[key]
        assert sample["txt"].decode("utf-8").splitlines() == [one_line(row[mode]) for mode in MODES]
        for mode in MODES:  # every mode's columns as the table names them
            for suffix in ("", "_prompt", "_seed", "_tokens", "_finish_reason", "_glitch", "_attempts"):
                assert meta[mode + suffix] == row[mode + suffix], (key, mode + suffix)
        assert (meta["source"], meta["width"], meta["height"]) == (sources[key], 64, 48)
    assert sorted(seen) == sorted(sources)
    decoded = _samples(target, decode=True)
    assert all(isinstance(_image_of(sample)[1], Image.Image) for sample in decoded)


def test_names_are_dot_free_slash_free_and_unique() -> None:
    names = [sample_name(index, key) for index, key in enumerate(ODD_KEYS)]
    assert names[0] == "000000000_a_b_c_d_e_f_jpg" and names[1] == "000000001_日本_画像_v2_jpg"
    assert names[4] == "000000004"  # `..` leaves only the number
    assert len(set(names)) == len(names) and not any(set(name) & set("./\\ ") for name in names)
    assert len(sample_name(7, "x" * 500)) == 9 + 1 + 64


def test_modes_choose_the_txt_lines(fake_output: FakeOutput, tmp_path: Path) -> None:
    export_webdataset(str(fake_output.output), str(tmp_path / "wds"), ["description"])
    for sample in _samples(tmp_path / "wds"):
        meta = json.loads(sample["json"])
        assert sample["txt"].decode("utf-8") == one_line(meta["description"]) + "\n"
        assert meta["tags"] == fake_output.rows[meta["key"]]["tags"]  # the json keeps every mode


def test_tars_are_deterministic_and_near_the_target(noisy: RealOutput, tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    counts = export_webdataset(str(noisy.output), str(first), target_size="300kB")
    export_webdataset(str(noisy.output), str(second), target_size="300kB")
    assert counts.written == 250 and counts.files >= 8
    names = [Path(path).name for path in _tars(first)]
    assert names == [f"shard-{number:06d}.tar" for number in range(counts.files)]
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes()
    sizes = [os.path.getsize(first / name) for name in names]
    assert all(0.8 * 300_000 <= size <= 1.2 * 300_000 for size in sizes[:-1]), sizes
    with tarfile.open(first / names[0]) as archive:
        member = archive.getmembers()[0]
        assert (member.mtime, member.uid, member.gid, member.uname, member.mode) == (0, 0, 0, "", 0o644)
    samples = _samples(first)
    assert [json.loads(sample["json"])["key"] for sample in samples] == sorted(noisy.images)  # shard, key order
    assert all(_image_of(sample)[1] == noisy.images[json.loads(sample["json"])["key"]] for sample in samples)


def test_an_interrupted_export_resumes_to_the_same_tars(noisy: RealOutput, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    out, whole, resumed = str(noisy.output), tmp_path / "whole", tmp_path / "resumed"
    expected = export_webdataset(out, str(whole), target_size="400kB")
    with monkeypatch.context() as patch:
        interrupt_after(patch, wds_export.TarPart, 2)
        with pytest.raises(KilledError):
            export_webdataset(out, str(resumed), target_size="400kB")
    assert sorted(path.name for path in resumed.iterdir()) == [STATE, "shard-000000.tar", "shard-000001.tar"]
    counts = export_webdataset(out, str(resumed), target_size="400kB")
    assert (counts.written, counts.files, counts.new_files) == (expected.written, expected.files, expected.files - 2)
    assert sorted(path.name for path in resumed.iterdir()) == sorted(path.name for path in whole.iterdir())
    for path in _tars(whole):
        assert (resumed / Path(path).name).read_bytes() == Path(path).read_bytes()
    with pytest.raises(TargetError, match=r"webdataset export of other options \(modes"):
        export_webdataset(out, str(resumed), ["tags"], target_size="400kB")
    assert export_webdataset(out, str(resumed), ["tags"], target_size="400kB", overwrite=True).new_files == \
        expected.files


def test_datasets_reads_the_tars(noisy: RealOutput, tmp_path: Path) -> None:
    from datasets import load_dataset

    target = tmp_path / "wds"
    export_webdataset(str(noisy.output), str(target), target_size="1MB")
    # `datasets` wants the same members in every sample: here every image is a PNG (a mix of .jpg and .png
    # samples is read by the webdataset library, not by datasets' loader).
    dataset = load_dataset("webdataset", data_files=str(target / "shard-*.tar"), split="train",
                           cache_dir=str(tmp_path / "cache"))
    assert len(dataset) == 250 and set(dataset.column_names) == {"__key__", "__url__", "png", "json", "txt"}
    row = dataset[0]
    assert isinstance(row["png"], Image.Image) and row["json"]["key"] == min(noisy.images)
    assert row["txt"].count("\n") == len(MODES)


def test_cli_export_webdataset(fake_output: FakeOutput, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, target = str(fake_output.output), str(tmp_path / "wds")
    assert main(["export", out, "--format", "webdataset", "--to", target, "--target-size", "10MB"]) == 0
    printed = capsys.readouterr().out
    assert "5 rows in 1 tars, 1 skipped errors, 11 missing in" in printed and "shard-{000000..000000}.tar" in printed
    for argv, words in [(["--columns", "meta"], "(given: --columns)"), (["--with-images"], "(given: --with-images)"),
                        (["--extension", ".caption"], "(given: --extension)"), (["--link"], "(given: --link)")]:
        assert main(["export", out, "--format", "webdataset", "--to", target, *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: webdataset export takes --to FOLDER and not ") and words in err, err
    with Image.open(io.BytesIO(_image_of(_samples(Path(target))[0])[1])) as image:
        assert image.size == (64, 48)


def test_the_tar_writer_keeps_no_member_list(tmp_path: Path) -> None:
    from pipeline.exports.stream import Item

    part = wds_export.TarPart(str(tmp_path / "x.tar"), MODES, MODES)
    row = _row("a/b.jpg", "x", "000000")
    for index in range(50):
        part.add(Item(index, row, b"\xff\xd8 bytes"), index)
    assert part.tar.members == []  # TarFile would otherwise keep every TarInfo: memory growing with the tar
    part.close()
    with tarfile.open(tmp_path / "x.tar") as archive:
        assert len(archive.getnames()) == 150
