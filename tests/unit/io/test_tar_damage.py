"""WebDataset tars are read in one pass: damage costs only the samples it touches, keys stay unique."""

from __future__ import annotations

import io
import itertools
import json
import logging
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.config import InputConfig
from pipeline.io import retry
from pipeline.io.sources import Record, plan_shards, read_shard


@dataclass
class Member:
    name: str
    data: bytes
    offset: int  # of its header
    end: int  # of its data, padding excluded


def make_tar(members: list[tuple[str, bytes]]) -> tuple[bytes, list[Member]]:
    buffer = io.BytesIO()
    placed = []
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1_700_000_000
            offset = buffer.tell()
            archive.addfile(info, io.BytesIO(data))
            placed.append(Member(name, data, offset, offset + 512 + len(data)))
    return buffer.getvalue(), placed


def image(index: int, size: int = 700) -> bytes:
    return bytes([index % 251]) * size


SAMPLES = [(f"s{index}.jpg", image(index)) for index in range(5)]


def read_all(path: Path) -> list[Record]:
    config = InputConfig(uri=str(path))
    records = []
    for shard in plan_shards(config):
        size, reading = read_shard(shard, config)
        assert size is None  # a tar's count is known only once read
        records.extend(reading)
    assert len({record.key for record in records}) == len(records)
    return records


def test_samples_come_in_tar_order_with_meta(tmp_path: Path) -> None:
    data, _ = make_tar([("b.png", image(1)), ("b.jpg", image(2)), ("b.json", b'{"n": 2}'), ("b.cls", b"7"),
                        ("a.txt", b"caption a"), ("a.webp", image(3)), ("noext", b"x"), ("dir/.hidden", b"y")])
    (tmp_path / "x.tar").write_bytes(data)
    b, a = read_all(tmp_path / "x.tar")
    assert (b.key, b.member, b.data, json.loads(b.meta or "")) == ("x/b", "b.jpg", image(2), {"json": {"n": 2}})
    assert (a.key, a.member, a.data, json.loads(a.meta or "")) == ("x/a", "a.webp", image(3),
                                                                    {"caption": "caption a", "txt": "caption a"})


def test_cut_inside_a_member_keeps_every_sample_before_it(tmp_path: Path) -> None:
    data, members = make_tar(SAMPLES)
    cut = members[3].offset + 512 + 100  # inside s3.jpg's data
    (tmp_path / "t.tar").write_bytes(data[:cut])
    *good, broken, rest = read_all(tmp_path / "t.tar")
    assert [(r.key, r.data) for r in good] == [(f"t/s{i}", image(i)) for i in range(3)]
    assert broken.key == "t/s3" and broken.data is None and "s3.jpg" in (broken.error or "")
    assert rest.key == f"t/@offset-{members[3].offset + 512}"
    assert (rest.error or "").startswith(f"tar damaged after byte {members[3].offset + 512}: rest unreadable (")


@pytest.mark.parametrize("boundary", [1, 3, 5])
def test_cut_at_a_member_boundary_is_reported(tmp_path: Path, boundary: int) -> None:
    data, members = make_tar(SAMPLES)
    # Cut where a header would start, or (5) where the end-of-archive blocks start.
    cut = members[boundary].offset if boundary < len(members) else members[-1].end + (-members[-1].end % 512)
    (tmp_path / "t.tar").write_bytes(data[:cut])
    records = read_all(tmp_path / "t.tar")
    assert [(r.key, r.data) for r in records[:-1]] == [(f"t/s{i}", image(i)) for i in range(boundary)]
    assert records[-1].key == f"t/@offset-{cut}" and records[-1].data is None
    assert (records[-1].error or "").startswith(f"tar damaged after byte {cut}: rest unreadable")


def test_a_damaged_header_ends_the_tar_with_one_error_row(tmp_path: Path) -> None:
    data, members = make_tar(SAMPLES)
    damaged = bytearray(data)
    damaged[members[2].offset + 150] ^= 0x55  # in s2.jpg's header checksum
    (tmp_path / "t.tar").write_bytes(bytes(damaged))
    records = read_all(tmp_path / "t.tar")
    assert [(r.key, r.data) for r in records[:2]] == [("t/s0", image(0)), ("t/s1", image(1))]
    [rest] = records[2:]
    assert rest.key == f"t/@offset-{members[2].offset}"
    assert "InvalidHeaderError" in (rest.error or "")


