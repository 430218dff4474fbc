"""Stream (path, size) of every file under a root, in the byte order S3 lists keys in.

Local folders and S3 prefixes give the same order, so a local copy and an S3 copy of an input give the
same shards. Hidden names (a leading dot) are skipped on both.

Local symlinks never make the walk loop, and never list a file twice by accident:
- regular files and folders are listed by their path;
- a symlink to a folder is followed only if its real target lies outside the input root and is not a
  folder visited already (every folder visited is remembered by (st_dev, st_ino)); a link into the root
  is skipped because the real folder is listed anyway, a link to a visited folder because it is a cycle
  or a second path to the same files;
- a symlink to a file is listed (under the link's path) only if its target lies outside the input root;
  inside it, the real file is listed already;
- broken or looping symlinks ("Too many levels of symbolic links") and unreadable subfolders are
  skipped with a warning; the walk goes on, in the same order;
- hard links are separate files: nothing tells them apart from copies without remembering every file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.io.retry import retrying

log = logging.getLogger("pipeline.io")


@dataclass
class _LocalWalk:
    real_root: str
    visited: set[tuple[int, int]] = field(default_factory=set)

    def inside_root(self, path: str) -> bool:
        real = os.path.realpath(path)
        return real == self.real_root or real.startswith(self.real_root.rstrip(os.sep) + os.sep)


def _entries(directory: str, root: bool) -> list[tuple[str, os.DirEntry[str], os.stat_result]]:
    """(sort key, entry, stat following links) of the visible entries; the sort key puts a folder at "name/"."""
    try:
        with os.scandir(directory) as scan:
            visible = [entry for entry in scan if not entry.name.startswith(".")]
    except OSError as err:
        if root:
            raise
        log.warning("skipping folder %s: %s: %s", directory, type(err).__name__, err)
        return []
    entries = []
    for entry in visible:
        try:
            info = entry.stat()  # follows links; cached by the entry
        except OSError as err:  # broken link, link loop, vanished, permission
            log.warning("skipping %s: %s: %s", entry.path, type(err).__name__, err.strerror or err)
            continue
        folder = stat.S_ISDIR(info.st_mode)
        entries.append((entry.name + "/" if folder else entry.name, entry, info))
    entries.sort(key=lambda item: item[0])
    return entries


def _walk_folder(directory: str, walk: _LocalWalk, root: bool = False) -> Iterator[tuple[str, int]]:
    # Depth first, one folder's entries in memory per level.
    for _name, entry, info in _entries(directory, root):
        link = entry.is_symlink()
        if stat.S_ISDIR(info.st_mode):
            identity = (info.st_dev, info.st_ino)
            if identity in walk.visited:
                log.warning("skipping %s: a folder already listed (a symlink cycle or a second path to it)",
                            entry.path)
                continue
            if link and walk.inside_root(entry.path):
                log.info("skipping %s: a symlink to a folder inside the input, listed by its own path", entry.path)
                continue
            walk.visited.add(identity)
            yield from _walk_folder(entry.path, walk)
        elif stat.S_ISREG(info.st_mode):
            if link and walk.inside_root(entry.path):
                continue  # the real file is listed by its own path
            yield entry.path, info.st_size


def _walk_local(root: str) -> Iterator[tuple[str, int]]:
    info = os.stat(root)
    walk = _LocalWalk(os.path.realpath(root), {(info.st_dev, info.st_ino)})
    yield from _walk_folder(root, walk, root=True)


def _walk_s3(fs: fsspec.AbstractFileSystem, root: str) -> Iterator[tuple[str, int]]:
    # ListObjectsV2 page by page: keys arrive in byte order, one page (1000 keys) in memory.
    bucket, prefix, _ = fs.split_path(root)
    prefix = f"{prefix.rstrip('/')}/" if prefix else ""
    token = None
    while True:
        request = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": 1000}
        if token:
            request["ContinuationToken"] = token
        page = retrying(fs.call_s3, "list_objects_v2", what=f"listing s3://{bucket}/{prefix}", **request)
        for item in page.get("Contents", []):
            relative = item["Key"][len(prefix):]
            # Skip folder markers and hidden files or folders, as the local walk does.
            if not relative.endswith("/") and not any(part.startswith(".") for part in relative.split("/")):
                yield f"{bucket}/{item['Key']}", int(item["Size"])
        if not page.get("IsTruncated"):
            return
        token = page["NextContinuationToken"]


class WalkObserver(Protocol):
    """Sees every walk: `started(root)` when one begins, returning what to call with (path, size) for each
    file that walk yields (walks may interleave: each file goes to its own walk's callback)."""

    def started(self, root: str) -> Callable[[str, int], None]: ...


_OBSERVERS: list[WalkObserver] = []


@contextlib.contextmanager
def observing(observer: WalkObserver) -> Iterator[WalkObserver]:
    """Show `observer` every walk of this process while inside. The walk returns each file's size with its
    path, so a listing's bytes are counted without a request of their own (the `plan` command does)."""
    _OBSERVERS.append(observer)
    try:
        yield observer
    finally:
        _OBSERVERS.remove(observer)


def walk_files(fs: fsspec.AbstractFileSystem, root: str) -> Iterator[tuple[str, int]]:
    """Stream (path, size) of every file under `root` in a deterministic order (see the module doc)."""
    if not _OBSERVERS:
        yield from _walk(fs, root)
        return
    seen = [observer.started(root) for observer in _OBSERVERS]
    for path, size in _walk(fs, root):
        for file_seen in seen:
            file_seen(path, size)
        yield path, size


def _walk(fs: fsspec.AbstractFileSystem, root: str) -> Iterator[tuple[str, int]]:
    if isinstance(fs, LocalFileSystem):
        yield from _walk_local(root)
    elif fs.protocol in ("s3", "s3a") or "s3" in getattr(fs, "protocol", ()):
        yield from _walk_s3(fs, root)
    else:
        found = retrying(fs.find, root, detail=True, what=f"listing {root}")
        for path, info in sorted(found.items()):
            yield path, int(info.get("size") or 0)
