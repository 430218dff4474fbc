"""The one atomic publish (pipeline.io.fs): whole or nothing, temporary files never left behind, durable locally."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO

import pytest

from pipeline.io import fs as fs_module
from pipeline.io.fs import atomic_folder, atomic_path, fsync_directory, open_fs, write_atomic


def _local(tmp_path: Path):  # -> the local file system
    return open_fs(str(tmp_path))[0]


def _listing(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def test_bytes_and_a_writer_callback_are_published_whole(tmp_path: Path) -> None:
    fs, target = _local(tmp_path), tmp_path / "deep" / "er" / "file.json"
    write_atomic(fs, str(target), b"first")  # missing folders are made
    assert target.read_bytes() == b"first"

    def writer(handle: BinaryIO) -> None:
        for chunk in (b"sec", b"ond"):
            handle.write(chunk)

    write_atomic(fs, str(target), writer)  # replaces by default
    assert target.read_bytes() == b"second" and _listing(target.parent) == ["file.json"]


def test_a_failing_writer_publishes_nothing_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    fs, target = _local(tmp_path), tmp_path / "file.bin"
    target.write_bytes(b"old")

    def writer(handle: BinaryIO) -> None:
        handle.write(b"half of the new")
        raise RuntimeError("the writer failed")

    with pytest.raises(RuntimeError, match="the writer failed"):
        write_atomic(fs, str(target), writer)
    assert target.read_bytes() == b"old" and _listing(tmp_path) == ["file.bin"]
    with pytest.raises(ValueError, match="in the block"), atomic_path(fs, str(tmp_path / "new.bin")) as temporary:
        Path(temporary).write_bytes(b"partial")
        raise ValueError("in the block")
    assert _listing(tmp_path) == ["file.bin"]


def test_the_file_is_synced_before_the_rename_and_its_folder_after(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    fs, target = _local(tmp_path), tmp_path / "out" / "markers" / "000001.json"
    synced: list[tuple[str, bool]] = []  # (what was synced, whether the target existed then)
    real_fsync = os.fsync

    def recording_fsync(descriptor: int) -> None:
        kind = "folder" if stat.S_ISDIR(os.fstat(descriptor).st_mode) else "file"
        synced.append((kind, target.exists()))
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    write_atomic(fs, str(target), b"{}")
    assert synced == [("file", False), ("folder", True)]
    synced.clear()
    write_atomic(fs, str(tmp_path / "out" / "new.json"), b"{}", replace=False)  # the link() path too
    assert [kind for kind, _ in synced] == ["file", "folder"]


def test_without_replace_an_existing_file_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fs, target = _local(tmp_path), tmp_path / "record.json"
    write_atomic(fs, str(target), b"mine", replace=False)
    with pytest.raises(FileExistsError):
        write_atomic(fs, str(target), b"theirs", replace=False)
    assert target.read_bytes() == b"mine" and _listing(tmp_path) == ["record.json"]

    def no_hard_links(source: str, destination: str) -> None:
        raise OSError(errno.EPERM, "no hard links on this file system")

    monkeypatch.setattr(os, "link", no_hard_links)  # then: check, and rename
    with pytest.raises(FileExistsError):
        write_atomic(fs, str(target), b"theirs", replace=False)
    write_atomic(fs, str(tmp_path / "other.json"), b"new", replace=False)
    assert target.read_bytes() == b"mine" and (tmp_path / "other.json").read_bytes() == b"new"
    assert _listing(tmp_path) == ["other.json", "record.json"]


def test_a_folder_that_cannot_be_synced_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_fsync = os.fsync

    def refusing(descriptor: int) -> None:
        if stat.S_ISDIR(os.fstat(descriptor).st_mode):
            raise OSError(errno.EINVAL, "this mount syncs no folders")
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", refusing)
    fsync_directory(str(tmp_path))
    write_atomic(_local(tmp_path), str(tmp_path / "a"), b"a")
    assert (tmp_path / "a").read_bytes() == b"a"

    def failing(descriptor: int) -> None:
        raise OSError(errno.EIO, "the disk failed")

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(OSError, match="the disk failed"):
        fsync_directory(str(tmp_path))


def test_a_folder_is_renamed_in_whole_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "export"
    synced: list[str] = []
    monkeypatch.setattr(fs_module, "fsync_directory", synced.append)
    with atomic_folder(str(target)) as staging:
        assert Path(staging).parent == tmp_path and Path(staging).name.startswith(".tmp-")
        (Path(staging) / "a.txt").write_text("a")
    assert _listing(target) == ["a.txt"] and _listing(tmp_path) == ["export"] and synced == [str(tmp_path)]

    with pytest.raises(RuntimeError, match="cut short"), atomic_folder(str(target)) as staging:
        (Path(staging) / "b.txt").write_text("b")
        raise RuntimeError("cut short")
    assert _listing(target) == ["a.txt"] and _listing(tmp_path) == ["export"]  # old one kept, nothing left

    with atomic_folder(str(target)) as staging:  # a full folder: moved aside, the new one in, the old deleted
        (Path(staging) / "c.txt").write_text("c")
    assert _listing(target) == ["c.txt"] and _listing(tmp_path) == ["export"]


def test_object_stores_get_one_whole_upload(s3_bucket: str, s3_fs) -> None:
    fs, root = open_fs(f"s3://{s3_bucket}/out")
    write_atomic(fs, f"{root}/a.json", b"bytes")  # one PUT

    def writer(handle: BinaryIO) -> None:
        handle.write(b"from a writer")

    write_atomic(fs, f"{root}/b.json", writer)  # written locally, then uploaded
    with pytest.raises(FileExistsError):
        write_atomic(fs, f"{root}/a.json", b"other", replace=False)
    with pytest.raises(RuntimeError), atomic_path(fs, f"{root}/c.json") as temporary:
        Path(temporary).write_bytes(b"never uploaded")
        raise RuntimeError("failed")
    assert not os.path.exists(temporary)
    s3_fs.invalidate_cache()
    assert s3_fs.cat_file(f"{s3_bucket}/out/a.json") == b"bytes"
    assert s3_fs.cat_file(f"{s3_bucket}/out/b.json") == b"from a writer"
    assert sorted(s3_fs.ls(f"{s3_bucket}/out", detail=False)) == [f"{s3_bucket}/out/a.json",
                                                                  f"{s3_bucket}/out/b.json"]


def test_s3_listings_and_removals_see_what_other_processes_wrote(s3_server: str, s3_bucket: str) -> None:
    """s3fs caches a listing per process and sees only its own writes; markers, plan and staging are written by
    other processes (Ray workers, commit tasks, another run), so `list_names` and `remove_tree` bypass it."""
    import s3fs

    from pipeline.io.fs import list_names, remove_tree

    fs, root = open_fs(f"s3://{s3_bucket}/out")
    other = s3fs.S3FileSystem(endpoint_url=s3_server, key="testing", secret="testing", skip_instance_cache=True)
    other.pipe_file(f"{root}/_markers/000001.json", b"{}")
    assert list_names(fs, f"{root}/_markers") == ["000001.json"]  # now in this process's listing cache
    other.pipe_file(f"{root}/_markers/000002.json", b"{}")
    assert list_names(fs, f"{root}/_markers", refresh=False) == ["000001.json"]  # what a cached listing misses
    assert list_names(fs, f"{root}/_markers") == ["000001.json", "000002.json"]
    other.pipe_file(f"{root}/_staging/000003/{'a' * 32}/x.parquet", b"late")
    fs.ls(f"{root}/_staging/000003", refresh=True)
    other.pipe_file(f"{root}/_staging/000003/{'b' * 32}/y.parquet", b"later")
    remove_tree(fs, f"{root}/_staging/000003")
    other.invalidate_cache()
    assert not other.find(f"{root}/_staging")
    remove_tree(fs, f"{root}/_staging/000003")  # nothing there: no error
