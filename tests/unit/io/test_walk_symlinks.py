"""The local walk never loops and never lists a file twice by accident; one bad entry is a warning."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from pipeline.config import InputConfig
from pipeline.io.fs import open_fs
from pipeline.io.sources import plan_shards
from pipeline.io.walk import walk_files


def _touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _listed(root: Path) -> list[str]:
    fs, path = open_fs(str(root))
    return [os.path.relpath(found, root) for found, _size in walk_files(fs, path)]


def test_symlink_cycles_are_skipped_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "in"
    _touch(root / "a" / "1.jpg")
    _touch(root / "b" / "2.jpg")
    (root / "a" / "up").symlink_to(root)  # to an ancestor
    (root / "a" / "self").symlink_to(root / "a")
    (root / "loop1").symlink_to(root / "loop2")  # to each other: "Too many levels of symbolic links"
    (root / "loop2").symlink_to(root / "loop1")
    (root / "me").symlink_to(root / "me")
    with caplog.at_level(logging.WARNING):
        assert _listed(root) == ["a/1.jpg", "b/2.jpg"]
        assert [m for s in plan_shards(InputConfig(uri=str(root))) for m in s.members] == ["a/1.jpg", "b/2.jpg"]
    assert "already listed" in caplog.text and "loop1" in caplog.text and "me" in caplog.text


def test_links_inside_the_root_are_not_listed_twice(tmp_path: Path) -> None:
    root = tmp_path / "in"
    _touch(root / "real" / "1.jpg")
    (root / "alias").symlink_to(root / "real")  # sorts before "real": still listed by the real path only
    (root / "copy.jpg").symlink_to(root / "real" / "1.jpg")
    (root / "hard.jpg").hardlink_to(root / "real" / "1.jpg")  # hard links are separate files
    assert _listed(root) == ["hard.jpg", "real/1.jpg"]


def test_links_outside_the_root_are_followed_once(tmp_path: Path) -> None:
    root, outside = tmp_path / "in", tmp_path / "shared"
    _touch(outside / "s.jpg")
    _touch(outside / "deep" / "t.jpg")
    _touch(tmp_path / "lone.jpg")
    _touch(root / "own.jpg")
    (root / "a").symlink_to(outside)
    (root / "b").symlink_to(outside)  # the same folder again: skipped
    (root / "c").symlink_to(outside / "deep")  # inside a folder already listed: skipped
    (root / "lone.jpg").symlink_to(tmp_path / "lone.jpg")
    (outside / "back").symlink_to(root)  # into the root: skipped
    (root / "broken.jpg").symlink_to(tmp_path / "gone.jpg")
    assert _listed(root) == ["a/deep/t.jpg", "a/s.jpg", "lone.jpg", "own.jpg"]


def test_an_unreadable_subfolder_is_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "in"
    for name in ("a/1.jpg", "locked/2.jpg", "z/3.jpg"):
        _touch(root / name)
    real_scandir = os.scandir

    def scandir(path: str) -> object:
        if os.path.basename(path) == "locked":
            raise PermissionError(13, "Permission denied", path)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with caplog.at_level(logging.WARNING):
        assert _listed(root) == ["a/1.jpg", "z/3.jpg"]
    assert "Permission denied" in caplog.text
    with pytest.raises(PermissionError):  # the root itself is not a detail to skip
        _listed(root / "locked")


def test_an_observer_sees_each_walk_start_and_every_file_with_its_size_until_it_leaves(tmp_path: Path):
    from pipeline.io import walk

    _touch(tmp_path / "a.jpg", b"12345")
    _touch(tmp_path / "sub" / "b.jpg", b"12")

    class Seen:
        def __init__(self) -> None:
            self.events: list[tuple[str, ...]] = []

        def started(self, root: str):
            self.events.append(("started",))
            return lambda path, size: self.events.append((os.path.relpath(path, root), str(size)))

    seen = Seen()
    with walk.observing(seen):
        assert _listed(tmp_path) == ["a.jpg", "sub/b.jpg"]
    _listed(tmp_path)  # after leaving: not seen
    assert seen.events == [("started",), ("a.jpg", "5"), ("sub/b.jpg", "2")]


def test_files_of_interleaved_walks_go_to_their_own_walk(tmp_path: Path):
    from pipeline.io import walk

    for name in ("a.jpg", "b.jpg"):
        _touch(tmp_path / "one" / name)
        _touch(tmp_path / "two" / name)
    fs, root = open_fs(str(tmp_path))
    per_walk: list[list[str]] = []

    class Seen:
        def started(self, root: str):
            files: list[str] = []
            per_walk.append(files)
            return lambda path, _size: files.append(os.path.relpath(path, tmp_path))

    with walk.observing(Seen()):
        first, second = walk_files(fs, f"{root}/one"), walk_files(fs, f"{root}/two")
        next(first), next(second), next(first), next(second)
    assert per_walk == [["one/a.jpg", "one/b.jpg"], ["two/a.jpg", "two/b.jpg"]]