def test_a_key_coming_back_later_gets_its_own_key(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data, _ = make_tar([("a.jpg", image(1)), ("b.jpg", image(2)), ("a.json", b"{}"), ("c.jpg", image(5)),
                        ("a.jpg", image(3)), ("a#2.jpg", image(4))])
    (tmp_path / "t.tar").write_bytes(data)
    with caplog.at_level(logging.WARNING):
        records = read_all(tmp_path / "t.tar")
    assert [(r.key, r.data) for r in records] == [("t/a", image(1)), ("t/b", image(2)), ("t/a#2", None),
                                                  ("t/c", image(5)), ("t/a#3", image(3)), ("t/a#2#2", image(4))]
    assert records[2].error == "no image member in sample (found json)"
    assert "comes again later" in caplog.text


def test_tars_in_folders_have_keys_with_their_folders(tmp_path: Path) -> None:
    data, _ = make_tar(SAMPLES[:2])
    for folder in ("a", "b", "b/c"):
        (tmp_path / "in" / folder).mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / folder / "000000.tar").write_bytes(data)
    keys = [record.key for record in read_all(tmp_path / "in")]
    assert keys == [f"{folder}/000000/s{i}" for folder in ("a", "b", "b/c") for i in range(2)]
    shards = list(plan_shards(InputConfig(uri=str(tmp_path / "in"))))
    assert [shard.container for shard in shards] == ["a/000000.tar", "b/000000.tar", "b/c/000000.tar"]


def test_the_tar_is_read_once_front_to_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data, _ = make_tar([(f"s{index}.jpg", image(index, 50_000)) for index in range(20)])
    (tmp_path / "t.tar").write_bytes(data)
    reads: list[tuple[int, int]] = []
    real_read = retry.RetryingReader.read

    def read(self: retry.RetryingReader, size: int | None = -1) -> bytes:
        start = self.tell()
        chunk = real_read(self, size)
        reads.append((start, len(chunk)))
        return chunk

    monkeypatch.setattr(retry.RetryingReader, "read", read)
    monkeypatch.setattr(retry.RetryingReader, "seek", lambda *args: pytest.fail("the tar reader seeks"))
    assert len(read_all(tmp_path / "t.tar")) == 20
    assert all(start == previous + length for (previous, length), (start, _) in itertools.pairwise(reads))
    assert sum(length for _, length in reads) <= len(data)
    assert max(length for _, length in reads) <= 64 * 1024  # streamed, not slurped


def test_an_empty_archive_and_a_non_tar(tmp_path: Path) -> None:
    data, _ = make_tar([])
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "empty.tar").write_bytes(data)
    (tmp_path / "in" / "zero.tar").write_bytes(b"")
    (tmp_path / "in" / "text.tar").write_bytes(b"hello, not a tar\n" * 100)
    records = read_all(tmp_path / "in")
    assert [r.key for r in records] == ["text", "zero"]
    assert all((r.error or "").startswith("unreadable object: ReadError") for r in records)


def test_a_member_over_the_limit_is_an_error_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.io import tar_source

    monkeypatch.setattr(tar_source, "MAX_MEMBER_BYTES", 1000)
    data, _ = make_tar([("a.jpg", image(1, 999)), ("b.jpg", image(2, 5000)), ("c.jpg", image(3, 10))])
    (tmp_path / "t.tar").write_bytes(data)
    a, b, c = read_all(tmp_path / "t.tar")
    assert a.data == image(1, 999) and c.data == image(3, 10)
    assert b.data is None and "over the 1000-byte limit" in (b.error or "")


def test_a_zeroed_header_is_not_taken_for_the_end(tmp_path: Path) -> None:
    data, members = make_tar(SAMPLES)
    for index in (0, 2):
        damaged = bytearray(data)
        damaged[members[index].offset:members[index].offset + 512] = bytes(512)
        (tmp_path / "t.tar").write_bytes(bytes(damaged))
        records = read_all(tmp_path / "t.tar")
        assert [r.key for r in records] == [*(f"t/s{i}" for i in range(index)), f"t/@offset-{members[index].offset}"]
        assert "end-of-archive block followed by more data" in (records[-1].error or "")
