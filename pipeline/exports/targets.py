"""Where exports write: `--to` means what it says, nothing existing is replaced unless asked, writes are atomic.

- A file export (JSONL, the gallery page) refuses a `--to` that is a folder (or ends in `/`), and an
  existing file unless `overwrite`. It is published as every file the pipeline writes (pipeline.io.fs's
  `atomic_path`): locally a temporary file beside the target, fsynced and moved into place at the end;
  without `overwrite` the move is a hard link, which fails rather than replace a file that appeared
  meanwhile. For object stores the file is written locally first and uploaded once, whole.
- A folder export (sidecar .txt, imagefolder) refuses a `--to` that is a file.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterator
from contextlib import contextmanager

import fsspec

from pipeline.io.fs import atomic_path, is_local, write_atomic


class TargetError(ValueError):
    """`--to` names something this export must not write to, or would replace without --overwrite."""


def check_file_target(target: str, fs: fsspec.AbstractFileSystem, path: str, what: str, example: str,
                      overwrite: bool) -> None:
    """Refuse a folder, and an existing file unless `overwrite`; `example` is a file name to suggest."""
    if target.endswith("/") or fs.isdir(path):
        raise TargetError(f"--to {target} is a folder; {what} writes one file, e.g. "
                          f"{posixpath.join(target.rstrip('/'), example)}")
    if not overwrite and (fs.exists(path) or (is_local(fs) and os.path.lexists(path))):
        raise TargetError(f"{target} exists; pass --overwrite to replace it")


def check_folder_target(target: str, fs: fsspec.AbstractFileSystem, path: str, what: str) -> None:
    if fs.isfile(path):
        raise TargetError(f"--to {target} is a file; {what} writes a folder of files")


def _appeared(path: str) -> TargetError:
    return TargetError(f"{path} appeared while the export ran; it was kept and nothing was written")


@contextmanager
def new_file(fs: fsspec.AbstractFileSystem, path: str, overwrite: bool) -> Iterator[str]:
    """A local path to write the new file at; leaving the block without an error puts it at `path`, whole:
    locally by a move from beside it, on object stores by one upload (a failed export uploads nothing)."""
    written = False
    try:
        with atomic_path(fs, path, replace=overwrite) as temporary:
            yield temporary
            written = True  # what fails from here on is the publishing
    except FileExistsError:
        if not written:
            raise
        raise _appeared(path) from None


def write_new(fs: fsspec.AbstractFileSystem, path: str, data: bytes, overwrite: bool) -> None:
    """Write `data` as the file `path` atomically, replacing a file there only with `overwrite`."""
    try:
        write_atomic(fs, path, data, replace=overwrite)
    except FileExistsError:
        raise _appeared(path) from None
